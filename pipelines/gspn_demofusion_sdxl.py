"""Community pipeline: DemoFusion-style high-resolution SD-XL generation with GSPN, for ``custom_pipeline=``.

    pipe = DiffusionPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0", custom_pipeline="pipelines/gspn_demofusion_sdxl.py",
        trust_remote_code=True, torch_dtype=torch.float16,
    ).to("cuda")
    gspn_diffusers.load_gspn(pipe, "org/sdxl-gspn")   # optional: GSPN weights (a folder or a hub repo)
    image = pipe("a lighthouse at dawn", height=4096, width=8192).images[0]

Thin on purpose: the pipeline lives in the installed package (``pip install gspn-diffusers``).
"""

from gspn_diffusers.pipelines.demofusion import GSPNDemoFusionSDXLPipeline

__all__ = ["GSPNDemoFusionSDXLPipeline"]

"""Community pipeline: DemoFusion-style high-resolution SD-1.5/SD-2 generation with GSPN, for ``custom_pipeline=``.

    pipe = DiffusionPipeline.from_pretrained(
        "runwayml/stable-diffusion-v1-5", custom_pipeline="pipelines/gspn_demofusion_sd15.py",
        trust_remote_code=True, torch_dtype=torch.float16,
    ).to("cuda")
    gspn_diffusers.load_gspn(pipe, "org/sd15-gspn")   # optional: GSPN weights (a folder or a hub repo)
    image = pipe("a lighthouse at dawn", height=2048, width=2048).images[0]

Thin on purpose: the pipeline lives in the installed package (``pip install gspn-diffusers``).
"""

from gspn_diffusers.pipelines.demofusion import GSPNDemoFusionPipeline

__all__ = ["GSPNDemoFusionPipeline"]

"""Diffusers pipelines built on GSPN: the DemoFusion-style high-resolution pipelines for SD-1.5 and SD-XL."""

from __future__ import annotations

from .demofusion import DemoFusionPipelineOutput, GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline

__all__ = ["DemoFusionPipelineOutput", "GSPNDemoFusionPipeline", "GSPNDemoFusionSDXLPipeline"]

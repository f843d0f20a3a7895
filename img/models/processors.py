"""Image preprocessing the encoders expect, built without any download.

    proc = clip_image_processor(224)   # resize the short side, centre-crop, OpenAI CLIP mean/std
"""
from __future__ import annotations


def clip_image_processor(image_size: int):
    """The default CLIP preprocessing at ``image_size`` px (what diffusers builds for an IP-Adapter encoder)."""
    from transformers import CLIPImageProcessorPil  # same numerics as CLIPImageProcessor, no torchvision needed

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})

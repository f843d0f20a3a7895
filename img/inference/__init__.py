"""Inference: IMG regeneration through diffusers (``generation``) and the `img infer` runner (``infer``).

    from img.inference.generation import IMGPipeline
    pipe = IMGPipeline.from_profile("tiny")
    result = pipe("a red circle", seed=3)
"""

"""Model profiles and loading: which weights a job uses, found offline, and the tiny builds.

    from img.models.profiles import get_profile
    from img.models.loading import load_sdxl_pipeline
    pipe = load_sdxl_pipeline(get_profile("tiny"))
"""

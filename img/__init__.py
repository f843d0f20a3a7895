"""IMG: Implicit Multimodal Guidance.

The library: aligner and objective, feature encoders shared by embed and
inference, model profiles, the lake access layer, and the ``img`` CLI.
Nothing heavy is imported here; import the submodule you need::

    from img.aligner import AlignerConfig, ImplicitAligner
"""
__version__ = "0.1.0"

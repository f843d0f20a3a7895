"""Training the Implicit Aligner on cached features: the loader, the DeepSpeed trainer, checkpoints.

    from img.training.trainer import TrainConfig, run_training
"""

"""Trainer, evaluator, inference, checkpoints and the distributed helpers."""

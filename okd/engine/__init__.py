"""The generic engine: one training loop for every method, checkpoints, evaluation, logging."""

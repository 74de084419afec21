"""Training: optimizer, step, loop, checkpoints, metrics."""

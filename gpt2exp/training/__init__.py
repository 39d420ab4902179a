"""The worker loop, optimizer and schedule, checkpoints and training metrics."""

"""The training loop, its optimizer/schedule, checkpoints and logging."""

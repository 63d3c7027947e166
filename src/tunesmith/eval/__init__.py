"""Evaluation: tasks, metrics, the sandbox for model-written code, and the runner."""

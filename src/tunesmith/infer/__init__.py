"""Inference: batched generation, JSONL completion, an interactive chat.

Import from `tunesmith.infer.generate`; this package does not re-export, so that the name
`generate` keeps meaning the module here (the function would shadow it).
"""

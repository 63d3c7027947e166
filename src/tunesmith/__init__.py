"""tunesmith: turn an open LLM into a specialist — fine-tune, align, evaluate, export."""
__version__ = "0.1.0"

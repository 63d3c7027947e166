"""Export: adapters in our format and in HF PEFT's layout (`peft_format`: LoRA, IA3, prefix tuning),
and merged plain-transformers models."""
from __future__ import annotations

from .atomic import ExportError
from .merged import export_merged
from .peft_format import adapter_folder, load_adapter, read_adapter, save_adapter

__all__ = ["ExportError", "save_adapter", "load_adapter", "read_adapter", "adapter_folder", "export_merged"]

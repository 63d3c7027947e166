"""The data pipeline: files → records → formats → token ids with loss weights → batches.

    splits = load_data(recipe.data, tokenizer, seed=recipe.train.seed)
    plan = plan_batches([len(s["input_ids"]) for s in splits.train], packing=..., batch_tokens=...,
                        batch_size=..., seed=..., epoch=e)
    batch = collate([splits.train[i] for i in plan[0]], packing=..., pad_id=tokenizer.pad_token_id)
"""
from .batching import collate, plan_batches, to_device
from .errors import DataError
from .formats import detect_format, to_example
from .load import DataSplits, load_data, split_stats
from .render import CHATML_TEMPLATE, Renderer, Sample, chat_template
from .report import format_inspection
from .sources import Record, read_records

__all__ = [
    "CHATML_TEMPLATE",
    "DataError",
    "DataSplits",
    "Record",
    "Renderer",
    "Sample",
    "chat_template",
    "collate",
    "to_device",
    "detect_format",
    "format_inspection",
    "load_data",
    "plan_batches",
    "read_records",
    "split_stats",
    "to_example",
]

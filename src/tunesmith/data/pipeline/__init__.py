"""`tunesmith data prepare RECIPE`: a streaming cleaning pipeline from raw files to tokenized shards.

    read -> normalise -> exact dedup -> quality filters -> PII scrub -> near-dedup -> render+tokenize -> shards

    from tunesmith.data.pipeline import prepare
    result = prepare(recipe.prepare, recipe.data, tokenizer)   # result.report: counts per step

The recipe's `prepare:` block (`PrepareConfig`) says which steps run and how; its `data:` section says
how records are read and rendered, exactly as `train` would. See run.py for the flow.
"""
from .config import FilterConfig, NearDedupConfig, PiiConfig, PrepareConfig
from .report import format_report
from .run import PrepareResult, prepare

__all__ = ["FilterConfig", "NearDedupConfig", "PiiConfig", "PrepareConfig", "PrepareResult", "format_report",
           "prepare"]

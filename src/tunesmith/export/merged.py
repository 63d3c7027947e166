"""A merged model: base + s·BA folded into every adapted weight, saved as a plain transformers folder.

The result loads with `AutoModelForCausalLM.from_pretrained` alone (no tunesmith, no PEFT) and
has exactly the base model's state-dict keys. Merging happens in fp32 and is cast to `dtype` last,
so a bf16 export rounds once, not twice. An adapter trained on a quantised base (model.quantize,
QLoRA) learnt its update against dequant(W_q), so its merge is dequant(W_q) + s·BA, and every other
quantised Linear is saved dequantised too: the merged model computes what the trained one did.
"""
from __future__ import annotations

from pathlib import Path

from tunesmith.methods import MethodError
from tunesmith.models.load import DTYPES, load_model, resolve
from tunesmith.models.quant import MODES, dequantize_model, quantize_frozen

from .atomic import ExportError, atomic_folder
from .tuned import load_tuned, read_method


def export_merged(base: str, adapter_dir, out_dir, dtype: str = "fp32", quantize: str | dict | None = None) -> Path:
    """Merge the adapter into `base` and save a transformers folder (atomically); return its path.

    Args:
        base: the base model (any name `load_model` takes).
        adapter_dir: a PEFT adapter folder or a tunesmith run folder; None re-saves `base` itself
            (e.g. a fully fine-tuned model) in `dtype`.
        out_dir: the folder to write; an existing model folder there is replaced.
        dtype: `fp32`, `bf16` or `fp16` for the saved weights.
        quantize: the base quantisation the adapter trained on (`int8`, `int4`, `nf4`, or
            {"mode", "group_size"}); None reads it from the adapter's metadata (`quantize`), `none`
            merges into the original weights.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # an export prints nothing; the caller reports the path
    try:
        if adapter_dir is not None:
            cfg, meta = read_method(adapter_dir)  # refuse an adapter that cannot merge before loading the model
            from tunesmith.methods import method_class

            if not method_class(cfg.name).mergeable:
                raise ExportError(f"a `{cfg.name}` adapter cannot be merged into the base weights; use it with "
                                  "`--adapter` (generate, chat, eval) instead")
        model, _ = load_model(base, dtype="fp32" if adapter_dir is not None else dtype)
        if adapter_dir is not None:
            method, _ = load_tuned(model, adapter_dir)
            spec = _quantize_spec(meta.get("quantize") if quantize is None else quantize)
            if spec is not None:
                quantize_frozen(model, spec["mode"], spec.get("group_size", 64))
            try:
                method.merge(model)
            except MethodError as e:
                raise ExportError(str(e)) from None
            dequantize_model(model)  # Linears the adapter left alone: dequant(W_q), as trained
        model.to(DTYPES[dtype])
        # The tokenizer as shipped (load_tokenizer may have set a pad token for training).
        tokenizer = AutoTokenizer.from_pretrained(str(resolve(base)))
        with atomic_folder(out_dir, marker="config.json") as tmp:
            model.save_pretrained(tmp)  # safetensors (transformers 5 writes nothing else)
            tokenizer.save_pretrained(tmp)
            if model.generation_config is not None and not (tmp / "generation_config.json").is_file():
                model.generation_config.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return Path(out_dir)


def _quantize_spec(value) -> dict | None:
    """{"mode", "group_size"} from a mode name or a recorded dict; None for no quantisation."""
    if value is None or value == "none":
        return None
    spec = {"mode": value} if isinstance(value, str) else dict(value)
    if spec.get("mode") not in MODES:
        raise ExportError(f"quantize: `{spec.get('mode')}` is not a format; choose one of {', '.join(MODES)}")
    return None if spec["mode"] == "none" else spec

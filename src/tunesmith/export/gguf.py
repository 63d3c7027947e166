"""GGUF export for llama.cpp and Ollama: a model as one .gguf file (with an Ollama Modelfile beside
it), and a LoRA adapter as a GGUF LoRA that llama.cpp applies at load time (`--lora`).

Format facts this follows (the GGUF spec and llama.cpp's loader; written with the `gguf` package):
- Llama only (general.architecture "llama"): llama.cpp rebuilds the network from the `llama.*`
  hyperparameters and the `blk.N.*` tensor names (`gguf.get_tensor_name_map`).
- HF keeps each head's q/k rows in rotate-half order (first halves, then second halves); llama.cpp
  rotates interleaved pairs, so q_proj/k_proj rows are permuted per head:
  (heads, 2, d/2, in) -> (heads, d/2, 2, in); k_proj with the key/value head count. A LoRA's
  B (out, r) carries the rows, so of a q/k adapter only B is permuted; A (r, in) is unchanged.
- Tensors are given in numpy order (out, in) and stored reversed (ne0 = in). 1-D tensors (norms)
  stay F32 at every quant; q8_0 needs rows that are a multiple of 32 (others fall back to F16).
- Tied embeddings: no output.weight; llama.cpp then uses token_embd as the head.
- RoPE: `llama.rope.freq_base` (a static NTK scaling is only a larger θ); linear and YaRN scaling as
  llama.cpp's `llama.rope.scaling.{type,factor,original_context_length,yarn_beta_fast,yarn_beta_slow}`.
  Dynamic NTK, llama3 and longrope have no such keys and are refused; so is a GGUF LoRA trained with
  other positions than its base (llama.cpp takes them from the base GGUF).
- The tokenizer, chat template and Modelfile: `gguf_vocab.py`.
- A GGUF LoRA: general.type "adapter", adapter.type "lora", adapter.lora.alpha; tensors
  `<weight>.lora_a` (r, in) and `.lora_b` (out, r). llama.cpp scales by alpha / r with r the rows of
  A, so the alpha written is scale·r (which also covers rsLoRA's alpha/sqrt(r)).
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as FT

from tunesmith.models.load import resolve
from tunesmith.models.rope import describe_rope

from .atomic import ExportError
from .gguf_vocab import add_tokenizer, modelfile_text

# --quant: (type of 2-D weights, general.file_type)
QUANTS = {"f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16), "bf16": (Q.BF16, FT.MOSTLY_BF16),
          "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0)}
LORA_QUANTS = ("f32", "f16", "bf16")  # a LoRA's rank is rarely a multiple of q8_0's 32-value blocks

class Written(NamedTuple):
    """What an export wrote: the .gguf, its Modelfile (None for a LoRA), tensor count and file size."""
    path: Path
    modelfile: Path | None
    tensors: int
    bytes: int


# ---- files

@contextlib.contextmanager
def atomic_file(dest: Path):
    """Yield a temporary sibling path; on success it replaces `dest`, on failure it is removed, so a
    reader never sees a half-written file and a crash leaves the previous file intact."""
    if dest.is_dir():
        raise ExportError(f"{dest} is a folder; give the path of the file to write")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _gguf_path(out) -> Path:
    path = Path(out).expanduser().absolute()
    if path.suffix != ".gguf":
        raise ExportError(f"{path}: a GGUF export is one file; give a path ending in .gguf")
    return path


# ---- the Llama architecture

# transformers' rope_type -> llama.cpp's scaling type; dynamic NTK, llama3 and longrope have no GGUF keys
# a Llama GGUF is read with (llama.cpp's YaRN derives the attention factor 0.1·ln(factor)+1 itself)
ROPE_SCALING = {"linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN}
YARN_UNWRITTEN = ("attention_factor", "mscale", "mscale_all_dim")


def _rope(config) -> dict:
    """The config's RoPE as one dict (rope_type, rope_theta, factor, ...); ExportError for a scaling a
    Llama GGUF cannot express."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default" and kind not in ROPE_SCALING:
        raise ExportError(f"rope scaling `{kind}` is not supported by the GGUF export (plain, linear and yarn "
                          "are): export a transformers folder (--format hf)")
    rope = {**scaling, **params, "rope_type": kind}
    if kind == "yarn" and any(rope.get(k) is not None for k in YARN_UNWRITTEN):
        raise ExportError(f"rope scaling `yarn` with {'/'.join(YARN_UNWRITTEN)} set is not supported by the "
                          "GGUF export")
    if kind == "yarn" and rope.get("truncate") is False:
        raise ExportError("rope scaling `yarn` with truncate=false is not supported by the GGUF export")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError("the model config has no rope_theta")
    return {**rope, "rope_theta": float(theta)}


def _add_rope(w: gguf.GGUFWriter, config) -> None:
    """rope.freq_base, and for linear/YaRN scaling llama.cpp's rope.scaling.* keys."""
    rope = _rope(config)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "default":
        return
    w.add_rope_scaling_type(ROPE_SCALING[rope["rope_type"]])
    w.add_rope_scaling_factor(float(rope["factor"]))
    if rope["rope_type"] == "yarn":
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        w.add_rope_scaling_orig_ctx_len(int(original))
        w.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow") or 1))


def check_llama(config, where) -> None:
    """Refuse what the Llama GGUF layout cannot hold, naming it; one line each."""
    kind = getattr(config, "model_type", None)
    if kind != "llama":
        archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise ExportError(f"{where}: GGUF export supports the Llama architecture only; this model is `{kind}` "
                          f"({archs}): export a transformers folder (--format hf) and convert it with llama.cpp")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ExportError(f"{where}: {flag}=true is not supported by the GGUF export")
    try:
        _rope(config)
    except ExportError as e:
        raise ExportError(f"{where}: {e}") from None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def interleave_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order of q/k (or of a LoRA B on them) -> GGUF's interleaved pairs."""
    out = w.shape[0]
    return w.reshape(heads, 2, out // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotate_half_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `interleave_rows`: GGUF's interleaved q/k rows back to HF's order."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _row_heads(hf_name: str, config) -> int | None:
    """The head count whose rows to permute for this HF weight, or None."""
    if ".self_attn.q_proj." in hf_name + ".":
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name + ".":
        return _kv_heads(config)
    return None


def _gguf_name(names, hf_name: str, where) -> str:
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"{where}: `{hf_name}` has no place in a Llama GGUF")
    return name


def _model_tensors(model, where) -> list[tuple[str, torch.Tensor, int | None]]:
    """(GGUF name, tensor, heads to permute by) for every weight; the tied head is left out."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        out.append((_gguf_name(names, key, where), t, _row_heads(key, config)))
    return out


# ---- tensors

def _tensor_type(t: torch.Tensor, qtype: Q) -> Q:
    if t.ndim < 2:
        return Q.F32
    if qtype == Q.Q8_0 and t.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def _encoded(t: torch.Tensor, heads: int | None, qtype: Q) -> np.ndarray:
    t = t.detach().to("cpu", torch.float32)
    if heads is not None:
        t = interleave_rows(t, heads)
    return gguf.quants.quantize(np.ascontiguousarray(t.numpy()), qtype)


def _write(writer: gguf.GGUFWriter, dest: Path, tensors, qtype: Q, progress: bool, what: str) -> int:
    """Declare every tensor, then encode and write them one at a time (one tensor in memory beyond
    the model); returns the file size."""
    from tqdm.auto import tqdm

    plan = []
    for name, t, heads in tensors:
        kind = _tensor_type(t, qtype)
        shape = tuple(t.shape)
        if kind in (Q.F32, Q.F16):
            dtype = np.float32 if kind == Q.F32 else np.float16
            writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize, kind)
        else:
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, kind)))
            writer.add_tensor_info(name, gguf.quant_shape_to_byte_shape(shape, kind), np.dtype(np.uint8), nbytes, kind)
        plan.append((t, heads, kind))
    with atomic_file(dest) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, heads, kind in tqdm(plan, desc=what, unit="tensor", disable=not progress, leave=False):
            writer.write_tensor_data(_encoded(t, heads, kind))
        writer.close()
    return dest.stat().st_size


def _write_modelfile(gguf_path: Path, tokenizer) -> Path:
    path = gguf_path.with_suffix(".Modelfile")
    with atomic_file(path) as tmp:
        tmp.write_text(modelfile_text(gguf_path.name, tokenizer))
    return path


def usage(written: Written, lora: bool = False) -> list[str]:
    """The commands that run what was written."""
    p = written.path
    if lora:
        return [f"llama-cli -m BASE.gguf --lora {p}", f"llama-server -m BASE.gguf --lora {p}",
                "(BASE.gguf: the base model as a GGUF, e.g. `tunesmith export --format gguf --model BASE`)"]
    name = p.stem.lower().replace("_", "-")
    lines = [f"ollama create {name} -f {written.modelfile}"] if written.modelfile else []
    return lines + [f"llama-cli -m {p}", f"llama-server -m {p}"]


# ---- models

def _source_folder(source) -> Path:
    path = Path(source).expanduser()
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"  # a full fine-tuning run folder
    return resolve(str(source))


def _load(source, tokenizer):
    """(model, tokenizer, where, name) from a loaded model or a model name/folder; the architecture is
    checked before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(source, torch.nn.Module):
        if tokenizer is None:
            raise ExportError("export_gguf: a loaded model needs its tokenizer (tokenizer=...)")
        where = getattr(source.config, "_name_or_path", "") or type(source).__name__
        check_llama(source.config, where)
        return source, tokenizer, where, Path(str(where)).name or "model"
    from transformers.utils import logging as hf_logging

    folder = _source_folder(source)
    config = AutoConfig.from_pretrained(str(folder))
    check_llama(config, folder)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # ours counts the tensors written
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer, folder, folder.name


def export_gguf(source, out_path, quant: str = "f16", tokenizer=None, name: str | None = None,
                modelfile: bool = True, progress: bool = True) -> Written:
    """Write a Llama model as one GGUF file (atomically), with an Ollama Modelfile beside it.

    Args:
        source: a transformers model folder, any name `load_model` takes, a full fine-tuning run
            folder, or a loaded model (then pass `tokenizer`).
        out_path: the .gguf file to write (replaced if present); the Modelfile is `<stem>.Modelfile`.
        quant: f32, f16, bf16 or q8_0 for the 2-D weights (norms stay f32).
        name: general.name (default: the model folder's name).
    """
    if quant not in QUANTS:
        raise ExportError(f"quant {quant!r} is not one of {', '.join(QUANTS)}")
    dest = _gguf_path(out_path)
    model, tokenizer, where, default_name = _load(source, tokenizer)
    config = model.config
    qtype, ftype = QUANTS[quant]
    tensors = _model_tensors(model, where)  # refuses unknown weights before anything is written
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or default_name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(_kv_heads(config))
    _add_rope(w, config)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(_head_dim(config))
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        w.add_key_length(_head_dim(config))
        w.add_value_length(_head_dim(config))
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, tokenizer, config.vocab_size, where)
    size = _write(w, dest, tensors, qtype, progress, f"GGUF {quant}")
    mf = _write_modelfile(dest, tokenizer) if modelfile else None
    return Written(dest, mf, len(tensors), size)


def export_merged_gguf(base: str, adapter, out_path, quant: str = "f16", progress: bool = True) -> Written:
    """Merge `adapter` into `base` (export_merged, fp32) and write the result as a GGUF."""
    from .merged import export_merged

    if quant not in QUANTS:
        raise ExportError(f"quant {quant!r} is not one of {', '.join(QUANTS)}")
    dest = _gguf_path(out_path)
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=dest.parent if dest.parent.is_dir() else None) as tmp:
        folder = export_merged(base, adapter, Path(tmp) / "merged", dtype="fp32")
        return export_gguf(folder, dest, quant=quant, name=dest.stem, progress=progress)


# ---- LoRA adapters

def _lora_factors(adapter, where):
    """(scale, {module: (A, B)}) of a LoRA adapter folder; any other method is refused."""
    from .peft_format import read_adapter
    from .tuned import read_method

    cfg, meta = read_method(adapter)
    if cfg.name != "lora":
        raise ExportError(f"{where}: a `{cfg.name}` adapter has no GGUF LoRA form; export a merged GGUF "
                          "instead (--format gguf)")
    lora, layers = read_adapter(adapter)
    if lora.dora:
        raise ExportError(f"{where}: a DoRA adapter has no GGUF LoRA form (llama.cpp has no magnitude vector); "
                          "export a merged GGUF instead (--format gguf)")
    scale = lora.alpha / (math.sqrt(lora.rank) if lora.rslora else lora.rank)
    return scale, {n: (p["lora_a"], p["lora_b"]) for n, p in layers.items()}, meta


def lora_tensors(factors: dict, config, where) -> list[tuple[str, torch.Tensor, int | None]]:
    """(GGUF name, tensor, heads to permute by) of each A and B; B of q/k gets the row permutation."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for module, (a, b) in factors.items():
        base = _gguf_name(names, f"{module}.weight", where)
        if base in ("token_embd.weight", "output.weight"):
            raise ExportError(f"{where}: a LoRA on `{module}` is not supported in a GGUF LoRA; export merged")
        out.append((f"{base}.lora_a", a, None))
        out.append((f"{base}.lora_b", b, _row_heads(f"{module}.weight", config)))
    return out


def export_gguf_lora(adapter, out_path, base: str | None = None, quant: str = "f32",
                     progress: bool = True) -> Written:
    """Write a LoRA adapter as a GGUF LoRA (atomically) that llama.cpp applies at load (`--lora`).

    Args:
        adapter: a tunesmith LoRA adapter or run folder, or a PEFT LoRA folder.
        out_path: the .gguf file to write.
        base: the base model (default: the one the adapter names); only its config is read.
        quant: f32, f16 or bf16 for the A/B tensors.
    """
    from transformers import AutoConfig

    from .peft_format import adapter_folder

    if quant not in LORA_QUANTS:
        raise ExportError(f"quant {quant!r} is not one of {', '.join(LORA_QUANTS)} for a GGUF LoRA")
    dest = _gguf_path(out_path)
    where = adapter_folder(adapter)
    scale, factors, meta = _lora_factors(adapter, where)
    base = base or meta.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{where}: the adapter names no base model; pass the base model (--model)")
    config = AutoConfig.from_pretrained(str(_source_folder(base)))
    check_llama(config, base)
    trained = meta.get("rope")
    if trained is not None and trained["rope_parameters"] != dict(config.rope_parameters or {}):
        raise ExportError(f"{where}: the adapter was trained with other RoPE positions than {base} has "
                          f"({describe_rope(trained)}), which a GGUF LoRA cannot carry; export a merged GGUF "
                          "(--format gguf)")
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ExportError(f"{where}: the layers have different ranks {sorted(ranks)}; a GGUF LoRA has one alpha")
    tensors = lora_tensors(factors, config, where)
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(dest.stem)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * ranks.pop()))
    w.add_file_type(QUANTS[quant][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    size = _write(w, dest, tensors, QUANTS[quant][0], progress, f"GGUF LoRA {quant}")
    return Written(dest, None, len(tensors), size)

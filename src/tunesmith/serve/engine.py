"""Continuous batching on one model: the sequences decoding together and their padded KV cache.

Every decoding step runs all active sequences of a model in one forward pass. The cache is one
left-padded batch, (B, kv_heads, T, head_dim) per layer, with a (B, T) mask of real columns:

- a new group of sequences is prefilled as its own left-padded batch, then joins the running batch
  (the narrower of the two caches is padded on the left, and the rows concatenated);
- a finished sequence leaves by row selection, and columns that are padding in every remaining row
  are trimmed from the left;
- positions are per row (the count of real tokens so far), passed explicitly, so a row's rotary
  positions do not depend on the padding in front of it.

Rebuilding the cache only when membership changes costs one copy per join, against a copy per step
for keeping sequences apart and merging them every step. A row sees exactly the keys of its own
tokens (padding is masked), so its greedy output is the one it gets alone, up to float rounding.

Rows of a base model can carry different LoRA adapters: before each forward the engine tells the
`Route` of its multi-LoRA layers which rows use which adapter (`multilora.py`).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from tunesmith.infer.sampling import next_tokens


@dataclass
class Sequence:
    """One choice of one request: its prompt, settings and what it has generated so far."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: str | None = None  # a LoRA slot of the base model's engine; None: the engine's own weights
    deadline: float = float("inf")  # time.monotonic() after which the sequence ends with "length"
    ids: list[int] = field(default_factory=list)
    finish: str | None = None
    generator: torch.Generator | None = None
    sent: str = ""  # the text already sent to the client
    job: object = None  # the request it belongs to (scheduler.Job), and its choice index there
    index: int = 0
    engine: object = None  # the Engine it decodes on

    def __post_init__(self):
        if self.temperature > 0:
            self.generator = torch.Generator()
            if self.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.seed)


def pick(logits: torch.Tensor, seq: Sequence) -> int:
    """The next token of one row, drawn with the sequence's own seeded generator."""
    return int(next_tokens(logits[None], seq.temperature, seq.top_p, generator=seq.generator)[0])


class Route:
    """Which rows of the current forward use which LoRA adapter; read by every MultiLoRALinear."""

    def __init__(self):
        self.groups: list[tuple[str, torch.Tensor]] = []  # (adapter name, row indices)

    def set(self, adapters: list[str | None], device) -> None:
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(adapters):
            if name is not None:
                by_name.setdefault(name, []).append(i)
        self.groups = [(n, torch.tensor(rows, dtype=torch.long, device=device)) for n, rows in by_name.items()]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    """One model in memory and the batch of sequences decoding on it (owned by the scheduler thread)."""

    def __init__(self, model, pad_id: int, route: Route | None = None):
        if any(DynamicCache(config=model.config).is_sliding):
            # a sliding-window cache drops old columns itself, which the padded batch's mask cannot follow
            raise ValueError(f"{type(model).__name__} uses sliding-window attention: tunesmith serve cannot batch "
                             "it yet (use tunesmith generate)")
        self.model, self.pad_id, self.route = model, pad_id, route
        self.device = next(model.parameters()).device
        # transformers renamed `past_key_values` to `cache` (5.x); the cache object is updated in place either way
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.rows: list[Sequence] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, kv_heads, T, head_dim)
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (B, T): 1 = a real column
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,): the next token's position

    def _forward(self, input_ids, mask, positions, layers, adapters):
        if self.route is not None:
            self.route.set(adapters, self.device)
        cache = DynamicCache(ddp_cache_data=layers or None, config=self.model.config)
        with torch.inference_mode():  # logits of the last column only: the prefill skips the vocabulary head elsewhere
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1].float(), [(layer.keys, layer.values) for layer in cache.layers]

    def join(self, seqs: list[Sequence]) -> torch.Tensor:
        """Prefill `seqs` (one left-padded batch), add them to the running batch; their last logits (n, V)."""
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, layers = self._forward(ids, mask, positions, None, [s.adapter for s in seqs])
        self._merge(seqs, layers, mask, mask.sum(-1))
        return logits

    def _merge(self, seqs, layers, mask, positions) -> None:
        if not self.rows:
            self.rows, self.layers, self.mask, self.positions = list(seqs), layers, mask, positions
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.layers = [(torch.cat([_left_pad(k0, width, 2), _left_pad(k1, width, 2)]),
                        torch.cat([_left_pad(v0, width, 2), _left_pad(v1, width, 2)]))
                       for (k0, v0), (k1, v1) in zip(self.layers, layers)]
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.rows += seqs

    def step(self) -> torch.Tensor:
        """One decoding step of every row (each feeds its last token); the next-token logits (B, V)."""
        last = torch.tensor([[s.ids[-1]] for s in self.rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, self.layers = self._forward(last, mask, self.positions[:, None], self.layers,
                                            [s.adapter for s in self.rows])
        self.mask, self.positions = mask, self.positions + 1
        return logits

    def drop_finished(self) -> None:
        """Remove finished rows from the batch and trim columns no remaining row uses."""
        keep = [i for i, s in enumerate(self.rows) if s.finish is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.layers = [], []
            self.mask, self.positions = self.mask[:0, :0], self.positions[:0]
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask[idx]
        first = int(mask.any(0).long().argmax())  # the first column some remaining row uses
        self.mask = mask[:, first:]
        self.layers = [(k[idx, :, first:], v[idx, :, first:]) for k, v in self.layers]
        self.positions = self.positions[idx]
        self.rows = [self.rows[i] for i in keep]


def now() -> float:
    return time.monotonic()

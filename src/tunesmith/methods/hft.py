"""HFT, Half Fine-Tuning (Hui et al., 2024, arXiv 2404.18466): in each training stage a random half
of the weight matrices trains fully and the other half stays exactly at its previous values.

Category-level draw, per decoder layer (the ACL version, as reimplemented in the SSU repo):
  attention {q, k, v, o}_proj: a random 2 of the 4 train;
  FFN {gate, up, down}_proj: in a random half of the layers 1 of the 3 trains, in the others 2 do.
With equal sizes within each category that is exactly 50% of the attention+FFN weights
((2/4)·A + ((1 + 2)/(3 + 3))·F per layer pair); with grouped-query attention (k, v smaller than
q, o) the attention share depends on the draw, so `describe` reports the exact fraction.
A drawn projection trains whole (its weight and, where it has one, its bias). Embeddings, norms
and lm_head are frozen unless switched on (the paper does not say).

The frozen half acts as a regulariser toward the previous weights: less forgetting of what the
base model knew than full fine-tuning, at about half the optimizer memory and with no new modules
(`output = "model"`, merge is a no-op). Pick it over full fine-tuning when the base model's
knowledge must survive an SFT/DPO stage or a sequence of tasks.

Every training stage draws its own half (the paper: "in each stage"): the draw mixes the seed with
the stage's identity, a fingerprint of the pool's starting weights taken when the method is applied.
SFT then DPO from the SFT model therefore freezes another half, while the same stage started again
(a resumed run rebuilds the model from the same starting weights) draws the same half, on every
process. `redraw="stage"` draws once per stage. `redraw="epoch"` draws afresh every epoch from
(seed, stage, epoch): the whole pool is trainable at attach time, so the optimizer holds it, and
`on_epoch` switches off the half not drawn and drops that half's optimizer state (AdamW skips
parameters without a gradient, so the frozen half stays bit-identical for the epoch, and a matrix
that returns in a later epoch starts with fresh moments, as in a new stage).
"""
from __future__ import annotations

import hashlib
import random
from typing import Literal

import torch
from torch import nn

from ..config import Config
from .base import MethodBase, MethodError
from .catalog import Variant
from .freeze import decoder_blocks, switch_parameters, switch_words

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def layer_projections(model: nn.Module) -> list[dict[str, list[str]]]:
    """Per decoder layer: projection (`q_proj`, ..., `down_proj`) -> its parameter names."""
    blocks = decoder_blocks(model)
    if not blocks:
        raise MethodError("hft: found no decoder layers (a ModuleList named layers, h or blocks) in this model")
    layers = []
    for block_name, block in blocks:
        found: dict[str, list[str]] = {}
        for sub, mod in block.named_modules():
            last = sub.rpartition(".")[2]
            if last in ATTENTION + FFN and last not in found:
                found[last] = [f"{block_name}.{sub}.{p}" for p, _ in mod.named_parameters()]
        missing = [p for p in ATTENTION + FFN if not found.get(p)]
        if missing:
            have = sorted({n.rpartition(".")[2] for n, m in block.named_modules() if isinstance(m, nn.Linear)})
            raise MethodError(f"hft: layer {block_name} has no {', '.join(missing)} (its Linear layers: "
                              f"{', '.join(have) or 'none'}); HFT needs separate q_proj, k_proj, v_proj, o_proj "
                              "and gate_proj, up_proj, down_proj (Llama/Qwen/Mistral naming)")
        layers.append(found)
    return layers


def stage_identity(model: nn.Module, names: set[str], sample: int = 4096) -> str:
    """A fingerprint of the pool's current weights (16 hex digits): name, shape and an evenly strided
    sample of at most `sample` values of each tensor, as fp32 bytes. Cheap on any model size, the same
    on every device and process; meta tensors (a model without weights) count by shape only."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name not in names:
            continue
        h.update(f"{name}:{tuple(p.shape)};".encode())
        if p.is_meta:
            continue
        flat = p.detach().reshape(-1)
        values = flat[::max(1, flat.numel() // sample)][:sample]
        h.update(values.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _single_process() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise MethodError(f"hft.redraw=epoch cannot run with {dist.get_world_size()} processes: DDP/FSDP fix the "
                          "set of trained parameters when they wrap the model, so it cannot change between "
                          "epochs; use hft.redraw=stage")


class HftConfig(Config):
    redraw: Literal["stage", "epoch"] = "stage"
    "Draw the trained half once per training stage (the paper), or afresh every epoch."
    seed: int | None = None
    "Seed of the draw; None uses train.seed."
    embeddings: bool = False
    "Also train the token embeddings (HFT leaves this open; frozen by default)."
    norms: bool = False
    "Also train every norm layer."
    lm_head: bool = False
    "Also train an untied output head."


class HFT(MethodBase):
    """The `hft` method: a seeded half of the attention and FFN projections trains."""

    name = "hft"
    output = "model"
    mergeable = True  # nothing to fold: the weights are the model
    Options = HftConfig
    paper = "Hui et al., 2024 (Half Fine-Tuning)"
    when = "full-tuning quality with less forgetting: a seeded half of each layer's matrices trains"
    variants = {"hft-epoch": Variant(
        {"redraw": "epoch"}, "Hui et al., 2024 (Half Fine-Tuning)",
        "a fresh half every epoch, not one per stage (counted: the pool each half is drawn from)")}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seed: int | None = None
        self.stage: str | None = None  # the fingerprint of the pool's starting weights
        self.epoch: int | None = None  # the epoch of the current draw (redraw=epoch)
        self.plan: list[tuple[str, ...]] = []  # per layer: the projections that train
        self._layers: list[dict[str, list[str]]] = []
        self._pool: set[str] = set()
        self._switches: set[str] = set()
        self._live: set[str] = set()  # parameter names of the current draw

    def apply(self, model: nn.Module) -> None:
        if self.cfg.redraw == "epoch":
            _single_process()
        self._layers = layer_projections(model)
        self._pool = {n for layer in self._layers for names in layer.values() for n in names}
        self._switches = set(switch_parameters(model, self.cfg, "hft"))
        self.seed = self.cfg.seed if self.cfg.seed is not None else torch.initial_seed()
        self.stage = stage_identity(model, self._pool)
        self.epoch = 0 if self.cfg.redraw == "epoch" else None
        self.plan = self.draw(self.epoch)
        self._live = self.drawn()

    def draw(self, epoch: int | None = None) -> list[tuple[str, ...]]:
        """The trained projections of every layer, from (seed, stage) or (seed, stage, epoch) only: a
        private generator, so the draw neither reads nor moves torch's global RNG."""
        key = f"hft:{self.seed}:stage:{self.stage}"
        rng = random.Random(key if epoch is None else f"{key}:epoch:{epoch}")
        n = len(self._layers)
        order = list(range(n))
        rng.shuffle(order)
        n_one = n // 2 + (n % 2 if rng.random() < 0.5 else 0)  # an odd layer count: the middle layer by coin
        one = set(order[:n_one])
        plan = []
        for i in range(n):
            attn = rng.sample(ATTENTION, 2)
            ffn = rng.sample(FFN, 1 if i in one else 2)
            plan.append(tuple(p for p in ATTENTION + FFN if p in attn + ffn))
        return plan

    def drawn(self) -> set[str]:
        """Parameter names of the current draw's projections (switches not included)."""
        return {n for layer, chosen in zip(self._layers, self.plan) for p in chosen for n in layer[p]}

    def is_trainable(self, name: str, param) -> bool:
        if name in self._switches:
            return True
        # redraw=epoch: the whole pool is trainable (the optimizer holds it); on_epoch masks it
        return name in (self._pool if self.cfg.redraw == "epoch" else self._live)

    def on_epoch(self, model: nn.Module, epoch: int, optimizer=None) -> None:
        if self.cfg.redraw != "epoch":
            return
        _single_process()
        self.epoch, self.plan = epoch, self.draw(epoch)
        self._live = self.drawn()
        for name, p in model.named_parameters():
            if name in self._pool:
                p.requires_grad_(name in self._live)
                if name not in self._live:
                    p.grad = None  # no gradient: AdamW leaves it untouched
                    if optimizer is not None:
                        optimizer.state.pop(p, None)  # and it holds no moments for it

    def merge(self, model: nn.Module) -> None:
        return None

    def fractions(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """(trained, total) parameter counts of the current draw: attention, ffn, both, and all
        parameters of the model (switches included)."""
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        live = self._live
        out = {}
        for key, projs in (("attention", ATTENTION), ("ffn", FFN)):
            names = [n for layer in self._layers for p in projs for n in layer[p]]
            out[key] = (sum(sizes[n] for n in names if n in live), sum(sizes[n] for n in names))
        out["attention+ffn"] = (out["attention"][0] + out["ffn"][0], out["attention"][1] + out["ffn"][1])
        out["all"] = (sum(sizes[n] for n in live | self._switches if n in sizes), sum(sizes.values()))
        return out

    def describe(self, model: nn.Module) -> str:
        f = self.fractions(model)

        def pct(key):
            a, b = f[key]
            return f"{a:,}/{b:,} = {100 * a / max(b, 1):.2f}%"

        one = [str(i) for i, chosen in enumerate(self.plan) if sum(p in FFN for p in chosen) == 1]
        draw = "drawn once" if self.epoch is None else f"epoch {self.epoch}'s draw, redrawn every epoch"
        extras = switch_words(model, self.cfg)
        return (f"trains {pct('attention+ffn')} of attention+FFN weights (q,k,v,o: 2 of 4 per layer, "
                f"{pct('attention')}; gate/up/down: 1 of 3 in layers {','.join(one) or 'none'}, 2 of 3 in the "
                f"others, {pct('ffn')}) · {pct('all')} of all parameters"
                f"{' with ' + ' + '.join(extras) if extras else ''} · seed {self.seed}, stage {self.stage}, {draw}")

"""Multi-source knowledge fusion (Kong et al., 2025, "Enabling Flexible Multi-LLM Integration for
Scalable Knowledge Aggregation"): distil K source models into the student through a learned gate.

On every micro-batch the K sources run without gradients. For each sample (a sequence of the
packed rows) and source k:

    reward_k = exp(−CE_k)      CE_k: source k's mean cross-entropy on the sample's trained gold tokens
    p = softmax(gate(reward))  gate: MLP K → 2K → K → K with GELU between the layers
    keep the sources with p_k > threshold (0.15; at least the most probable one), renormalise
    D_t = Σ_k p_k · softmax(z_k,t)                   the fused target at each trained position t
    loss = lm_weight · CE(y_t, z_S) + fuse_weight · CE(D_t, z_S)  per trained token (0.9 / 0.1)
           + balance_weight · cv²(Σ_samples p)                    per micro-batch (0.5)

cv² (variance over mean², over the K sources) of the selected probabilities summed over the
micro-batch's samples pushes the gate to spread samples across sources (a load-balance term).

Granularity: one reward and one gate decision per *sample*, as the reference does (it precomputes
each sequence's mean CE, `metric_ce`, and gates that per-sequence reward).

Where this differs from the released code (ZLKong/LLM_Integration): there the gate (`MOE`) is built
afresh inside `compute_loss` at every step, so its weights are random each step and never learn.
Here the gate is a submodule of the trained model (`model.tunesmith_fusion_gate`, as the
contrastive objective's projector is): the run's optimizer updates it, checkpoints save it and
resume restores it; it is left out of the saved adapter/model and written beside it
(`fusion_gate.safetensors`). It learns through the fused target (CE(D, z_S) is linear in p, so its
gradient favours the sources the student already follows) and the balance term; the rewards are its
input. It trains at the run's learning rate.

    objective:
      name: knowledge_fusion
      knowledge_fusion: {sources: [runs/sql/adapter, runs/json/adapter]}

Sources are model folders or names, or adapter folders tunesmith wrote (loaded as distillation's
teacher is, `distill.load_teacher`). A source with another vocabulary is refused, unless
`cross_vocab: true`: then its distributions are carried over to the student's vocabulary by text
(`vocab_map`: positions aligned where both tokenizers start a token at the same character, each
source token mapped to the student's first token of its string, top-10 renormalised, the gold token
where unaligned; FuseLLM aligns by minimum edit distance instead) and its reward is its own
cross-entropy on its own tokens of the trained text.

The lm_head pass is distillation's (`distill.head_chunks`): only trained positions, `chunk` at a
time, each chunk recomputed in backward; the sources' logits are made from their hidden states inside
it, so no (T, vocab) logits are kept. Each source's head runs twice per chunk (once for the rewards,
once for the fused target), in exchange for that memory.
"""
from __future__ import annotations

import contextlib
import json

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import Config
from ..models.attention import use_attention
from .base import ObjectiveBase, ObjectiveError
from .distill import _same_attention, head_chunks, load_teacher
from .sft import forward_hidden
from .vocab_map import CrossVocabSource

GATE = "tunesmith_fusion_gate"
"The gate's attribute on the trained model."
GATE_FILE = "fusion_gate.safetensors"


class KnowledgeFusionConfig(Config):
    sources: list[str] = []
    "The K source models: model folders or names, or adapter folders tunesmith wrote (that adapter on its base)."
    lm_weight: float = Field(0.9, ge=0)
    "Weight of the next-token cross-entropy on the gold tokens."
    fuse_weight: float = Field(0.1, ge=0)
    "Weight of the cross-entropy to the fused source distribution D = Σ p_k·D_k."
    balance_weight: float = Field(0.5, ge=0)
    "Weight of the gate's load-balance term cv²(Σ p) (per micro-batch)."
    threshold: float = Field(0.15, ge=0, lt=1)
    "Sources whose gate probability is above this are fused (at least the most probable one)."
    cross_vocab: bool = False
    "Fuse sources of another tokenizer, mapped to the student's vocabulary by text (FuseLLM-style); off: refused."


class FusionGate(torch.nn.Module):
    """K rewards → K gate logits: Linear(K, 2K) → GELU → Linear(2K, K) → GELU → Linear(K, K)."""

    def __init__(self, k: int):
        super().__init__()
        self.gate1 = torch.nn.Linear(k, 2 * k)
        self.gate2 = torch.nn.Linear(2 * k, k)
        self.gate3 = torch.nn.Linear(k, k)

    def forward(self, rewards: torch.Tensor) -> torch.Tensor:  # (S, K) -> (S, K)
        return self.gate3(F.gelu(self.gate2(F.gelu(self.gate1(rewards)))))


def attach_gate(model, k: int, seed: int = 0) -> FusionGate:
    """`model.tunesmith_fusion_gate` (made if absent, seeded, fp32): a submodule, so the optimizer,
    gradient clipping, checkpoints and resume see it like any trained parameter."""
    gate = getattr(model, GATE, None)
    if gate is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gate = FusionGate(k)
        setattr(model, GATE, gate.to(device=next(model.parameters()).device, dtype=torch.float32))
        gate = getattr(model, GATE)
    if gate.gate3.out_features != k:
        raise ObjectiveError(f"the model's fusion gate is for {gate.gate3.out_features} sources, not {k}")
    return gate


def select(probs: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """Gate probabilities (S, K) → the kept ones renormalised, the others 0: a source is kept when its
    probability is above `threshold`, and each row keeps at least its most probable source."""
    keep = probs > threshold
    top = probs.argmax(-1, keepdim=True)
    keep = keep | torch.zeros_like(keep).scatter_(-1, top, True)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(x)/mean(x)² (unbiased variance, as the reference); 0 for one entry."""
    if x.numel() < 2:
        return x.sum() * 0.0
    return x.var() / (x.mean() ** 2 + 1e-10)


def sample_index(batch: dict, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For each trained position, which sample (row and segment of the packed batch) it belongs to,
    numbered 0..S−1; and S."""
    segments = batch["segment_ids"][:, 1:]  # the sample of the predicted token
    rows = torch.arange(segments.shape[0], device=segments.device)[:, None].expand_as(segments)
    key = (rows * (int(segments.max()) + 1) + segments)[keep]
    unique, index = torch.unique(key, return_inverse=True)
    return index, unique.numel()


@torch.no_grad()
def source_rewards(heads, hiddens, targets, weights, index, n_samples: int, chunk: int) -> torch.Tensor:
    """reward[s, k] = exp(−CE_k(s)): source k's weighted mean cross-entropy on sample s's trained tokens."""
    chunk = chunk if chunk > 0 else max(targets.numel(), 1)
    totals = weights.new_zeros((n_samples, len(heads)))
    for k, (head, hidden) in enumerate(zip(heads, hiddens)):
        for i in range(0, targets.numel(), chunk):
            sl = slice(i, i + chunk)
            ce = F.cross_entropy(head(hidden[sl]).float(), targets[sl], reduction="none")
            totals[:, k].index_add_(0, index[sl], ce * weights[sl])
    mass = weights.new_zeros(n_samples).index_add_(0, index, weights).clamp_min(1e-12)
    return torch.exp(-totals / mass[:, None])


def _chunk_fusion(head, heads, layout, lm_weight: float, fuse_weight: float, h, targets, weights, p, *per_source):
    """Σ_t w_t·(lm_weight·CE(y_t, z_S) + fuse_weight·Σ_k p_t,k·CE(D_k,t, z_S)) over one chunk;
    Σ_k p_k·CE(D_k, z) = CE(Σ_k p_k·D_k, z): the fused target, without building it. `layout[k]` says
    where source k's rows are: ("dense", j) its hidden states (its head `heads[j]` makes the logits),
    ("sparse", j) ids and probabilities in the student's vocabulary (a source of another family)."""
    log_q = F.log_softmax(head(h).float(), dim=-1)
    loss = lm_weight * F.nll_loss(log_q, targets, reduction="none")
    if fuse_weight:
        n_dense = sum(kind == "dense" for kind, _ in layout)
        for k, (kind, j) in enumerate(layout):
            if kind == "dense":
                with torch.no_grad():
                    d_k = F.softmax(heads[j](per_source[j]).float(), dim=-1)
                ce = -(d_k * log_q).sum(-1)
            else:
                ids, probs = per_source[n_dense + 2 * j], per_source[n_dense + 2 * j + 1]
                ce = -(probs * log_q.gather(-1, ids)).sum(-1)
            loss = loss + fuse_weight * p[:, k] * ce
    return (loss * weights).sum()


def fusion_loss(student, sources: list, gate, batch: dict, *, lm_weight: float = 0.9, fuse_weight: float = 0.1,
                balance_weight: float = 0.5, threshold: float = 0.15, chunk: int = 1024):
    """(loss_sum, n_trained_tokens, metric sums) for a batch from `tunesmith.data.collate`. A source is
    a model with the student's vocabulary, or a `vocab_map.CrossVocabSource`."""
    keep = batch["weights"][:, 1:] > 0  # position t predicts token t+1
    dense = [s for s in sources if not isinstance(s, CrossVocabSource)]
    with torch.no_grad():
        t_hiddens = [forward_hidden(s, batch)[:, :-1][keep] for s in dense]
        sparse = [s.targets(batch, keep) for s in sources if isinstance(s, CrossVocabSource)]
    hidden = forward_hidden(student, batch)
    h = hidden[:, :-1][keep]
    targets = batch["input_ids"][:, 1:][keep]
    w = batch["weights"][:, 1:][keep].to(torch.float32)
    n = int(keep.sum())
    heads = tuple(s.get_output_embeddings() for s in dense)
    index, n_samples = sample_index(batch, keep)
    dense_rewards = source_rewards(heads, t_hiddens, targets, w, index, n_samples, chunk)  # (S, K_dense)
    layout, columns, counts = [], [], {"dense": 0, "sparse": 0}
    for s in sources:
        kind = "sparse" if isinstance(s, CrossVocabSource) else "dense"
        j = counts[kind]
        counts[kind] += 1
        layout.append((kind, j))
        columns.append(dense_rewards[:, j] if kind == "dense" else sparse[j][2])
    rewards = torch.stack(columns, -1)  # (S, K)
    with torch.autocast(rewards.device.type, enabled=False):
        probs = select(F.softmax(gate(rewards), dim=-1), threshold)  # (S, K)
    balance = cv_squared(probs.sum(0))
    rows = (h, targets, w, probs[index], *t_hiddens, *(t for ids, pr, _ in sparse for t in (ids, pr)))
    total = head_chunks(_chunk_fusion, rows, (student.get_output_embeddings(), heads, tuple(layout), lm_weight,
                                              fuse_weight), chunk, hidden)
    total = total + balance_weight * balance * n + 0.0 * probs.sum()  # the gate stays in the graph
    shares = probs.detach()[index]
    metrics = {"fusion/cv2": float(balance.detach()) * n, "fusion/kept": float((shares > 0).sum())}
    for k in range(len(sources)):
        metrics[f"fusion/p{k}"] = float(shares[:, k].sum())
        metrics[f"fusion/reward{k}"] = float(rewards[index, k].sum())
    return total, n, metrics


class KnowledgeFusion(ObjectiveBase):
    """Distillation from K frozen sources through a learned per-sample gate, beside the LM loss."""

    name, unit = "knowledge_fusion", "trained_tokens"
    Options, block = KnowledgeFusionConfig, "knowledge_fusion"
    block_doc = "Options of knowledge_fusion: the source models, the loss weights and the gate's threshold."

    def __init__(self, sources: list, names: list[str] | None = None, cfg: KnowledgeFusionConfig | None = None,
                 chunk: int = 1024):
        self.sources, self.cfg, self.chunk = sources, cfg or KnowledgeFusionConfig(), chunk
        self.names = names or [f"source {k}" for k in range(len(sources))]

    @classmethod
    def build(cls, recipe, model=None, sources=None, **extras):
        """`sources` (models, or `CrossVocabSource`s) replace `objective.knowledge_fusion.sources`; the gate
        is attached to `model` (seeded by train.seed)."""
        cfg = recipe.objective.knowledge_fusion
        names = list(cfg.sources) if sources is None else [f"source {k}" for k in range(len(sources))]
        if sources is None:
            if not cfg.sources:
                raise ObjectiveError("objective.knowledge_fusion.sources is empty: list the source models "
                                     "(model folders or names, or adapter folders)")
            sources = [load_teacher(name, recipe.model.dtype) for name in cfg.sources]
        sources = [_checked(k, s, names[k], model, recipe) for k, s in enumerate(sources)]
        self = cls(sources, names, cfg, recipe.train.loss_chunk)
        if model is not None:
            attach_gate(model, len(sources), seed=recipe.train.seed)
        return self

    def __call__(self, model, batch):
        c = self.cfg
        return fusion_loss(model, self.sources, getattr(model, GATE), batch, lm_weight=c.lm_weight,
                           fuse_weight=c.fuse_weight, balance_weight=c.balance_weight, threshold=c.threshold,
                           chunk=self.chunk)

    @contextlib.contextmanager
    def held_out(self, model):
        """The gate off the model while its weights are written (it is saved beside them)."""
        gate = model._modules.pop(GATE, None)
        try:
            yield
        finally:
            if gate is not None:
                setattr(model, GATE, gate)

    def save_beside(self, folder, model) -> None:
        """The trained gate and the sources it gates, in the saved adapter/model folder."""
        from safetensors.torch import save_file

        gate = getattr(model, GATE, None)
        if gate is None:
            return
        state = {k: v.detach().to("cpu").contiguous() for k, v in gate.state_dict().items()}
        save_file(state, str(folder / GATE_FILE), metadata={"sources": json.dumps(self.names)})

    def report_sections(self, run_dir, rows: list[dict], eval_result) -> list[str]:
        """The sources' mean reward and gate share over the run."""
        logged = [r for r in rows if "fusion/p0" in r]
        if not logged:
            return []
        lines = ["## Knowledge fusion", "", "| source | mean reward exp(−CE) | mean gate share (kept, renormalised) |",
                 "|---|---|---|"]
        for k, name in enumerate(self.names):
            reward = sum(r[f"fusion/reward{k}"] for r in logged) / len(logged)
            share = sum(r[f"fusion/p{k}"] for r in logged) / len(logged)
            lines.append(f"| {name} | {reward:.3f} | {share:.3f} |")
        kept = sum(r["fusion/kept"] for r in logged) / len(logged)
        return ["\n".join(lines + ["", f"Sources kept per token on average: {kept:.2f}."])]


def _checked(k: int, source, name: str, model, recipe):
    """The source frozen, attending as the student does, on the student's device; one of another
    vocabulary refused, or (cross_vocab) wrapped to map its distributions onto the student's."""
    cfg = recipe.objective.knowledge_fusion
    inner = source.model if isinstance(source, CrossVocabSource) else source
    inner.eval().requires_grad_(False)
    if isinstance(source, CrossVocabSource):
        use_attention(inner, "sdpa")  # it runs on its own tokens, one sample at a time
    else:
        _same_attention(inner, recipe.model.attention)
    if model is not None and not isinstance(source, CrossVocabSource) \
            and source.config.vocab_size != model.config.vocab_size:
        if not cfg.cross_vocab:
            raise ObjectiveError(f"objective.knowledge_fusion.sources[{k}] ({name}) has a vocabulary of "
                                 f"{source.config.vocab_size} tokens, the student {model.config.vocab_size}: "
                                 "fusion needs sources with the student's tokenizer (or set "
                                 "objective.knowledge_fusion.cross_vocab=true to map it by text)")
        from ..models.load import load_tokenizer

        use_attention(inner, "sdpa")  # it runs on its own tokens, one sample at a time
        source = CrossVocabSource(inner, load_tokenizer(_tokenizer_name(name)), load_tokenizer(recipe.model.name))
    if model is not None:
        source.to(next(model.parameters()).device)
    return source


def _tokenizer_name(name: str) -> str:
    """The model whose tokenizer a source uses: its base model for an adapter folder."""
    from pathlib import Path

    if (Path(name) / "tunesmith_method.json").is_file():
        from ..export.tuned import read_method

        return read_method(name)[1]["base_model_name_or_path"]
    return name

"""Contrastive embedding training (InfoNCE with in-batch and hard negatives), for encoders and
causal LMs alike, with gradient caching and negatives gathered across processes.

For query i with positive p_i, over the candidates C = every positive of the batch and every hard
negative of the batch (sentence-transformers' MultipleNegativesRankingLoss; scale = 1/τ):

    loss_i = −log softmax_j( sim(q_i, c_j) / τ )[p_i],   sim = cosine (or dot product)

`symmetric` adds the document→query direction (each positive against every query) and averages the
two, as ST's MNRL with directions (query_to_doc, doc_to_query) and partition_mode per_direction.
The objective returns the SUM over queries (one loss unit per query); the harness divides.

    objective:
      name: contrastive
      contrastive: {temperature: 0.05, pooling: mean, bidirectional: true, cache_chunk: 32}

**Batches.** In-batch negatives live inside one micro-batch, so a micro-batch holds whole items:
`load` turns packing off (`data.packing=false`, attention `sdpa`; the resolved recipe shows both),
and `train.batch_size` items make one micro-batch, its texts in padded rows: the queries, then the
positives, then every hard negative. Items are drawn at random (`group_by_length = False`: not
grouped by length, which would make the in-batch negatives a biased sample). `train.grad_accum`
adds micro-batches, not negatives.

**GradCache** (Gao et al., 2021; `cache_chunk` > 0): every text is embedded without a graph,
`cache_chunk` texts at a time; the loss and its gradient with respect to the embeddings are
computed on those detached vectors; backward then re-embeds each chunk with a graph (dropout
replayed from the RNG state saved for it) and pulls the cached gradient through it. The loss the
harness sees is a tensor whose backward does that replay: an autograd Function with the trainable
parameters as inputs, so each parameter receives its gradient once (as DDP expects). Memory is
one chunk's activations instead of the whole batch's; the gradients equal the plain batch's.

**Several processes** (DDP): the embeddings are all-gathered with their gradients, so every rank's
queries see every rank's documents as negatives (the batch is batch_size × processes). Validation
batches use each rank's own negatives.
"""
from __future__ import annotations

import contextlib
import json
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import Config
from ..models.embedding import DOMAINS_FILE, POOLINGS, EmbeddingSpec, attach_projector, embed, save_projector
from ..models.moe import routing
from .base import ObjectiveBase, ObjectiveError



class ContrastiveConfig(Config):
    temperature: float = Field(0.05, gt=0)
    "Softmax temperature τ of the similarities (sentence-transformers' scale = 1/τ: 20 ↔ 0.05)."
    symmetric: bool = False
    "Also the document→query loss (each positive against every query in the batch), averaged with query→document."
    similarity: Literal["cos", "dot"] = "cos"
    "Similarity of query and document vectors: cosine, or the plain dot product."
    pooling: Literal[POOLINGS] = "mean"  # type: ignore[valid-type]
    "How token vectors become one vector: mean, last (token), weighted_mean (by position) or cls."
    bidirectional: bool = False
    "Decoders: every token attends to every token of its text while encoding (generation stays causal)."
    normalize: bool = True
    "Unit-length embeddings (dot product = cosine), as saved in the model's embedding spec."
    projector: bool = False
    "Train a projector Linear(d,d)→ReLU→Linear(d,d) on the pooled vector (saved with the model)."
    max_length: int = Field(256, gt=0)
    "Longest text in tokens (longer texts are cut)."
    query_prefix: str = ""
    "Text put before every query, e.g. `query: ` (E5) or an instruction."
    document_prefix: str = ""
    "Text put before every document (positives, negatives, corpus), e.g. `passage: `."
    loss: Literal["mnr", "mnr_plus"] = "mnr"
    "`mnr`: InfoNCE over in-batch and hard negatives; `mnr_plus` (Hallee et al., 2024): soft in-batch targets, pairs only (equals symmetric mnr under cosine)."
    cache_chunk: int = Field(0, ge=0)
    "GradCache: embed this many texts at a time and cache the embeddings' gradients (0 = the whole batch at once)."


def spec_of(cfg: ContrastiveConfig) -> EmbeddingSpec:
    """The embedding spec the options describe (saved beside the trained weights)."""
    return EmbeddingSpec(pooling=cfg.pooling, bidirectional=cfg.bidirectional, normalize=cfg.normalize,
                         max_length=cfg.max_length, query_prefix=cfg.query_prefix,
                         document_prefix=cfg.document_prefix)


# --------------------------------------------------------------------------------------------------
# the projector


# --------------------------------------------------------------------------------------------------
# the loss on embeddings


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's rows concatenated in rank order, this rank's first row) with gradients flowing
    back to each rank's own rows; ranks may hold different numbers of rows. One process: (x, 0)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x, 0
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))  # all_gather needs one shape on every rank
    parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def similarities(a: torch.Tensor, b: torch.Tensor, similarity: str) -> torch.Tensor:
    """(n, m) similarities in the vectors' own precision: autocast off, since at τ = 0.05 a bf16
    matmul's rounding (~0.4% of a logit of 20) would move the loss visibly."""
    with torch.autocast(a.device.type, enabled=False):
        if similarity == "cos":
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return a @ b.T


def info_nce(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, *, temperature: float = 0.05,
             symmetric: bool = False, similarity: str = "cos", gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query InfoNCE losses (B,) and whether each query ranks its positive first (B,) bool.

    q, p: (B, d) queries and their positives; n: (M, d) the batch's hard negatives (M may be 0).
    Candidates of query i: all positives and all hard negatives (of every rank with `gather`).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 vectors: the softmax in fp32
    q, p, n = q.to(dtype), p.to(dtype), n.to(dtype)
    if gather:
        q_all, offset = gather_with_grad(q)
        p_all, _ = gather_with_grad(p)
        n_all, _ = gather_with_grad(n)
    else:
        q_all, p_all, n_all, offset = q, p, n, 0
    rows = torch.arange(q.shape[0], device=q.device)
    target = rows + offset
    scores = similarities(q, torch.cat([p_all, n_all]), similarity) / temperature  # (B, B_all + M_all)
    positive = scores[rows, target]
    lse = torch.logsumexp(scores, dim=1)
    correct = scores.argmax(dim=1) == target
    if not symmetric:
        return lse - positive, correct
    back = similarities(p, q_all, similarity) / temperature  # (B, B_all): each positive against every query
    return 0.5 * ((lse - positive) + (torch.logsumexp(back, dim=1) - positive)), correct


# --------------------------------------------------------------------------------------------------
# GradCache


class _Replay(torch.autograd.Function):
    """The cached loss as a tensor: forward returns the loss value; backward replays each chunk with
    a graph and returns every trainable parameter's gradient (scaled by the incoming gradient)."""

    @staticmethod
    def forward(ctx, loss, replay, *params):
        ctx.replay = replay
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *ctx.replay(grad_output))


class _RngState:
    """The RNG state before a chunk's first pass, so its replay draws the same dropout masks."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda else []):
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


def _autocast_state(device: torch.device) -> dict:
    kind = device.type
    return {"device_type": kind, "enabled": torch.is_autocast_enabled(kind), "dtype": torch.get_autocast_dtype(kind)}


# --------------------------------------------------------------------------------------------------
# mnr_plus (methods.md §15)


def mnr_plus(a: torch.Tensor, b: torch.Tensor, *, temperature: float = 0.05,
             similarity: str = "cos") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair mnr_plus losses (B,) and whether a ranks its own b first (B,) bool.

    Soft in-batch targets T = softmax((a·aᵀ + b·bᵀ)/2) (similarities within each side); the target
    of row i is argmax_j T[i, j] — its own pair unless another pair is closer on both sides, so a
    near-duplicate pair is not pushed apart — and the loss is ½[CE(a·bᵀ/τ, argmax_row T) +
    CE(b·aᵀ/τ, argmax_row Tᵀ)]. The mean over pairs is the paper's loss; this returns each pair's share.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    logits = similarities(a, b, similarity) / temperature  # (B, B)
    with torch.no_grad():
        soft = torch.softmax((similarities(a, a, similarity) + similarities(b, b, similarity)) / 2, dim=-1)
        rows, cols = soft.argmax(dim=1), soft.T.argmax(dim=1)
    forward = F.cross_entropy(logits, rows, reduction="none")
    backward = F.cross_entropy(logits.T, cols, reduction="none")
    correct = logits.argmax(dim=1) == torch.arange(a.shape[0], device=a.device)
    return 0.5 * (forward + backward), correct


# --------------------------------------------------------------------------------------------------
# the objective


class Contrastive(ObjectiveBase):
    """InfoNCE over (query, positive, hard negatives) items; one loss unit per query."""

    name, unit = "contrastive", "queries"
    Options, block = ContrastiveConfig, "contrastive"
    block_doc = "Options of contrastive: temperature, pooling, bidirectional attention, projector, GradCache."
    loads = "embedder"
    "prepare_model loads the model with `models.embedding.load_any` (encoders as AutoModel, decoders as causal LMs)."
    group_by_length = False
    "Batches are random draws, as sentence-transformers draws them: grouped by length, the in-batch negatives would be too."

    def __init__(self, cfg: ContrastiveConfig | None = None):
        self.cfg = cfg or ContrastiveConfig()
        self.spec = spec_of(self.cfg)
        self.domains: list[str] = []

    @classmethod
    def build(cls, recipe, model=None, **extras):
        """Options from the recipe; the projector is attached (seeded) and weights the embedding
        never reaches (an untied lm_head, BERT's pooler) are frozen: DDP wants a gradient for every
        trainable parameter."""
        self = cls(recipe.objective.contrastive)
        if model is not None:
            self.ready(model, seed=recipe.train.seed)
        return self

    def ready(self, model, seed: int = 0) -> None:
        if self.cfg.projector:
            attach_projector(model, seed)
        unused = [getattr(model, "pooler", None)]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inputs = model.get_input_embeddings()
        if head is not None and head.weight is not inputs.weight:
            unused.append(head)
        for module in unused:
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)

    @classmethod
    def load(cls, recipe, tokenizer):
        """The items; packing off and stock attention (the resolved recipe shows both): a micro-batch
        is `train.batch_size` whole items in padded rows."""
        from ..data.pairs import load_contrastive

        recipe.data.packing = False
        if recipe.model.attention == "packed":
            recipe.model.attention = "sdpa"
        cfg = recipe.objective.contrastive
        return load_contrastive(recipe.data, tokenizer, max_length=cfg.max_length, query_prefix=cfg.query_prefix,
                                document_prefix=cfg.document_prefix, seed=recipe.train.seed)

    # how items batch -----------------------------------------------------------------------------

    def length(self, item) -> int:
        return len(item["query"]) + len(item["positive"]) + sum(len(n) for n in item["negatives"])

    def units(self, item) -> int:
        return 1

    def rows(self, items) -> list:
        """Queries, then positives, then every hard negative: one padded row each."""
        texts = [it["query"] for it in items] + [it["positive"] for it in items]
        texts += [n for it in items for n in it["negatives"]]
        return [{"input_ids": t, "weights": [1.0] * len(t)} for t in texts]

    def finish(self, items, batch: dict) -> dict:
        """The row layout: `n_queries`, each row's item (`owner`) and domain (`text_domain`, -1: none)."""
        owner = list(range(len(items))) * 2 + [i for i, it in enumerate(items) for _ in it["negatives"]]
        batch["attention_mask"] = (batch["segment_ids"] > 0).long()
        batch["n_queries"] = len(items)
        batch["owner"] = torch.tensor(owner, dtype=torch.long)
        batch["text_domain"] = torch.tensor([items[i]["domain"] for i in owner], dtype=torch.long)
        return batch

    def prepare(self, run) -> None:
        """Domain names saved with the run; GradCache's replay does not run under FSDP."""
        if self.cfg.cache_chunk and run.dist.active and run.dist.strategy == "fsdp":
            raise ObjectiveError("objective.contrastive.cache_chunk runs with train.strategy=ddp (or one process), "
                                 "not fsdp: its backward re-runs the model chunk by chunk")
        self.domains = list(getattr(run.splits, "domains", []) or [])
        if self.domains and run.dist.main:
            (run.recipe.run_dir / DOMAINS_FILE).write_text(json.dumps(self.domains) + "\n")

    @contextlib.contextmanager
    def held_out(self, model):
        """The projector off the model while its weights are written (it is saved on its own)."""
        projector = model._modules.pop("tunesmith_projector", None)
        try:
            yield
        finally:
            if projector is not None:
                model.tunesmith_projector = projector

    def save_beside(self, folder, model) -> None:
        """The embedding spec, the projector and the domain names, in the saved model's folder."""
        self.spec.save(folder)
        if getattr(model, "tunesmith_projector", None) is not None:
            save_projector(model, folder)
        if self.domains:
            (folder / DOMAINS_FILE).write_text(json.dumps(self.domains) + "\n")

    # the loss ------------------------------------------------------------------------------------

    def embed_rows(self, model, batch: dict, rows: slice) -> torch.Tensor:
        """(n, d) embeddings of rows `rows` of the batch, trimmed to their longest text."""
        mask = batch["attention_mask"][rows]
        width = max(int(mask.sum(1).max()), 1)
        domains = batch["text_domain"][rows] if "text_domain" in batch else None
        with routing(model, domains):  # domain-expert MoE layers (method moe) pick each text's expert; else no-op
            return embed(model, {"input_ids": batch["input_ids"][rows, :width], "attention_mask": mask[:, :width]},
                         self.spec)

    def loss_from_embeddings(self, emb: torch.Tensor, batch: dict, gather: bool):
        b = batch["n_queries"]
        if self.cfg.loss == "mnr_plus":  # this rank's pairs; hard negatives are not used
            return mnr_plus(emb[:b], emb[b:2 * b], temperature=self.cfg.temperature, similarity=self.cfg.similarity)
        return info_nce(emb[:b], emb[b:2 * b], emb[2 * b:], temperature=self.cfg.temperature,
                        symmetric=self.cfg.symmetric, similarity=self.cfg.similarity, gather=gather)

    def __call__(self, model, batch):
        training = torch.is_grad_enabled()
        if training and self.cfg.cache_chunk:
            total, correct = self._cached(model, batch)
        else:
            if training:
                emb = self.embed_rows(model, batch, slice(None))
            else:  # validation: no graph, chunked; each rank's own negatives (ranks may hold different counts)
                chunk = self.cfg.cache_chunk or batch["input_ids"].shape[0]
                emb = torch.cat([self.embed_rows(model, batch, s) for s in _chunks(batch["input_ids"].shape[0], chunk)])
            losses, correct = self.loss_from_embeddings(emb, batch, training)
            total = losses.sum()
        return total, int(correct.numel()), {"accuracy": float(correct.sum())}

    def _cached(self, model, batch):
        """GradCache: (a loss tensor whose backward replays the chunks, correct flags)."""
        device = batch["input_ids"].device
        chunks = _chunks(batch["input_ids"].shape[0], self.cfg.cache_chunk)
        states, parts = [], []
        with torch.no_grad():
            for s in chunks:
                states.append(_RngState(device))
                parts.append(self.embed_rows(model, batch, s))
        emb = torch.cat(parts).detach().requires_grad_(True)
        with torch.enable_grad():
            losses, correct = self.loss_from_embeddings(emb, batch, True)
            total = losses.sum()
            (grad,) = torch.autograd.grad(total, emb)
        params = [p for p in model.parameters() if p.requires_grad]
        autocast = _autocast_state(device)

        def replay(grad_output):
            out = [torch.zeros_like(p) for p in params]
            for s, state in zip(chunks, states):
                with state.restored(), torch.enable_grad(), torch.autocast(**autocast):
                    part = self.embed_rows(model, batch, s)
                got = torch.autograd.grad(part, params, grad[s] * grad_output, allow_unused=True)
                for acc, g in zip(out, got):
                    if g is not None:
                        acc += g
            return out

        return _Replay.apply(total.detach(), replay, *params), correct

    def report_sections(self, run_dir, rows: list[dict], eval_result) -> list[str]:
        accs = [r["accuracy"] for r in rows if "accuracy" in r]
        if not accs:
            return []
        return [f"## Contrastive training\n\nIn-batch accuracy (the positive ranked first among the batch's "
                f"documents): {accs[0]:.3f} at the first logged step, {accs[-1]:.3f} at the last."]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))]

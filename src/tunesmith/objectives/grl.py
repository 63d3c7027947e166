"""GRL, generation-augmented representation learning (ULLME, Man et al., 2024; methods.md §8), and the
mnr_plus loss of contrastive MoE embeddings (Hallee et al., 2024; methods.md §15).

One decoder does two jobs with the same weights: it *encodes* (bidirectional when
`bidirectional: true`, pooled, as the contrastive objective does) and it *generates*, causally, the
text "{instruction}. Query:\\n{query}\\n\\n{passage}\\n" for the positive and each hard negative. Per query:

    L = λ_CL·L_CL + λ_gen·L_gen + λ_KL·L_KL

- L_CL: the contrastive objective's InfoNCE (in-batch and hard negatives, temperature τ);
- L_gen: `sft`, the mean token NLL of the positive's generation text; or `dpo`, reference-free DPO
  −log σ(β(log π(pos) − log π(neg))) on summed token log-probs, averaged over the query's negatives;
- L_KL = KL(P_gen ‖ P_rt) over the query's candidates (its positive and hard negatives):
  s_gen = the mean token log-prob of a candidate's generation text, P_gen = softmax(s_gen), detached
  (the generator teaches the retriever); P_rt = softmax(sim(q, c)/τ). This is the reference code's
  direction (KLDivLoss(log P_rt, P_gen)); the paper's formula writes the reverse.

Every token of a generation text is predicted (labels on all non-pad tokens, as in ULLME). The KL
and DPO terms need hard negatives in every record; SFT without KL needs none. With GradCache
(`cache_chunk`) both paths replay chunk by chunk: the InfoNCE and KL terms through the embeddings
(the contrastive objective's GradCache), the generation term through the log-probs of its rows
(`cache_chunk` generation texts at a time), so memory is one chunk's activations either way.

    objective:
      name: grl
      grl: {bidirectional: true, gen_loss: dpo, beta: 0.1, kl_weight: 1.0}
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..models.embedding import hidden_states, is_decoder
from .base import ObjectiveError
from .contrastive import Contrastive, ContrastiveConfig, attach_projector, similarities
from .preference import owned_logp_sums

GENERATION_FORMAT = "{instruction}. Query:\n{query}\n\n{passage}\n"


# --------------------------------------------------------------------------------------------------
# the GRL terms, on tensors


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob (n,), predicted tokens (n,)) of each right-padded row under the causal model:
    every real token after the first, predicted from the ones before it. The lm_head runs on
    `chunk` positions at a time and is recomputed in backward, so (tokens, vocab) logits never pile up."""
    hidden = hidden_states(model, input_ids, attention_mask, bidirectional=False)  # (n, T, d), causal
    keep = attention_mask[:, 1:].bool()
    h, targets = hidden[:, :-1][keep], input_ids[:, 1:][keep]
    row = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(keep)[keep]
    total = owned_logp_sums(model.get_output_embeddings(), hidden, h, targets, row, input_ids.shape[0], chunk)
    return total, keep.sum(1)


def generation_loss(logp: torch.Tensor, n_tokens: torch.Tensor, valid: torch.Tensor, kind: str,
                    beta: float) -> torch.Tensor:
    """Per query (B,): `sft` = mean token NLL of the positive (column 0); `dpo` = reference-free DPO
    −log σ(β(log π(pos) − log π(neg))) on summed log-probs, averaged over the query's negatives.

    logp, n_tokens: (B, C) per candidate (positive first); valid: (B, C) which candidates exist."""
    if kind == "sft":
        return -logp[:, 0] / n_tokens[:, 0].clamp(min=1)
    margin = beta * (logp[:, :1] - logp[:, 1:])  # (B, C-1)
    negatives = valid[:, 1:].to(margin.dtype)
    return (-F.logsigmoid(margin) * negatives).sum(1) / negatives.sum(1).clamp(min=1)


def kl_gen_retrieval(s_gen: torch.Tensor, s_rt: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per query (B,): KL(P_gen ‖ P_rt) = Σ_c P_gen(c)·(log P_gen(c) − log P_rt(c)) over the valid
    candidates, P_gen = softmax(s_gen) without gradient, P_rt = softmax(s_rt / τ) — what
    KLDivLoss(log P_rt, P_gen) computes per row. s_gen: mean token log-probs; s_rt: similarities."""
    neg_inf = torch.finfo(torch.float32).min
    log_gen = torch.log_softmax(s_gen.detach().float().masked_fill(~valid, neg_inf), dim=-1)
    log_rt = torch.log_softmax((s_rt.float() / temperature).masked_fill(~valid, neg_inf), dim=-1)
    return (log_gen.exp() * (log_gen - log_rt)).masked_fill(~valid, 0.0).sum(-1)


# --------------------------------------------------------------------------------------------------
# the objective


class GrlConfig(ContrastiveConfig):
    cl_weight: float = Field(1.0, ge=0)
    "λ_CL: weight of the contrastive (InfoNCE) loss."
    gen_weight: float = Field(1.0, ge=0)
    "λ_gen: weight of the generation loss (gen_loss)."
    kl_weight: float = Field(1.0, ge=0)
    "λ_KL: weight of KL(P_gen ‖ P_rt), the generator's ranking of the candidates taught to the retriever."
    gen_loss: Literal["dpo", "sft"] = "dpo"
    "`dpo`: reference-free DPO, positive over each hard negative; `sft`: NLL of the positive's generation text."
    beta: float = Field(0.1, gt=0)
    "β of the DPO generation loss."
    instruction: str = "Please write a passage that answers the query"
    "Instruction opening each generation text `{instruction}. Query:\\n{query}\\n\\n{passage}\\n`."
    gen_max_length: int = Field(512, gt=0)
    "Longest generation text in tokens (longer ones are cut)."


class GRL(Contrastive):
    """Contrastive + generation + KL(P_gen ‖ P_rt) on one decoder (ULLME's GRL); one loss unit per query."""

    name, unit = "grl", "queries"
    Options, block = GrlConfig, "grl"
    block_doc = "Options of grl: the contrastive options plus the λ weights, the generation loss and its text."

    @classmethod
    def build(cls, recipe, model=None, **extras):
        self = cls(recipe.objective.grl)
        if model is not None:
            self.ready(model, seed=recipe.train.seed)
        return self

    def ready(self, model, seed: int = 0) -> None:
        """GRL generates with the model's own lm_head, so a decoder is required and nothing is frozen."""
        if not is_decoder(model) or model.get_output_embeddings() is None:
            raise ObjectiveError(f"objective grl needs a causal LM (it generates with the same weights); "
                                 f"{type(model).__name__} is an encoder: use objective.name=contrastive")
        if self.cfg.projector:
            attach_projector(model, seed)

    @property
    def needs_negatives(self) -> bool:
        return self.cfg.gen_loss == "dpo" or self.cfg.kl_weight > 0

    @classmethod
    def load(cls, recipe, tokenizer):
        """The contrastive items, each with the token ids of its candidates' generation texts."""
        from ..data.pairs import PairDataError, PairSplits, domain_ids, read_pair_records, tokenize_items

        recipe.data.packing = False
        if recipe.model.attention == "packed":
            recipe.model.attention = "sdpa"
        cfg = recipe.objective.grl
        train_records, val_records, val_name = read_pair_records(recipe.data, recipe.train.seed)
        domains = domain_ids(train_records + (val_records or []))
        options = {"max_length": cfg.max_length, "query_prefix": cfg.query_prefix, "document_prefix": cfg.document_prefix}
        needs_negatives = cfg.gen_loss == "dpo" or cfg.kl_weight > 0
        splits, stats = {}, {}
        for split, records, name in (("train", train_records, recipe.data.train), ("val", val_records, val_name)):
            if records is None:
                splits[split] = None
                continue
            if needs_negatives and (bad := next((r for r in records if not r.negatives), None)) is not None:
                raise PairDataError(f"{bad.where}: objective grl with gen_loss={cfg.gen_loss} and kl_weight="
                                    f"{cfg.kl_weight:g} needs hard negatives in every record (field 'negative' or "
                                    "'negatives'); mine them, or set gen_loss=sft and kl_weight=0")
            items, stats[split] = tokenize_items(records, tokenizer, domains, name=str(name), **options)
            for item, record in zip(items, records):
                item["gen"] = _generation_ids(tokenizer, cfg, record)
            splits[split] = items
        return PairSplits(train=splits["train"], val=splits["val"], stats=stats, domains=domains)

    # how items batch: the contrastive rows, then the generation rows ----------------------------

    def _gen_rows(self, item) -> list[list[int]]:
        return item["gen"] if self.needs_negatives else item["gen"][:1]

    def length(self, item) -> int:
        return super().length(item) + sum(len(g) for g in self._gen_rows(item))

    def rows(self, items) -> list:
        gen = [g for it in items for g in self._gen_rows(it)]
        return super().rows(items) + [{"input_ids": g, "weights": [1.0] * len(g)} for g in gen]

    def finish(self, items, batch: dict) -> dict:
        """Split off the generation rows (`gen_input_ids`, `gen_attention_mask`); `candidates` (B, C)
        indexes each query's positive and negatives among the document rows, `gen_index` (B, C) their
        generation rows (-1: no such candidate)."""
        n_embed = 2 * len(items) + sum(len(it["negatives"]) for it in items)
        gen_mask = (batch["segment_ids"][n_embed:] > 0).long()
        width = max(int(gen_mask.sum(1).max()), 1) if gen_mask.numel() else 1
        gen = {"gen_input_ids": batch["input_ids"][n_embed:, :width], "gen_attention_mask": gen_mask[:, :width]}
        batch = {k: (v[:n_embed] if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch = super().finish(items, batch)
        width = 1 + max(len(it["negatives"]) for it in items)
        candidates = torch.full((len(items), width), -1, dtype=torch.long)
        gen_index = torch.full((len(items), width), -1, dtype=torch.long)
        neg_row, gen_row = len(items), 0  # document rows count from the first positive
        for i, it in enumerate(items):
            candidates[i, 0] = i
            for k in range(len(it["negatives"])):
                candidates[i, 1 + k] = neg_row
                neg_row += 1
            for k in range(len(self._gen_rows(it))):
                gen_index[i, k] = gen_row
                gen_row += 1
        return {**batch, **gen, "candidates": candidates, "gen_index": gen_index}

    # the loss -----------------------------------------------------------------------------------

    def generation_terms(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(generation loss per query (B,), s_gen (B, C) mean token log-probs, valid (B, C))."""
        logp_rows, n_rows = sequence_logps(model, batch["gen_input_ids"], batch["gen_attention_mask"])
        return self._gen_from_rows(logp_rows, n_rows, batch)

    def _gen_from_rows(self, logp_rows: torch.Tensor, n_rows: torch.Tensor, batch: dict):
        index = batch["gen_index"]
        valid = index >= 0
        safe = index.clamp(min=0)
        logp, n_tokens = logp_rows[safe] * valid, n_rows[safe] * valid
        loss = generation_loss(logp, n_tokens, valid, self.cfg.gen_loss, self.cfg.beta)
        return loss, logp / n_tokens.clamp(min=1), valid

    def _cached_generation(self, model, batch: dict):
        """GradCache for the generation rows (`cache_chunk` rows at a time): log-probs without a graph,
        the loss's gradient with respect to them, then a backward that replays each chunk with a graph
        (dropout replayed) — as the contrastive objective does for its embeddings. Returns (the
        λ_gen-weighted loss tensor, generation loss per query (detached), s_gen, valid)."""
        from .contrastive import _autocast_state, _chunks, _Replay, _RngState

        ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]
        chunks = _chunks(ids.shape[0], self.cfg.cache_chunk)
        states, sums, counts = [], [], []
        with torch.no_grad():
            for sl in chunks:
                states.append(_RngState(ids.device))
                total, n = sequence_logps(model, ids[sl], mask[sl])
                sums.append(total)
                counts.append(n)
        logp_rows = torch.cat(sums).detach().requires_grad_(True)
        with torch.enable_grad():
            loss, s_gen, valid = self._gen_from_rows(logp_rows, torch.cat(counts), batch)
            weighted = self.cfg.gen_weight * loss.sum()
            (grad,) = torch.autograd.grad(weighted, logp_rows)
        params = [p for p in model.parameters() if p.requires_grad]
        autocast = _autocast_state(ids.device)

        def replay(grad_output):
            out = [torch.zeros_like(p) for p in params]
            for sl, state in zip(chunks, states):
                with state.restored(), torch.enable_grad(), torch.autocast(**autocast):
                    part, _ = sequence_logps(model, ids[sl], mask[sl])
                got = torch.autograd.grad(part, params, grad[sl] * grad_output, allow_unused=True)
                for acc, g in zip(out, got):
                    if g is not None:
                        acc += g
            return out

        return _Replay.apply(weighted.detach(), replay, *params), loss.detach(), s_gen.detach(), valid

    def loss_from_embeddings(self, emb: torch.Tensor, batch: dict, gather: bool):
        """λ_CL·InfoNCE + λ_KL·KL(P_gen ‖ P_rt) per query; P_gen comes in the batch (`s_gen`), fixed."""
        cl, correct = super().loss_from_embeddings(emb, batch, gather)
        b = batch["n_queries"]
        kl = torch.zeros_like(cl)
        if self.cfg.kl_weight > 0:
            index = batch["candidates"]
            valid = (index >= 0) & batch["s_gen_valid"]
            sims = similarities(emb[:b].to(torch.float32), emb[b:].to(torch.float32), self.cfg.similarity)
            s_rt = sims.gather(1, index.clamp(min=0))  # (B, C)
            kl = kl_gen_retrieval(batch["s_gen"], s_rt, valid, self.cfg.temperature)
        self._parts = {"cl": float(cl.detach().sum()), "kl": float(kl.detach().sum())}
        return self.cfg.cl_weight * cl + self.cfg.kl_weight * kl, correct

    def __call__(self, model, batch):
        if torch.is_grad_enabled() and self.cfg.cache_chunk:
            weighted, gen_loss, s_gen, valid = self._cached_generation(model, batch)
        else:
            gen_loss, s_gen, valid = self.generation_terms(model, batch)
            weighted = self.cfg.gen_weight * gen_loss.sum()
        batch = {**batch, "s_gen": s_gen.detach(), "s_gen_valid": valid}
        total, units, metrics = super().__call__(model, batch)
        metrics = {**metrics, "loss_cl": self._parts["cl"], "loss_kl": self._parts["kl"],
                   "loss_gen": float(gen_loss.detach().sum())}
        return total + weighted, units, metrics


def _generation_ids(tokenizer, cfg: GrlConfig, record) -> list[list[int]]:
    """Token ids of the generation text of each candidate of a record (positive first), cut to gen_max_length."""
    texts = [GENERATION_FORMAT.format(instruction=cfg.instruction, query=record.query, passage=p)
             for p in (record.positive, *record.negatives)]
    enc = tokenizer(texts, truncation=True, max_length=cfg.gen_max_length, add_special_tokens=True)
    return [list(ids) for ids in enc["input_ids"]]

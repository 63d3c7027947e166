"""A fusion source of another model family: its next-token distributions carried over to the
student's vocabulary, after FuseLLM (Wan et al., 2024, "Knowledge Fusion of Large Language Models").

The two tokenizers cut the same text differently. FuseLLM aligns the two token sequences by
minimum edit distance and maps each source token to the student token of the nearest string. Here
both steps use the text itself:

- Positions: each sample's student tokens are decoded to text, the source tokenizer cuts that text,
  and a student position is aligned with a source position when both predict a token that starts at
  the same character (leading whitespace skipped: byte-level BPE and SentencePiece put the space on
  different sides). Exact where FuseLLM's edit distance is approximate; positions without a partner
  get the one-hot gold token, as FuseLLM does for unaligned tokens.
- Vocabulary: a source token maps to the student's first token of the same string (so the mass of
  " Paris" goes to the student's " Par" if that is how the student starts " Paris"). Control tokens and
  partial UTF-8 bytes map nowhere. The source's top-k (FuseLLM: 10) probabilities are mapped, those
  that land nowhere dropped, and the rest renormalised.
- Quality: the source's own cross-entropy on its own tokens of the sample's trained text (tokens that
  start inside a trained student token), as the reference computes each model's `metric_ce` on its own
  tokenization.
- A sample whose decoded text does not cut back into the same student tokens (rare: text that decodes
  ambiguously) gets the gold token at every position, and its reward is taken over all its text.

Building the vocabulary map decodes every source token once (tens of seconds for a 262k vocabulary).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TOP_K = 10


def token_strings(tokenizer) -> list[str | None]:
    """The text each token id stands for, its leading space kept (decoded after an anchor token,
    which SentencePiece would otherwise strip); None for control tokens and partial UTF-8 bytes."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[0]
    prefix = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode([[anchor, i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    out: list[str | None] = []
    for i, text in enumerate(texts):
        body = text[len(prefix):] if text.startswith(prefix) else None
        out.append(None if i in special or not body or "\ufffd" in body else body)
    return out


def vocabulary_map(source_tokenizer, student_tokenizer) -> torch.Tensor:
    """(source vocab,) long: the student's first token of each source token's string, −1 for none."""
    strings = token_strings(source_tokenizer)
    present = [i for i, s in enumerate(strings) if s is not None]
    firsts = student_tokenizer([strings[i] for i in present], add_special_tokens=False)["input_ids"]
    mapping = torch.full((len(strings),), -1, dtype=torch.long)
    for i, ids in zip(present, firsts):
        if ids:
            mapping[i] = ids[0]
    return mapping


def _starts(text: str, offsets) -> list[int]:
    """Each token's first non-space character (−1 for tokens with no text, e.g. <bos>)."""
    out = []
    for a, b in offsets:
        if a == b:
            out.append(-1)
            continue
        s = a
        while s < b and text[s].isspace():
            s += 1
        out.append(s if s < b else a)
    return out


class CrossVocabSource:
    """A source model with another tokenizer, seen through the student's vocabulary."""

    def __init__(self, model, tokenizer, student_tokenizer, top_k: int = TOP_K, chunk: int = 256):
        self.model, self.tokenizer, self.student_tokenizer = model, tokenizer, student_tokenizer
        self.top_k, self.chunk = top_k, chunk
        self.mapping = vocabulary_map(tokenizer, student_tokenizer)

    def to(self, device):
        self.model.to(device)
        self.mapping = self.mapping.to(device)
        return self

    @torch.no_grad()
    def targets(self, batch: dict, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the trained positions (`keep`, row-major): ids (n, k) and probabilities (n, k) of the
        mapped source distribution in the student's vocabulary (the gold token with probability 1
        where unaligned); and the per-sample reward exp(−CE) in `sample_index` order."""
        ids_all, weights = batch["input_ids"], batch["weights"]
        B, T = ids_all.shape
        k = self.top_k
        ids = torch.zeros(B, T - 1, k, dtype=torch.long, device=ids_all.device)
        ids[..., 0] = ids_all[:, 1:]
        probs = torch.zeros(B, T - 1, k, device=ids_all.device)
        probs[..., 0] = 1.0
        rewards = []
        for b, c0, c1 in samples_of(batch, keep):
            reward = self._sample(ids_all[b, c0:c1].tolist(), weights[b, c0:c1].tolist(),
                                  ids[b, c0:c1 - 1], probs[b, c0:c1 - 1])
            rewards.append(reward)
        return ids[keep], probs[keep], torch.tensor(rewards, device=ids_all.device, dtype=torch.float32)

    def _sample(self, s_ids: list[int], s_weights: list[float], ids: torch.Tensor, probs: torch.Tensor) -> float:
        """Fill one sample's rows of `ids`/`probs` (position t predicts student token t+1) and return its reward."""
        text = self.student_tokenizer.decode(s_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        mine = self.student_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        aligned = mine["input_ids"] == s_ids  # the text cuts back into the sample's tokens
        src = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        src_ids, src_starts = src["input_ids"], _starts(text, src["offset_mapping"])
        trained_chars = set()
        if aligned:
            for (a, b), w in zip(mine["offset_mapping"], s_weights):
                if w > 0:
                    trained_chars.update(range(a, b))
        scored = [j for j in range(1, len(src_ids)) if src_starts[j] in trained_chars] or list(range(1, len(src_ids)))
        by_start = {}
        for j in range(1, len(src_ids)):
            if src_starts[j] >= 0:
                by_start.setdefault(src_starts[j], j - 1)  # source position j−1 predicts token j
        pairs = []
        if aligned:
            s_starts = _starts(text, mine["offset_mapping"])
            pairs = [(t, by_start[s_starts[t + 1]]) for t in range(len(s_ids) - 1)
                     if s_weights[t + 1] > 0 and s_starts[t + 1] in by_start]
        wanted = sorted({j - 1 for j in scored} | {i for _, i in pairs})
        logp = self._log_probs(src_ids, wanted)
        row = {i: r for r, i in enumerate(wanted)}
        ce = [-float(logp[row[j - 1], src_ids[j]]) for j in scored]
        for t, i in pairs:
            top_p, top_i = logp[row[i]].exp().topk(self.top_k)
            mapped = self.mapping[top_i]
            top_p = torch.where(mapped >= 0, top_p, torch.zeros_like(top_p))
            if float(top_p.sum()) > 0:
                ids[t], probs[t] = mapped.clamp_min(0), top_p / top_p.sum()
        return float(torch.exp(-torch.tensor(sum(ce) / len(ce)))) if ce else 0.0

    def _log_probs(self, src_ids: list[int], positions: list[int]) -> torch.Tensor:
        """log-softmax of the source's next-token logits at `positions` (the head in chunks)."""
        device = next(self.model.parameters()).device
        body = getattr(self.model, self.model.base_model_prefix)
        hidden = body(input_ids=torch.tensor([src_ids], device=device), use_cache=False).last_hidden_state[0]
        head, cap = self.model.get_output_embeddings(), getattr(self.model.config, "final_logit_softcapping", None)
        out = []
        for i in range(0, len(positions), self.chunk):
            logits = head(hidden[positions[i:i + self.chunk]]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            out.append(F.log_softmax(logits, dim=-1))
        return torch.cat(out) if out else hidden.new_zeros((0, head.out_features))


def samples_of(batch: dict, keep: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, first column, end column) of every sample with a trained position, in `sample_index` order
    (row by row, segments in order)."""
    segments = batch["segment_ids"]
    out = []
    for b in range(segments.shape[0]):
        trained = set(segments[b, 1:][keep[b]].tolist())
        for s in sorted(trained):
            cols = (segments[b] == s).nonzero().flatten()
            out.append((b, int(cols[0]), int(cols[-1]) + 1))
    return out

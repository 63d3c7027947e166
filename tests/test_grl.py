"""GRL (ULLME; methods.md §8) and mnr_plus (§15): each term against a hand computation on fixed
inputs, the KL direction, gradients through both the encoding and the generation path, an
end-to-end run."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_model, train_losses
from tunesmith.data.batching import collate
from tunesmith.data.pairs import PairRecord, tokenize_items
from tunesmith.objectives.base import ObjectiveError
from tunesmith.objectives.contrastive import info_nce, mnr_plus
from tunesmith.objectives.grl import (GENERATION_FORMAT, GRL, GrlConfig, generation_loss, kl_gen_retrieval,
                                      sequence_logps, _generation_ids)
from tunesmith.recipe import load_recipe
from tunesmith.train.loop import train

# --------------------------------------------------------------------------------------------------
# mnr_plus


def _ce(row, target):
    return math.log(sum(math.exp(x) for x in row)) - row[target]


def _softmax_argmax(row):
    return max(range(len(row)), key=lambda j: row[j])  # softmax keeps the order


def test_mnr_plus_matches_its_formula_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.6, 0.8], [0.96, 0.28], [-0.28, 0.96]], dtype=torch.float64)  # b0 is nearer a1 than a0
    tau = 0.5
    got, correct = mnr_plus(a, b, temperature=tau, similarity="dot")
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    A, B = a.tolist(), b.tolist()
    n = len(A)
    logits = [[dot(A[i], B[j]) / tau for j in range(n)] for i in range(n)]
    soft = [[(dot(A[i], A[j]) + dot(B[i], B[j])) / 2 for j in range(n)] for i in range(n)]
    t = [[math.exp(x) / sum(math.exp(y) for y in row) for x in row] for row in soft]
    want = []
    for i in range(n):
        fwd = _ce(logits[i], _softmax_argmax(t[i]))
        col = [t[r][i] for r in range(n)]  # row i of Tᵀ
        bwd = _ce([logits[r][i] for r in range(n)], _softmax_argmax(col))
        want.append(0.5 * (fwd + bwd))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert correct.tolist() == [logits[i].index(max(logits[i])) == i for i in range(n)]


def test_mnr_plus_is_symmetric_mnr_under_cosine_and_moves_targets_under_dot():
    """With unit vectors a text is most similar to itself, so every soft target is the row's own pair
    and mnr_plus equals symmetric MNR; with the dot product a longer vector can be the closer
    one, which moves that row's target off the diagonal."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 6, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    plus, _ = mnr_plus(a, b, temperature=0.05)
    mnr, _ = info_nce(a, b, a[:0], temperature=0.05, symmetric=True, gather=False)
    torch.testing.assert_close(plus, mnr)
    a = torch.tensor([[1.0, 0.0], [3.0, 0.3], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [3.0, 0.2], [0.0, 1.0]], dtype=torch.float64)  # pair 1 outscores pair 0 on row 0
    plus, _ = mnr_plus(a, b, temperature=1.0, similarity="dot")
    mnr, _ = info_nce(a, b, a[:0], temperature=1.0, symmetric=True, gather=False, similarity="dot")
    logits = a @ b.T
    t = torch.softmax((a @ a.T + b @ b.T) / 2, dim=-1)
    assert int(t[0].argmax()) == 1 and int(t[:, 0].argmax()) == 2  # both of row 0's targets leave the diagonal
    assert abs(float(plus[0]) - 0.5 * (_ce(logits[0].tolist(), 1) + _ce(logits[:, 0].tolist(), 2))) < 1e-9
    assert abs(float(plus[0] - mnr[0])) > 0.1
    torch.testing.assert_close(plus[2], mnr[2])


# --------------------------------------------------------------------------------------------------
# the GRL terms


def test_generation_losses_by_hand():
    logp = torch.tensor([[-6.0, -9.0, -4.0], [-3.0, -5.0, 0.0]])
    n_tok = torch.tensor([[3, 3, 2], [2, 4, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    sft = generation_loss(logp, n_tok, valid, "sft", 0.1)
    torch.testing.assert_close(sft, torch.tensor([2.0, 1.5]))
    dpo = generation_loss(logp, n_tok, valid, "dpo", 0.1)
    nls = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    want = [(nls(0.1 * (-6 + 9)) + nls(0.1 * (-6 + 4))) / 2, nls(0.1 * (-3 + 5))]
    torch.testing.assert_close(dpo, torch.tensor(want))


def test_kl_is_gen_to_retrieval_as_kldivloss_computes_it():
    s_gen = torch.tensor([[-1.0, -2.0, -1.5], [-0.5, -3.0, -9.0]])
    s_rt = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.4, 0.3]], requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    tau = 0.05
    got = kl_gen_retrieval(s_gen, s_rt, valid, tau)
    # row 0 with every candidate: torch's KLDivLoss(input=log P_rt, target=P_gen)
    ref0 = torch.nn.KLDivLoss(reduction="sum")(torch.log_softmax(s_rt[0] / tau, -1), torch.softmax(s_gen[0], -1))
    torch.testing.assert_close(got[0], ref0)
    p, q = torch.softmax(s_gen[1, :2], -1), torch.softmax(s_rt[1, :2] / tau, -1)  # row 1: two candidates
    torch.testing.assert_close(got[1], (p * (p.log() - q.log())).sum())
    reverse = (q * (q.log() - p.log())).sum()  # the paper's direction differs
    assert abs(float(got[1].detach() - reverse.detach())) > 1e-2
    s_gen_grad = s_gen.clone().requires_grad_(True)
    kl_gen_retrieval(s_gen_grad, s_rt, valid, tau).sum().backward()
    assert s_gen_grad.grad is None  # P_gen is a fixed target
    assert s_rt.grad is not None and s_rt.grad.abs().sum() > 0


def test_sequence_logps_matches_the_causal_lm_loss(tokenizer):
    model = make_tiny_model(tokenizer)
    ids = torch.randint(5, 1000, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    with torch.no_grad():
        total, n = sequence_logps(model, ids, mask, chunk=5)
        for r in range(3):
            length = int(mask[r].sum())
            out = model(ids[r:r + 1, :length], labels=ids[r:r + 1, :length])
            assert int(n[r]) == length - 1
            torch.testing.assert_close(total[r], -out.loss * (length - 1), atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# the objective on one batch

WORDS = ["apple", "river", "castle", "violin", "desert", "rocket"]


def records(negatives=1):
    return [PairRecord(f"toy:{i}", f"what is the {w}", f"the {w} is described here",
                       [f"the {WORDS[(i + k + 1) % len(WORDS)]} again" for k in range(negatives + i % 2)], None)
            for i, w in enumerate(WORDS[:4])]


def batch_for(tokenizer, cfg, recs):
    items = tokenize_items(recs, tokenizer, [], max_length=32)[0]
    for item, r in zip(items, recs):
        item["gen"] = _generation_ids(tokenizer, cfg, r)
    obj = GRL(cfg)
    return obj, obj.finish(items, collate(obj.rows(items), packing=False, pad_id=tokenizer.pad_token_id)), items


def test_generation_text_and_layout(tokenizer):
    cfg = GrlConfig(instruction="Write it")
    obj, batch, items = batch_for(tokenizer, cfg, records())
    text = tokenizer.decode(batch["gen_input_ids"][0][batch["gen_attention_mask"][0].bool()], skip_special_tokens=True)
    assert text == GENERATION_FORMAT.format(instruction="Write it", query="what is the apple", passage="the apple is described here")
    n_docs = sum(2 + len(it["negatives"]) for it in items)
    assert batch["input_ids"].shape[0] == n_docs and batch["n_queries"] == 4
    assert batch["gen_input_ids"].shape[0] == sum(1 + len(it["negatives"]) for it in items)
    assert batch["candidates"].tolist()[1] == [1, 5, 6]  # item 1: positive row 1, negatives rows 5, 6 (after the positives)
    sft = batch_for(tokenizer, GrlConfig(gen_loss="sft", kl_weight=0), records())[1]
    assert sft["gen_input_ids"].shape[0] == 4  # SFT without KL: the positives only


def test_objective_sums_the_three_terms_by_hand(tokenizer):
    cfg = GrlConfig(cl_weight=0.7, gen_weight=0.3, kl_weight=2.0, bidirectional=True, temperature=0.1)
    obj, batch, items = batch_for(tokenizer, cfg, records())
    model = make_tiny_model(tokenizer)
    obj.ready(model)
    with torch.no_grad():
        total, units, metrics = obj(model, batch)
        emb = obj.embed_rows(model, batch, slice(None))
        b = 4
        cl, _ = info_nce(emb[:b], emb[b:2 * b], emb[2 * b:], temperature=0.1, gather=False)
        logp, n = sequence_logps(model, batch["gen_input_ids"], batch["gen_attention_mask"])
        gen, kl, row = [], [], 0
        for i, it in enumerate(items):
            c = 1 + len(it["negatives"])
            lp, nt = logp[row:row + c], n[row:row + c]
            row += c
            gen.append(sum(-F.logsigmoid(0.1 * (lp[0] - lp[k])) for k in range(1, c)) / (c - 1))
            docs = emb[b + batch["candidates"][i, :c]]  # candidates count document rows from the first positive
            p_gen = torch.softmax(lp / nt, -1)
            p_rt = torch.softmax(F.cosine_similarity(emb[i:i + 1], docs) / 0.1, -1)
            kl.append((p_gen * (p_gen.log() - p_rt.log())).sum())
    want = 0.7 * cl.sum() + 0.3 * sum(gen) + 2.0 * sum(kl)
    assert units == 4
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
    assert metrics["loss_kl"] > 0 and metrics["loss_gen"] > 0
    torch.testing.assert_close(torch.tensor(metrics["loss_cl"]), cl.sum(), atol=1e-5, rtol=1e-5)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_gradients_flow_through_both_paths_and_gradcache_agrees(tokenizer):
    """Generation only (λ_gen) and retrieval only (λ_CL, λ_KL) each move the weights; all three
    together give the sum of their gradients (P_gen stays a constant in the KL term); GradCache gives
    the same gradients as the plain batch."""
    recs = records()

    def grads(cache_chunk=0, **weights):
        cfg = GrlConfig(bidirectional=True, cache_chunk=cache_chunk, **weights)
        obj, batch, _ = batch_for(tokenizer, cfg, recs)
        model = make_tiny_model(tokenizer).train()
        obj.ready(model)
        loss, _, _ = obj(model, batch)
        loss.backward()
        return _grads(model)

    gen_only = grads(cl_weight=0, kl_weight=0, gen_weight=1)
    kl_only = grads(cl_weight=0, kl_weight=1, gen_weight=0)
    cl_only = grads(cl_weight=1, kl_weight=0, gen_weight=0)
    all_three = grads()
    cached = grads(cache_chunk=5)
    head = "model.embed_tokens.weight"  # tied lm_head: both paths reach it
    assert gen_only[head].abs().sum() > 0 and kl_only[head].abs().sum() > 0
    for k in all_three:
        scale = float(all_three[k].abs().max()) or 1.0
        torch.testing.assert_close(all_three[k], gen_only[k] + kl_only[k] + cl_only[k], atol=2e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(cached[k], all_three[k], atol=2e-5 * scale, rtol=1e-4)
    # the generation path's gradient differs from the retrieval path's (causal LM vs pooled encoding)
    layer = "model.layers.0.mlp.down_proj.weight"
    assert (gen_only[layer] - kl_only[layer]).abs().max() > 1e-6


def test_encoders_are_refused(tokenizer):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64))
    with pytest.raises(ObjectiveError, match="needs a causal LM"):
        GRL(GrlConfig()).ready(bert)


# --------------------------------------------------------------------------------------------------
# end to end


def write_triplets(path, negatives=True):
    rows = [{"query": f"tell me about the {w}", "positive": f"the {w} is described here",
             **({"negative": f"the {WORDS[(i + 3) % len(WORDS)]} is described here"} if negatives else {})}
            for i, w in enumerate(WORDS * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_end_to_end(tmp_path, tiny_model_dir):
    recipe = load_recipe(None, [
        f"model.name={tiny_model_dir}", f"data.train={write_triplets(tmp_path / 't.jsonl')}", "objective.name=grl",
        f"output_dir={tmp_path / 'runs'}", "name=g", "train.steps=8", "train.batch_size=6", "train.precision=fp32",
        "train.lr=5e-3", "train.warmup=0", "train.schedule=constant", "objective.grl.bidirectional=true",
        "objective.grl.max_length=24", "objective.grl.gen_max_length=48", "data.val_fraction=0"])
    result = train(recipe)
    assert result.status == "completed"
    losses = train_losses(result.run_dir)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert (result.output / "tunesmith_embedding.json").is_file()


def test_kl_or_dpo_without_negatives_is_a_clear_error(tmp_path, tiny_model_dir):
    from tunesmith.data.errors import DataError

    recipe = load_recipe(None, [
        f"model.name={tiny_model_dir}", f"data.train={write_triplets(tmp_path / 'p.jsonl', negatives=False)}",
        "objective.name=grl", f"output_dir={tmp_path / 'runs'}", "name=g", "train.steps=1"])
    with pytest.raises(DataError, match="needs hard negatives"):
        train(recipe)


def test_contrastive_objective_trains_with_mnr_plus_when_asked():
    """`objective.contrastive.loss=mnr_plus` routes the objective's loss to mnr_plus (pairs only:
    the hard negatives of the batch are left out)."""
    from tunesmith.objectives.contrastive import Contrastive, ContrastiveConfig

    g = torch.Generator().manual_seed(1)
    emb = torch.randn(7, 4, generator=g, dtype=torch.float64)  # 3 queries, 3 positives, 1 hard negative
    batch = {"n_queries": 3}
    plus = Contrastive(ContrastiveConfig(loss="mnr_plus", similarity="dot", temperature=0.5))
    got, _ = plus.loss_from_embeddings(emb, batch, gather=False)
    want, _ = mnr_plus(emb[:3], emb[3:6], temperature=0.5, similarity="dot")
    torch.testing.assert_close(got, want)
    plain, _ = Contrastive(ContrastiveConfig(similarity="dot", temperature=0.5)).loss_from_embeddings(emb, batch, gather=False)
    assert (plain - got).abs().max() > 1e-3

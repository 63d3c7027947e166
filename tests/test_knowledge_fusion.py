"""Multi-source knowledge fusion: the gate's selection rule, the rewards and the fused target against
hand computations, the whole loss against its formula, K=1 against distillation, and a run whose gate
trains, is saved beside the adapter and resumes."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_model, tiny_recipe, train_losses
from tunesmith.data import collate
from tunesmith.objectives import ObjectiveError
from tunesmith.objectives.distill import distill_loss
from tunesmith.objectives.knowledge_fusion import (GATE, GATE_FILE, KnowledgeFusion, attach_gate,
                                                   cv_squared, fusion_loss, sample_index, select, source_rewards)


def samples(tokenizer, n=3):
    out = []
    for i in range(n):
        ids = tokenizer(f"Question {i}: what is {i} + {i}?{' Think.' * i} Answer: {2 * i}, of course.")["input_ids"]
        cut = len(ids) // 2
        out.append({"input_ids": ids, "weights": [0.0] * cut + [1.0] * (len(ids) - cut)})
    return out


class FixedGate(torch.nn.Module):
    """A gate whose logits are fixed (per sample, in order), so the probabilities are known."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, rewards):
        return self.logits[: rewards.shape[0]]


# ---- the selection rule


def test_selection_keeps_sources_above_the_threshold_renormalised():
    probs = torch.tensor([[0.5, 0.3, 0.2],      # all above 0.15: unchanged
                          [0.7, 0.2, 0.1],      # the last dropped
                          [0.15, 0.6, 0.25],    # exactly 0.15 is not above it
                          [0.86, 0.14, 0.0]])
    want = torch.tensor([[0.5, 0.3, 0.2], [0.7 / 0.9, 0.2 / 0.9, 0.0], [0.0, 0.6 / 0.85, 0.25 / 0.85], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(select(probs), want)
    uniform = torch.full((2, 7), 1 / 7)  # every source at 0.143 < 0.15: the most probable one is kept
    uniform[1, 4] += 1e-3
    uniform[1] /= uniform[1].sum()
    kept = select(uniform)
    assert kept[0].tolist() == [1.0] + [0.0] * 6 and kept[1].tolist() == [0.0] * 4 + [1.0, 0.0, 0.0]
    torch.testing.assert_close(select(probs, threshold=0.0), probs / probs.sum(-1, keepdim=True))
    assert torch.allclose(select(torch.rand(50, 4).softmax(-1)).sum(-1), torch.ones(50))


def test_cv_squared_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert abs(float(cv_squared(x)) - 1.0 / 4.0) < 1e-6  # unbiased variance 1, mean 2
    assert float(cv_squared(torch.tensor([2.0, 2.0]))) == 0.0 and float(cv_squared(torch.tensor([5.0]))) == 0.0


# ---- rewards and the fused target against hand computations


def per_sample_logits(model, sample):
    ids = torch.tensor([sample["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, :-1].float()


def hand_rewards(sources, data):
    """reward[s, k] = exp(−mean CE of source k on sample s's trained tokens), from full logits."""
    out = []
    for s in data:
        targets, w = torch.tensor(s["input_ids"][1:]), torch.tensor(s["weights"][1:])
        out.append([float(torch.exp(-(F.cross_entropy(per_sample_logits(m, s), targets, reduction="none") * w).sum()
                                    / w.sum())) for m in sources])
    return torch.tensor(out)


def test_rewards_are_each_samples_mean_ce_of_each_source(tokenizer):
    sources = [make_tiny_model(tokenizer, seed=s) for s in (1, 2)]
    data = samples(tokenizer)
    batch = collate(data, packing=True, pad_id=tokenizer.pad_token_id)  # all three in one packed row
    keep = batch["weights"][:, 1:] > 0
    index, n = sample_index(batch, keep)
    assert n == 3 and index.tolist() == sorted(index.tolist())
    from tunesmith.objectives.sft import forward_hidden

    hiddens = [forward_hidden(m, batch)[:, :-1][keep] for m in sources]
    rewards = source_rewards([m.lm_head for m in sources], hiddens, batch["input_ids"][:, 1:][keep],
                             batch["weights"][:, 1:][keep].float(), index, n, chunk=5)
    torch.testing.assert_close(rewards, hand_rewards(sources, data), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rewards[:, 0], rewards[:, 1])


def hand_loss(student, sources, data, probs, lm_w, fuse_w, bal_w):
    """The formula from full logits: Σ_t w_t (lm_w·CE(y_t) + fuse_w·CE(D_t)) + bal_w·cv²(Σ_s p_s)·n,
    with D_t = Σ_k p_s,k·softmax(z_k,t) built explicitly."""
    total, n = 0.0, 0
    for s, p in zip(data, probs):
        ids = torch.tensor([s["input_ids"]])
        log_q = F.log_softmax(student(input_ids=ids).logits[0, :-1].float(), -1)
        fused = sum(p[k] * F.softmax(per_sample_logits(m, s), -1) for k, m in enumerate(sources))
        assert torch.allclose(fused.sum(-1), torch.ones(len(fused)))
        w = torch.tensor(s["weights"][1:])
        ce = F.nll_loss(log_q, ids[0, 1:], reduction="none")
        total = total + ((lm_w * ce - fuse_w * (fused * log_q).sum(-1)) * w).sum()
        n += int((w > 0).sum())
    importance = probs.sum(0)
    cv2 = importance.var() / importance.mean() ** 2 if len(importance) > 1 else 0.0
    return total + bal_w * cv2 * n


@pytest.mark.parametrize("chunk", [1024, 4])
def test_the_fused_target_with_fixed_gate_probabilities(tokenizer, chunk):
    student = make_tiny_model(tokenizer, seed=0)
    sources = [make_tiny_model(tokenizer, seed=s) for s in (1, 2, 3)]
    data = samples(tokenizer)
    logits = [[2.0, 1.0, -3.0], [0.0, 0.1, 0.2], [-1.0, 3.0, 0.0]]  # → one, three and one source kept
    probs = torch.stack([select(torch.tensor(row).softmax(-1)) for row in logits])
    assert [int((p > 0).sum()) for p in probs] == [2, 3, 1]
    batch = collate(data, packing=True, pad_id=tokenizer.pad_token_id)
    loss, n, metrics = fusion_loss(student, sources, FixedGate(logits), batch, lm_weight=0.3, fuse_weight=0.7,
                                   balance_weight=0.2, chunk=chunk)
    want = hand_loss(student, sources, data, probs, 0.3, 0.7, 0.2)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    assert metrics["fusion/kept"] == sum(int((p > 0).sum()) * int(sum(w > 0 for w in s["weights"][1:]))
                                         for p, s in zip(probs, data))
    # fusion changes the loss: the fused term alone differs from the LM term alone
    lm_only = fusion_loss(student, sources, FixedGate(logits), batch, lm_weight=1.0, fuse_weight=0.0,
                          balance_weight=0.0)[0]
    fuse_only = fusion_loss(student, sources, FixedGate(logits), batch, lm_weight=0.0, fuse_weight=1.0,
                            balance_weight=0.0)[0]
    assert abs(float(lm_only.detach()) - float(fuse_only.detach())) > 1e-2


def test_the_whole_loss_with_the_learned_gate_equals_the_formula(tokenizer):
    student = make_tiny_model(tokenizer, seed=0)
    sources = [make_tiny_model(tokenizer, seed=s) for s in (4, 5)]
    gate = attach_gate(student, 2, seed=3)
    data = samples(tokenizer)
    batch = collate(data, packing=True, pad_id=tokenizer.pad_token_id)
    loss, n, _ = fusion_loss(student, sources, gate, batch)  # the defaults: 0.9 / 0.1 / 0.5, threshold 0.15
    with torch.no_grad():
        probs = select(gate(hand_rewards(sources, data)).softmax(-1))
    torch.testing.assert_close(loss, hand_loss(student, sources, data, probs, 0.9, 0.1, 0.5), rtol=1e-5, atol=1e-4)
    loss.backward()  # the gate learns from the loss
    assert all(p.grad is not None for p in gate.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in gate.parameters())
    assert all(p.grad is None for m in sources for p in m.parameters())


def test_one_source_fused_alone_is_distillation_cross_entropy(tokenizer):
    """K=1, fuse_weight only: Σ w·CE(teacher, student) = distillation's τ=1 KL + the teacher's entropy,
    and the same gradient (the entropy does not depend on the student)."""
    teacher = make_tiny_model(tokenizer, seed=6)
    data = samples(tokenizer)
    batch = collate(data, packing=True, pad_id=tokenizer.pad_token_id)
    students = [make_tiny_model(tokenizer, seed=0) for _ in range(2)]
    gate = attach_gate(students[0], 1)
    fused, n, metrics = fusion_loss(students[0], [teacher], gate, batch, lm_weight=0.0, fuse_weight=1.0,
                                    balance_weight=0.5, chunk=7)
    kl, n2, _ = distill_loss(students[1], teacher, batch, temperature=1.0, chunk=7)
    entropy = 0.0
    for s in data:
        log_t = F.log_softmax(per_sample_logits(teacher, s), -1)
        entropy = entropy + (-(log_t.exp() * log_t).sum(-1) * torch.tensor(s["weights"][1:])).sum()
    assert n == n2 and metrics["fusion/p0"] == n
    torch.testing.assert_close(fused, kl + entropy, rtol=1e-5, atol=1e-4)
    fused.backward()
    kl.backward()
    for (name, a), b in zip(students[0].model.named_parameters(), students[1].model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sources_must_share_the_vocabulary(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.recipe import load_recipe

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    good = tmp_path / "good"
    make_tiny_model(tokenizer, seed=1).save_pretrained(good)
    tokenizer.save_pretrained(good)
    recipe = load_recipe(None, ["objective.name=knowledge_fusion", f"objective.knowledge_fusion.sources=[{good},{other}]"])
    with pytest.raises(ObjectiveError, match=r"sources\[1\] .* vocabulary of 500 tokens"):
        KnowledgeFusion.build(recipe, make_tiny_model(tokenizer))
    with pytest.raises(ObjectiveError, match="sources is empty"):
        KnowledgeFusion.build(load_recipe(None, ["objective.name=knowledge_fusion"]), make_tiny_model(tokenizer))
    with pytest.raises(Exception, match="threshold"):
        load_recipe(None, ["objective.name=knowledge_fusion", "objective.knowledge_fusion.threshold=1.5"])


# ---- through the harness


def test_a_fusion_run_trains_saves_and_resumes_its_gate(tmp_path, tokenizer, tiny_model_dir):
    from safetensors.torch import load_file

    from tunesmith.export.tuned import read_method
    from tunesmith.train import checkpoint as ckpt
    from tunesmith.train.loop import stopping_after, train

    dirs = []
    for seed in (11, 12):
        dirs.append(tmp_path / f"source{seed}")
        make_tiny_model(tokenizer, seed=seed).save_pretrained(dirs[-1])
        tokenizer.save_pretrained(dirs[-1])
    common = ["objective.name=knowledge_fusion", f"objective.knowledge_fusion.sources=[{dirs[0]},{dirs[1]}]",
              "objective.knowledge_fusion.fuse_weight=0.5", "data.val_fraction=0", "train.lr=3e-3"]
    full = train(tiny_recipe(tmp_path / "a", tiny_model_dir, *common))
    assert full.status == "completed"
    losses = train_losses(full.run_dir)
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    # the gate trained: its saved weights differ from the seeded initialisation
    init = attach_gate(make_tiny_model(tokenizer), 2, seed=0).state_dict()
    saved = load_file(full.output / GATE_FILE)
    assert set(saved) == set(init) and any(not torch.equal(saved[k], init[k]) for k in init)
    # ... it is beside the adapter, not inside it, and every checkpoint holds it
    assert read_method(full.output)[0].name == "lora"
    assert not any(GATE in k for k in load_file(full.output / "delta.safetensors"))
    step2 = load_file(full.run_dir / "checkpoints" / "step-2" / "trainable.safetensors")
    assert {f"{GATE}.{k}" for k in init} <= set(step2)
    assert "Knowledge fusion" in (full.run_dir / "report.md").read_text()
    # interrupted and resumed: the same losses and the same final gate
    with stopping_after(3):
        first = train(tiny_recipe(tmp_path / "b", tiny_model_dir, *common))
    assert first.status == "interrupted" and ckpt.latest_checkpoint(first.run_dir).name == "step-3"
    resumed = train(tiny_recipe(tmp_path / "b", tiny_model_dir, *common, "resume=true"))
    for x, y in zip(losses, train_losses(resumed.run_dir)):
        assert abs(x - y) < 1e-5, (losses, train_losses(resumed.run_dir))
    again = load_file(resumed.output / GATE_FILE)
    for k in init:
        torch.testing.assert_close(again[k], saved[k], rtol=1e-5, atol=1e-7)


# ---- a source of another family: its distributions mapped onto the student's vocabulary


@pytest.fixture(scope="module")
def wordpiece():
    """MiniLM's WordPiece tokenizer (shipped with tunesmith): a tokenizer of another family."""
    from transformers import AutoTokenizer

    from tunesmith.models.embedding import encoder_folder

    return AutoTokenizer.from_pretrained(str(encoder_folder()))


@pytest.fixture(scope="module")
def other_family(wordpiece, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.objectives.vocab_map import CrossVocabSource

    torch.manual_seed(9)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(wordpiece), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    with torch.no_grad():  # peaked distributions, so the top-k holds most of the mass
        model.lm_head.weight.mul_(40)
    return CrossVocabSource(model, wordpiece, tokenizer, top_k=5)


def test_the_vocabulary_map_goes_by_string(other_family, wordpiece, tokenizer):
    mapping = other_family.mapping
    first = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    assert int(mapping[wordpiece.convert_tokens_to_ids("paris")]) == first(" paris")
    assert int(mapping[wordpiece.convert_tokens_to_ids("##ing")]) == first("ing")
    assert int(mapping[wordpiece.convert_tokens_to_ids("unbelievable")]) == first(" unbelievable")
    assert all(int(mapping[i]) == -1 for i in wordpiece.all_special_ids)
    assert int((mapping >= 0).sum()) > 0.9 * len(wordpiece)


def test_positions_align_where_both_tokenizers_start_a_token(other_family, wordpiece, tokenizer):
    """'the cat sat on the mat.' cuts alike (aligned positions: the source's mapped top-k);
    'Unbelievably' does not everywhere (unaligned positions: the gold token)."""
    text = "the cat sat on the mat. Unbelievably, things"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # the student: the Ġcat Ġsat Ġon Ġthe Ġmat . ĠUn belie v ably , Ġthings
    # the source:  [CLS] the cat sat on the mat . un ##bel ##ie ##va ##bly , things [SEP]
    # the source position predicting the same character as the student's token j (None: no such):
    partner = [None, 1, 2, 3, 4, 5, 6, 7, 8, 10, None, 12, 13]
    assert len(ids) == len(partner)
    weights = [0.0] + [1.0] * (len(ids) - 1)
    batch = collate([{"input_ids": ids, "weights": weights}], packing=True, pad_id=tokenizer.pad_token_id)
    keep = batch["weights"][:, 1:] > 0
    got_ids, got_p, rewards = other_family.targets(batch, keep)
    src = wordpiece(text)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(other_family.model(input_ids=torch.tensor([src])).logits[0].float(), -1)
    for t in range(len(ids) - 1):
        i = partner[t + 1]
        if i is None:  # unaligned: the gold token, probability 1
            assert got_ids[t, 0] == ids[t + 1] and got_p[t, 0] == 1.0 and got_p[t, 1:].sum() == 0
            continue
        top_p, top_i = logp[i].exp().topk(5)
        mapped = other_family.mapping[top_i]
        top_p = torch.where(mapped >= 0, top_p, 0.0)
        want, got = {}, {}
        for j, q in zip(mapped.tolist(), (top_p / top_p.sum()).tolist()):
            want[j] = want.get(j, 0.0) + q
        for j, q in zip(got_ids[t].tolist(), got_p[t].tolist()):
            got[j] = got.get(j, 0.0) + q
        assert {j: round(q, 5) for j, q in got.items() if q} == {j: round(q, 5) for j, q in want.items() if q}, t
    # the reward: exp(-mean CE) of the source on its own tokens of the trained text (all but "the" at 0)
    ce = [-float(logp[j - 1, src[j]]) for j in range(2, len(src) - 1)]
    assert abs(float(rewards[0]) - float(torch.exp(-torch.tensor(sum(ce) / len(ce))))) < 1e-5


def test_fusion_with_a_source_of_another_family(other_family, tokenizer):
    student, same = make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1)
    data = samples(tokenizer)
    batch = collate(data, packing=True, pad_id=tokenizer.pad_token_id)
    keep = batch["weights"][:, 1:] > 0
    logits = [[0.0, 0.0]] * 3  # both kept, half each
    loss, n, metrics = fusion_loss(student, [same, other_family], FixedGate(logits), batch, lm_weight=0.0,
                                   fuse_weight=1.0, balance_weight=0.0, chunk=5)
    ids, probs, _ = other_family.targets(batch, keep)
    from tunesmith.objectives.sft import forward_hidden

    log_q = F.log_softmax(student.lm_head(forward_hidden(student, batch)[:, :-1][keep]).float(), -1)
    with torch.no_grad():
        d_same = F.softmax(same.lm_head(forward_hidden(same, batch)[:, :-1][keep]).float(), -1)
    w = batch["weights"][:, 1:][keep]
    want = ((0.5 * -(d_same * log_q).sum(-1) + 0.5 * -(probs * log_q.gather(-1, ids)).sum(-1)) * w).sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    assert 0 < metrics["fusion/reward1"] / n < 1
    loss.backward()
    assert all(p.grad is None for p in other_family.model.parameters())


def test_cross_vocab_is_opt_in_and_trains(tmp_path, tokenizer, tiny_model_dir, wordpiece):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(wordpiece), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    wordpiece.save_pretrained(other)
    opts = ["objective.name=knowledge_fusion", f"objective.knowledge_fusion.sources=[{tiny_model_dir},{other}]"]
    with pytest.raises(ObjectiveError, match="cross_vocab=true"):
        KnowledgeFusion.build(load_recipe(None, opts), make_tiny_model(tokenizer))
    result = train(tiny_recipe(tmp_path, tiny_model_dir, *opts, "objective.knowledge_fusion.cross_vocab=true",
                               "train.steps=3", "data.val_fraction=0", "train.save_every=0"))
    assert result.status == "completed" and len(train_losses(result.run_dir)) == 3
    assert "| " + str(other) + " |" in (result.run_dir / "report.md").read_text()

"""Preference training: pair records rendered with the real chat template, per-sequence log-probs
against a plain full forward, every loss against its published formula, the LoRA reference, and a
few optimisation steps that must move the margin."""
import copy
import json
import math
import re

import pytest
import torch

from tests.conftest import make_tiny_model, trained_runs
from tunesmith.data import DataError, Renderer, collate
from tunesmith.data.preference import flatten_pairs, load_pairs, pair_lengths, render_pair
from tunesmith.methods import build_method, mark_trainable
from tunesmith.methods.lora import lora_modules
from tunesmith.models.attention import use_packed_attention
from tunesmith.objectives import preference as pref
from tunesmith.objectives.preference import (
    dpo_loss, hinge_loss, ipo_loss, orpo_loss, preference_objective, reference_logps, sequence_logps, simpo_loss,
)
from tunesmith.recipe import DataConfig, LoraConfig, MethodConfig, PreferenceConfig

END = "<|im_end|>"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def first_trained(sample) -> int:
    return next(i for i, w in enumerate(sample["weights"]) if w)


def render(tokenizer, record, **cfg):
    return render_pair(Renderer(tokenizer, assistant_turns="last"), record, "mem:1", DataConfig(**cfg))


HISTORY = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
PAIRS = [
    {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5, I think, or maybe 22."},
    {"messages": HISTORY, "chosen": {"role": "assistant", "content": "Rome."}, "rejected": "Milan, obviously."},
    {"prompt": "Name a colour.", "chosen": "Blue is a colour of the sky.", "rejected": "Seven."},
]


# --------------------------------------------------------------------------------------------------
# data


def test_prompt_style_trains_only_the_answers(tokenizer):
    pair = render(tokenizer, PAIRS[0])
    assert trained_runs(pair["chosen"], tokenizer) == ["It is 4." + END]
    assert trained_runs(pair["rejected"], tokenizer) == ["It is 5, I think, or maybe 22." + END]
    # Both sides share every token before the answer, and the prompt is in it.
    k = first_trained(pair["chosen"])
    assert k == first_trained(pair["rejected"])
    assert pair["chosen"]["input_ids"][:k] == pair["rejected"]["input_ids"][:k]
    prefix = tokenizer.decode(pair["chosen"]["input_ids"][:k])
    assert prefix.endswith("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    # The ids are the template's own rendering of the chat.
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert pair["chosen"]["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]


def test_messages_style_trains_only_the_final_answer(tokenizer):
    pair = render(tokenizer, PAIRS[1])
    assert trained_runs(pair["chosen"], tokenizer) == ["Rome." + END]  # not the earlier "Paris."
    assert trained_runs(pair["rejected"], tokenizer) == ["Milan, obviously." + END]
    k = first_trained(pair["chosen"])
    assert pair["chosen"]["input_ids"][:k] == pair["rejected"]["input_ids"][:k]
    prefix = tokenizer.decode(pair["chosen"]["input_ids"][:k])
    for text in ("You answer in one word.", "Paris.", "And of Italy?"):
        assert text in prefix


@pytest.mark.parametrize("record", [
    # whole conversations (HH style), no prompt column
    {"chosen": HISTORY + [{"role": "assistant", "content": "Rome."}],
     "rejected": HISTORY + [{"role": "assistant", "content": "Milan, obviously."}]},
    # TRL's conversational style: the prompt as messages, the answers as one-message lists
    {"prompt": HISTORY, "chosen": [{"role": "assistant", "content": "Rome."}],
     "rejected": [{"role": "assistant", "content": "Milan, obviously."}]},
    # messages plus whole conversations that repeat them
    {"messages": HISTORY, "chosen": HISTORY + [{"role": "assistant", "content": "Rome."}],
     "rejected": {"role": "assistant", "content": "Milan, obviously."}},
])
def test_conversation_styles_render_like_the_messages_style(tokenizer, record):
    assert render(tokenizer, record) == render(tokenizer, PAIRS[1])


def test_system_and_column_mapping(tokenizer):
    record = {"q": "What is 2 + 2?", "good": "It is 4.", "bad": "Five.", "sys": "Be terse."}
    pair = render(tokenizer, record, columns={"prompt": "q", "chosen": "good", "rejected": "bad", "system": "sys"})
    assert "Be terse." in tokenizer.decode(pair["chosen"]["input_ids"])
    assert trained_runs(pair["rejected"], tokenizer) == ["Five." + END]
    pair = render(tokenizer, PAIRS[0], system_prompt="Default system.")
    assert "Default system." in tokenizer.decode(pair["rejected"]["input_ids"])


GOOD = PAIRS[0]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "rejected": "r"}, r"field 'chosen' is missing"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, r"field 'rejected' is null"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"'chosen' == 'rejected'"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, r"field 'chosen' is an empty answer"),
    ({"prompt": "p", "chosen": True, "rejected": "r"}, r"field 'chosen' is bool"),
    ({"prompt": ["x"], "chosen": "c", "rejected": "r"}, r"prompt\[0\] is str"),
    ({"prompt": "p", "chosen": {"role": "user", "content": "c"}, "rejected": "r"}, r"chosen\.role is 'user'"),
    ({"prompt": "p", "chosen": "c", "rejected": {"role": "assistant"}}, r"rejected\.content is missing"),
    ({"messages": HISTORY[:3], "chosen": "c", "rejected": "r"},
     r"field 'messages': the conversation before the answers ends with a assistant turn"),
    ({"messages": "not json", "chosen": "c", "rejected": "r"}, r"field 'messages' is a string but not valid JSON"),
    ({"chosen": "c", "rejected": "r"}, r"no prompt: give 'prompt', 'messages'"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "r"}]},
     r"'chosen' and 'rejected' differ before their last assistant turn \(at message 0\)"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}, {"role": "user", "content": "u"}],
      "rejected": "r"}, r"field 'chosen' does not end with an assistant answer"),
])
def test_bad_records_name_line_and_field(tokenizer, tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, record])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + message):
        load_pairs(DataConfig(train=str(path)), tokenizer)


def test_non_preference_format_is_refused(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    with pytest.raises(DataError, match="data.format=chat"):
        load_pairs(DataConfig(train=str(path), format="chat"), tokenizer)


def test_lengths_splits_and_counts(tokenizer, tmp_path):
    long = {"prompt": "Say a lot.", "chosen": "Fine.", "rejected": "word " * 60}
    huge_prompt = {"prompt": "blah " * 80, "chosen": "a", "rejected": "b"}
    records = [GOOD, long, PAIRS[2], huge_prompt]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    full = load_pairs(DataConfig(train=str(path), max_length=10_000), tokenizer)
    assert full.stats["train"]["pairs"] == 4 and full.stats["train"]["samples"] == 8
    max_length = 60
    chosen_len = len(full.train[1]["chosen"]["input_ids"])
    assert chosen_len <= max_length < len(full.train[1]["rejected"]["input_ids"])
    first_answer = first_trained(full.train[3]["chosen"])
    assert first_answer > max_length  # truncation cuts the whole answer off

    cut = load_pairs(DataConfig(train=str(path), max_length=max_length), tokenizer)
    stats = cut.stats["train"]
    assert (stats["records"], stats["pairs"], stats["truncated"], stats["no_trained_token"]) == (4, 3, 1, 1)
    assert cut.train[1]["chosen"] == full.train[1]["chosen"]  # the short side is untouched
    assert cut.train[1]["rejected"]["input_ids"] == full.train[1]["rejected"]["input_ids"][:max_length]
    assert stats["length_max"] == max_length

    dropped = load_pairs(DataConfig(train=str(path), max_length=max_length, overflow="drop"), tokenizer)
    assert dropped.stats["train"]["dropped_too_long"] == 2 and dropped.stats["train"]["pairs"] == 2
    assert dropped.train == [full.train[0], full.train[2]]

    split = load_pairs(DataConfig(train=str(path), val_fraction=0.25, limit=3), tokenizer, seed=0)
    assert len(split.train) == 2 and len(split.val) == 1
    assert split.stats["train"]["records"] == 2 and split.stats["val"]["records"] == 1
    assert sorted(map(str, split.train + split.val)) == sorted(map(str, full.train[:3]))


def test_flatten_and_collate_layout(tokenizer):
    pairs = [render(tokenizer, r) for r in PAIRS]
    samples = flatten_pairs(pairs)
    assert samples == [s for p in pairs for s in (p["chosen"], p["rejected"])]
    assert pair_lengths(pairs) == [len(p["chosen"]["input_ids"]) + len(p["rejected"]["input_ids"]) for p in pairs]
    batch = collate(samples, packing=True, pad_id=tokenizer.pad_token_id)
    seg, ids = batch["segment_ids"][0], batch["input_ids"][0]
    for i, p in enumerate(pairs):
        assert ids[seg == 2 * i + 1].tolist() == p["chosen"]["input_ids"]
        assert ids[seg == 2 * i + 2].tolist() == p["rejected"]["input_ids"]
    assert int(seg.max()) == 2 * len(pairs)
    index, S = pref.segment_index(batch["segment_ids"])
    assert S == 6 and (index[0] == seg - 1).all()
    padded = collate(samples, packing=False, pad_id=tokenizer.pad_token_id)
    index, S = pref.segment_index(padded["segment_ids"])
    assert S == 6
    for row in range(6):
        assert set(index[row].tolist()) - {-1} == {row}


# --------------------------------------------------------------------------------------------------
# sequence log-probs


def plain_logps(model, sample) -> tuple[float, int]:
    """log p(answer) from a full forward over the sample alone: the obviously-correct way."""
    ids = torch.tensor([sample["input_ids"]])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]  # (T, vocab)
    picks = [logp[t - 1, sample["input_ids"][t]].item() for t, w in enumerate(sample["weights"]) if w]
    return sum(picks), len(picks)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return [render(tokenizer, r) for r in PAIRS]


@pytest.fixture(scope="module")
def base(tokenizer):
    """The tiny base model; tests take a deepcopy (much faster than initialising another)."""
    return make_tiny_model(tokenizer)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "packed"])
def test_sequence_logps_match_a_plain_forward(tokenizer, pairs, base, packing, attention):
    model = copy.deepcopy(base)
    samples = flatten_pairs(pairs)
    expected = [plain_logps(model, s) for s in samples]
    if attention == "packed":
        use_packed_attention(model)
    batch = collate(samples, packing=packing, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch, chunk=5)  # several chunks per sequence
    assert counts.tolist() == [n for _, n in expected]
    torch.testing.assert_close(logps, torch.tensor([s for s, _ in expected]), atol=2e-4, rtol=1e-5)
    assert len(set(counts.tolist())) > 1  # the answers differ in length


def test_sequence_logps_gradient_matches_a_plain_forward(tokenizer, pairs, base):
    samples = flatten_pairs(pairs[:1])
    batch = collate(samples, packing=True, pad_id=tokenizer.pad_token_id)
    coef = torch.tensor([1.0, -2.0])  # a different weight per sequence
    model = copy.deepcopy(base)
    (sequence_logps(model, batch, chunk=4)[0] * coef).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for c, s in zip(coef, samples):
        ids = torch.tensor([s["input_ids"]])
        logp = model(ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        total = total + c * logp[torch.tensor(s["weights"][1:]) > 0].sum()
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)


# --------------------------------------------------------------------------------------------------
# losses against their formulas

# Several pairs: policy/reference sequence log-probs, with margins of both signs.
PC = [-10.0, -4.0, -20.0, -7.5, -3.0]
PR = [-12.0, -3.0, -15.0, -7.5, -9.0]
RC = [-11.0, -5.0, -18.0, -8.0, -3.5]
RR = [-11.5, -4.0, -16.0, -6.0, -4.0]
BETA = 0.3


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def margins():
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def test_margins_cover_both_signs():
    h = margins()
    assert min(h) < 0 < max(h)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss(eps):
    expected = [-(1 - eps) * log_sigmoid(BETA * h) - eps * log_sigmoid(-BETA * h) for h in margins()]
    got = dpo_loss(t(PC), t(PR), t(RC), t(RR), BETA, label_smoothing=eps)
    torch.testing.assert_close(got, t(expected))


def test_ipo_loss():
    expected = [(h - 1 / (2 * BETA)) ** 2 for h in margins()]
    torch.testing.assert_close(ipo_loss(t(PC), t(PR), t(RC), t(RR), BETA), t(expected))


def test_hinge_loss():
    expected = [max(0.0, 1 - BETA * h) for h in margins()]
    assert 0.0 in expected and max(expected) > 0  # both sides of the hinge are exercised
    torch.testing.assert_close(hinge_loss(t(PC), t(PR), t(RC), t(RR), BETA), t(expected))


LC = [5, 2, 10, 3, 4]  # answer lengths in tokens
LR = [4, 6, 10, 1, 9]


def test_simpo_loss():
    gamma = 0.5
    mc = [s / n for s, n in zip(PC, LC)]
    mr = [s / n for s, n in zip(PR, LR)]
    expected = [-log_sigmoid(BETA * (a - b) - BETA * gamma) for a, b in zip(mc, mr)]
    torch.testing.assert_close(simpo_loss(t(mc), t(mr), BETA, gamma), t(expected))


def test_orpo_loss():
    lam = 0.25
    mc = [s / n for s, n in zip(PC, LC)]
    mr = [s / n for s, n in zip(PR, LR)]
    expected = []
    for a, b in zip(mc, mr):
        pa, pb = math.exp(a), math.exp(b)
        odds_ratio = (pa / (1 - pa)) / (pb / (1 - pb))
        expected.append(-a - lam * math.log(odds_ratio / (1 + odds_ratio)))  # log σ(log OR)
    got = orpo_loss(t(mc), t(mr), -t(mc), lam)
    torch.testing.assert_close(got, t(expected))
    # Near p = 1 the odds stay finite.
    assert torch.isfinite(orpo_loss(t([-1e-9]), t([-0.5]), t([0.0]), lam)).all()


@pytest.mark.parametrize("name,beta", [("dpo", 0.1), ("ipo", 0.1), ("hinge", 0.1), ("simpo", 2.0), ("orpo", 0.1)])
def test_unset_beta_is_the_loss_paper_default(monkeypatch, name, beta):
    """β left unset is each loss's own default (SimPO: 2.0, Meng et al., 2024), resolved when the recipe
    loads (the printed recipe shows it) and by the objective itself; a β that is set is kept."""
    from pathlib import Path

    from tunesmith.recipe import RecipeError, load_recipe

    assert load_recipe(None, [f"objective.name={name}"]).objective.preference.beta == beta
    shipped = Path(__file__).parent.parent / "recipes" / "dpo.yaml"
    assert load_recipe(shipped, [f"objective.name={name}"]).objective.preference.beta == beta
    assert load_recipe(None, [f"objective.name={name}", "objective.preference.beta=0.7"]).objective.preference.beta == 0.7
    assert load_recipe(None).objective.preference is None  # sft: no preference block, nothing to resolve
    with pytest.raises(RecipeError, match=r"objective.preference.beta: must be > 0"):
        load_recipe(None, [f"objective.name={name}", "objective.preference.beta=0"])
    fake = FakeLogps(interleave(PC, PR), interleave(LC, LR))
    monkeypatch.setattr(pref, "sequence_logps", fake)
    batch = {"ref_logps": t(interleave(RC, RR)).float()}
    unset = preference_objective(None, batch, name, PreferenceConfig())
    explicit = preference_objective(None, batch, name, PreferenceConfig(beta=beta))
    assert unset[0].item() == explicit[0].item() and unset[2] == explicit[2]


class FakeLogps:
    """Stands in for `sequence_logps`: fixed sums and lengths for segments c1, r1, c2, r2, ..."""

    def __init__(self, sums, counts):
        self.sums, self.counts = torch.tensor(sums, requires_grad=True), torch.tensor(counts)

    def __call__(self, model, batch, chunk):
        return self.sums, self.counts


def interleave(a, b):
    return [x for pair in zip(a, b) for x in pair]


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "simpo", "orpo"])
def test_objective_normalises_and_sums_as_documented(monkeypatch, name):
    cfg = PreferenceConfig(beta=BETA, gamma=0.5, orpo_lambda=0.25, label_smoothing=0.1)
    fake = FakeLogps(interleave(PC, PR), interleave(LC, LR))
    monkeypatch.setattr(pref, "sequence_logps", fake)
    batch = {"ref_logps": t(interleave(RC, RR)).float()}
    loss, n_pairs, metrics = preference_objective(None, batch, name, cfg)
    mc = [s / n for s, n in zip(PC, LC)]
    mr = [s / n for s, n in zip(PR, LR)]
    if name == "dpo":
        per_pair = dpo_loss(t(PC), t(PR), t(RC), t(RR), BETA, 0.1)
    elif name == "hinge":
        per_pair = hinge_loss(t(PC), t(PR), t(RC), t(RR), BETA)
    elif name == "ipo":  # token-averaged, policy and reference alike
        per_pair = ipo_loss(t(mc), t(mr), t([s / n for s, n in zip(RC, LC)]), t([s / n for s, n in zip(RR, LR)]), BETA)
    elif name == "simpo":
        per_pair = simpo_loss(t(mc), t(mr), BETA, 0.5)
    else:
        per_pair = orpo_loss(t(mc), t(mr), -t(mc), 0.25)
    assert n_pairs == 5
    torch.testing.assert_close(loss.double(), per_pair.sum(), rtol=1e-5, atol=1e-5)
    if name in ("dpo", "hinge", "ipo"):
        rewards_c = [BETA * (p - r) for p, r in zip(PC, RC)]
        rewards_r = [BETA * (p - r) for p, r in zip(PR, RR)]
    else:
        rewards_c, rewards_r = [BETA * m for m in mc], [BETA * m for m in mr]
    margins_ = [a - b for a, b in zip(rewards_c, rewards_r)]
    assert metrics["rewards/chosen"] == pytest.approx(sum(rewards_c), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rewards_r), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(sum(margins_), abs=1e-5)
    assert metrics["rewards/accuracies"] == sum(m > 0 for m in margins_)
    assert metrics["logps/chosen"] == pytest.approx(sum(PC)) and metrics["logps/rejected"] == pytest.approx(sum(PR))
    loss.backward()
    assert fake.sums.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["simpo", "orpo", "ipo"])
def test_length_normalisation(monkeypatch, name):
    """Same sums, different lengths -> a different loss (SimPO/ORPO/IPO use per-token averages; DPO doesn't)."""
    cfg = PreferenceConfig(beta=BETA)
    batch = {"ref_logps": torch.tensor(interleave(RC, RR))}

    def loss_with(counts, objective):
        monkeypatch.setattr(pref, "sequence_logps", FakeLogps(interleave(PC, PR), counts))
        return preference_objective(None, batch, objective, cfg)[0].item()

    short, long = interleave(LC, LR), interleave([n * 3 for n in LC], LR)
    assert loss_with(short, name) != pytest.approx(loss_with(long, name))
    assert loss_with(short, "dpo") == pytest.approx(loss_with(long, "dpo"))


# --------------------------------------------------------------------------------------------------
# reference and training


def lora_model(base):
    model = copy.deepcopy(base)
    method = build_method(MethodConfig(name="lora", lora=LoraConfig(rank=4, alpha=8)))
    method.apply(model)
    mark_trainable(model, method)
    torch.manual_seed(1)
    for m in lora_modules(model).values():  # non-zero deltas, or the reference would equal the policy
        torch.nn.init.normal_(m.lora_b, std=0.05)
    return model


def test_lora_reference_is_the_base_model(tokenizer, pairs, base):
    batch = collate(flatten_pairs(pairs), packing=True, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = sequence_logps(make_tiny_model(tokenizer), batch)[0]  # a fresh base, never wrapped
    model = lora_model(base)
    ref = reference_logps(model, batch)
    assert not ref.requires_grad
    torch.testing.assert_close(ref, expected, atol=1e-4, rtol=1e-5)
    policy = sequence_logps(model, batch)[0]  # adapters back on
    assert (policy - ref).abs().max() > 1e-2, "the policy must differ from its reference"
    # A frozen copy keeps its adapters: its reference is the copy itself.
    torch.testing.assert_close(reference_logps(model, batch, adapters_off=False), policy.detach())


def test_reference_sources_agree_and_missing_reference_is_an_error(tokenizer, pairs, base):
    batch = collate(flatten_pairs(pairs), packing=True, pad_id=tokenizer.pad_token_id)
    cfg = PreferenceConfig(beta=0.5)
    model = lora_model(base)
    with torch.no_grad():
        implicit = preference_objective(model, batch, "dpo", cfg)
        frozen = preference_objective(model, batch, "dpo", cfg, reference=base)
        pre = preference_objective(model, dict(batch, ref_logps=reference_logps(model, batch)), "dpo", cfg)
        for other in (frozen, pre):
            torch.testing.assert_close(other[0], implicit[0], atol=1e-4, rtol=1e-5)
        assert implicit[1] == 3 and implicit[0].item() != pytest.approx(3 * math.log(2))
        with pytest.raises(ValueError, match="need a reference model"):
            preference_objective(base, batch, "dpo", cfg)
        preference_objective(base, batch, "simpo", cfg)  # reference-free: fine


def test_dpo_gradients_reach_only_lora(tokenizer, pairs, base):
    batch = collate(flatten_pairs(pairs), packing=True, pad_id=tokenizer.pad_token_id)
    model = lora_model(base)
    loss, _, _ = preference_objective(model, batch, "dpo", PreferenceConfig())
    loss.backward()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "simpo", "orpo"])
def test_a_few_steps_grow_the_margin(tokenizer, pairs, base, name):
    batch = collate(flatten_pairs(pairs[:1]), packing=True, pad_id=tokenizer.pad_token_id)
    model = copy.deepcopy(base)
    method = build_method(MethodConfig(name="lora", lora=LoraConfig(rank=4, alpha=8)))
    method.apply(model)
    params = [model.get_parameter(n) for n in mark_trainable(model, method)]
    opt = torch.optim.SGD(params, lr=0.5)
    cfg = PreferenceConfig(beta=0.5)
    history = []
    for _ in range(3):
        loss, n_pairs, metrics = preference_objective(model, batch, name, cfg)
        history.append((loss.item(), metrics["rewards/margins"]))
        opt.zero_grad()
        (loss / n_pairs).backward()
        opt.step()
    (loss0, margin0), (loss_end, margin_end) = history[0], history[-1]
    assert loss_end < loss0
    assert margin_end > margin0


@pytest.mark.parametrize("extra", [["objective.name=dpo"], ["objective.name=simpo"],
                                   ["objective.name=dpo", "objective.preference.precompute_reference=true"],
                                   ["objective.name=ipo", "method.name=full", "train.lr=1e-4"]])
def test_preference_training_end_to_end(tmp_path, tiny_model_dir, extra):
    """A tiny model trained on fixed pairs: the loss falls, the chosen side gains on the rejected."""
    from pathlib import Path

    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train
    from tunesmith.train.metrics import read_metrics

    root = Path(__file__).parent.parent
    recipe = load_recipe(root / "recipes" / "dpo.yaml", [
        f"model.name={tiny_model_dir}", "data.limit=16", "data.val_fraction=0.25", f"output_dir={tmp_path}",
        "train.steps=6", "train.batch_tokens=512", "train.precision=fp32", "train.lr=5e-3", "train.warmup=0",
        "train.eval_every=3", "model.frozen_dtype=same", "train.schedule=constant", *extra])
    result = train(recipe)
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert result.status == "completed" and len(rows) == 6
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert all("pairs" in r and r["pairs"] > 0 for r in rows)
    assert any("val_loss" in r for r in read_metrics(result.run_dir / "metrics.jsonl"))
    assert "reward margin" in (result.run_dir / "report.md").read_text()


def test_reference_after_sft_is_the_sft_model(tiny_model, tokenizer):
    """DPO that continues an SFT adapter compares against that adapter (a frozen copy), not the base."""
    from tunesmith.objectives import build_objective
    from tunesmith.recipe import load_recipe

    fresh = build_objective(load_recipe(None, ["objective.name=dpo"]), tiny_model)
    after_sft = build_objective(load_recipe(None, ["objective.name=dpo", "model.adapter=runs/x"]), tiny_model)
    reference_free = build_objective(load_recipe(None, ["objective.name=simpo"]), tiny_model)
    assert fresh.reference is None  # the policy itself with its LoRA switched off
    assert after_sft.reference is not None and after_sft.reference is not tiny_model
    assert not any(p.requires_grad for p in after_sft.reference.parameters())
    assert reference_free.reference is None

"""GRPO: advantages and the clipped loss against hand computations, log-probs against a full
forward, rewards, and the loop on a tiny model (reward rises; resume == uninterrupted)."""
import copy
import math

import pytest
import torch

from tests.conftest import make_tiny_model
from tunesmith.data import collate
from tunesmith.data.tasks.base import Example, Verdict
from tunesmith.objectives.grpo import group_advantages, grpo_loss, token_logps
from tunesmith.objectives.rewards import (FORMAT_BONUS, RewardError, build_rewards, generic_format_reward,
                                          load_function, sql_format_reward)
from tunesmith.recipe import load_recipe
from tunesmith.objectives import ObjectiveError
from tunesmith.objectives.grpo import GRPO, prompt_indices, sample_completions
from tunesmith.train.loop import TrainError, stopping_after, train
from tunesmith.train.metrics import read_metrics

# ----------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.2, 0.9, 0.4, 0.4, 0.1]])
    adv = group_advantages(rewards, eps=1e-4)
    for row, got in zip(rewards.tolist(), adv):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (len(row) - 1))  # sample std, as torch.std
        torch.testing.assert_close(got, torch.tensor([(r - mean) / (std + 1e-4) for r in row]))
    assert adv[0, 0] > 0 > adv[0, 1]  # right answers are pushed up, wrong ones down


def test_equal_group_gives_zero_and_unscaled_only_centres():
    rewards = torch.tensor([[0.7, 0.7, 0.7, 0.7], [1.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    assert torch.equal(adv[0], torch.zeros(4))
    centred = group_advantages(rewards, scale=False)
    torch.testing.assert_close(centred[1], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert not torch.allclose(adv[1], centred[1])  # scaling did change the second group


# ----------------------------------------------------------------------------- the clipped loss


def grad_of_loss(ratio: float, advantage: float, epsilon: float = 0.2, ref=None, kl_beta=0.0) -> float:
    old = torch.tensor([-1.0])
    logp = (old + math.log(ratio)).requires_grad_(True)
    ref_logp = None if ref is None else torch.tensor([ref])
    loss, n, _ = grpo_loss(logp, old, torch.tensor([advantage]), ref_logp, epsilon, kl_beta)
    loss.backward()
    return float(logp.grad)


@pytest.mark.parametrize("ratio", [0.5, 0.9, 1.0, 1.1, 1.19])
def test_positive_advantage_raises_logp_until_the_clip(ratio):
    # gradient descent moves logp by -grad: a negative gradient raises logp; d(-r·A)/dlogp = -r·A
    assert grad_of_loss(ratio, 2.0) == pytest.approx(-ratio * 2.0)


@pytest.mark.parametrize("ratio", [1.21, 1.5, 3.0])
def test_positive_advantage_beyond_the_clip_has_no_gradient(ratio):
    assert grad_of_loss(ratio, 2.0) == 0.0


@pytest.mark.parametrize("ratio", [0.81, 1.0, 1.5, 3.0])
def test_negative_advantage_lowers_logp_until_the_clip(ratio):
    assert grad_of_loss(ratio, -1.5) == pytest.approx(ratio * 1.5)


@pytest.mark.parametrize("ratio", [0.79, 0.5, 0.1])
def test_negative_advantage_below_the_clip_has_no_gradient(ratio):
    assert grad_of_loss(ratio, -1.5) == 0.0


def test_kl_pulls_logp_toward_the_reference():
    old = -1.0
    above = grad_of_loss(1.0, 0.0, ref=old - 0.5, kl_beta=0.1)  # logp above ref: must go down
    below = grad_of_loss(1.0, 0.0, ref=old + 0.5, kl_beta=0.1)  # logp below ref: must go up
    assert above > 0 > below
    assert above == pytest.approx(0.1 * (1 - math.exp(-0.5)))  # d/dlogp of k3: 1 − exp(ref − logp)
    assert grad_of_loss(1.0, 0.0, ref=old, kl_beta=0.1) == 0.0  # at the reference: no pull


def test_loss_sums_tokens_and_reports_metrics():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    old = logp - torch.log(torch.tensor([1.0, 1.5, 0.5, 1.0]))  # ratios 1, 1.5, 0.5, 1
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, n, m = grpo_loss(logp, old, adv, ref_logp=logp - 0.3, epsilon=0.2, kl_beta=0.5)
    objective = 1.0 * 1 + 1.2 * 1 + 0.8 * -1 + 1.0 * -2  # min(r·A, clip(r)·A) per token
    k3 = math.exp(-0.3) + 0.3 - 1
    assert n == 4 and float(loss) == pytest.approx(-objective + 0.5 * 4 * k3, rel=1e-5)
    assert m["clip_fraction"] == 0.5 and m["ratio"] == pytest.approx(1.0)
    assert m["kl"] == pytest.approx(k3, rel=1e-5)


# ----------------------------------------------------------------------------- log-probs


def test_token_logps_equal_a_full_forward(tokenizer):
    from tunesmith.models.attention import use_packed_attention

    model = make_tiny_model(tokenizer)
    g = torch.Generator().manual_seed(0)
    samples = []
    for n, start in ((9, 4), (14, 6), (6, 2)):
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "weights": [0.0] * start + [1.0] * (n - start)})
    expected = {}
    with torch.no_grad():
        for T in (1.0, 0.7):
            parts = []
            for s in samples:  # each sample alone, stock attention, the full (T, vocab) log-softmax
                ids = torch.tensor([s["input_ids"]])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float() / T, -1)
                keep = torch.tensor(s["weights"][1:]) > 0
                parts.append(logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[keep])
            expected[T] = torch.cat(parts)
    use_packed_attention(model)
    batch = collate(samples, packing=True, pad_id=tokenizer.pad_token_id)
    got = token_logps(model, batch, chunk=4)  # several chunks, with grad (checkpointed)
    assert got.shape == expected[1.0].shape == (int((batch["weights"][:, 1:] > 0).sum()),)
    torch.testing.assert_close(got.detach(), expected[1.0], atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(token_logps(model, batch, temperature=0.7), expected[0.7], atol=1e-5, rtol=1e-5)
        padded = collate(samples, packing=False, pad_id=tokenizer.pad_token_id)
        torch.testing.assert_close(token_logps(model, padded), expected[1.0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- rewards


def test_sql_format_reward():
    good = ["SELECT name FROM employees WHERE city = 'Oslo'", "  select count(*) from employees;  ",
            "SELECT e.name\nFROM employees e\nWHERE e.salary > 5"]
    bad = ["", "The answer is SELECT name FROM employees", "```sql\nSELECT 1\n```", "SELECT 1; DROP TABLE x",
           "SELECT 1\n\nThis query returns one.", "SELECT name FROM employees\nThis query lists all names",
           "SELECT name FROM employees WHERE city = 'Oslo", "DELETE FROM employees"]
    assert [sql_format_reward(t) for t in good] == [FORMAT_BONUS] * len(good)
    assert [sql_format_reward(t) for t in bad] == [0.0] * len(bad)
    assert generic_format_reward("a fine answer") == FORMAT_BONUS
    assert generic_format_reward("   ") == 0.0
    assert generic_format_reward("go on and on " * 3) == 0.0


def test_task_reward_executes_sql():
    from tunesmith.data.tasks import get_task

    task = get_task("sql")
    ex = task.examples("validation")[0]
    rewards = build_rewards(["task", "format"], task)
    wrong = ex.reference.replace("SELECT", "SELECT 1,", 1)  # one more column: a different result
    got = rewards([ex.reference, wrong, "no idea"], [ex, ex, ex])
    torch.testing.assert_close(got, torch.tensor([1.0 + FORMAT_BONUS, FORMAT_BONUS, 0.0]))


def test_exact_match_and_custom_rewards(tmp_path):
    (tmp_path / "my_reward.py").write_text(
        "def short(prediction, example):\n    return 1.0 / (1 + len(prediction))\nNOT_A_FUNCTION = 3\n")
    ex = Example("e1", "q", "Paris")
    rewards = build_rewards(["exact_match", f"{tmp_path}/my_reward.py:short"], task=None)
    parts = rewards.components(["paris.", "Lyon"], [ex, ex])
    torch.testing.assert_close(parts["exact_match"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(rewards(["paris.", "Lyon"], [ex, ex]), torch.tensor([1.0 + 1 / 7, 1 / 5]))
    assert load_function("math:sqrt")(4.0) == 2.0  # dotted modules import too
    with pytest.raises(RewardError, match="cannot import"):
        build_rewards(["no_such_module_xyz:f"], None)
    with pytest.raises(RewardError, match="not a function"):
        build_rewards([f"{tmp_path}/my_reward.py:NOT_A_FUNCTION"], None)
    with pytest.raises(RewardError, match="has no attribute"):
        build_rewards([f"{tmp_path}/my_reward.py:missing"], None)
    with pytest.raises(RewardError, match="unknown reward"):
        build_rewards(["exactmatch"], None)
    (tmp_path / "bad.py").write_text("def nan(prediction, example):\n    return float('nan')\n")
    with pytest.raises(RewardError, match="finite number"):
        build_rewards([f"{tmp_path}/bad.py:nan"], None)(["x"], [ex])


# ----------------------------------------------------------------------------- prompts and sampling


def test_prompt_order_depends_only_on_seed_and_step():
    a = [prompt_indices(10, 4, seed=3, step=s) for s in range(5)]
    b = [prompt_indices(10, 4, seed=3, step=s) for s in reversed(range(5))][::-1]
    assert a == b
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # each pass covers all
    assert flat[:10] != flat[10:20]  # a new shuffle per pass
    assert prompt_indices(10, 4, seed=4, step=0) != a[0]


def test_sampled_ids_stop_after_the_end_of_turn(tokenizer):
    from tunesmith.models.attention import PACKED, use_packed_attention

    model = make_tiny_model(tokenizer)
    eos = tokenizer.eos_token_id
    head = torch.nn.Linear(64, len(tokenizer), bias=True)  # an untied head whose bias makes eos likely
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = math.log(len(tokenizer)) - 1.5  # ~18% chance of ending at every step
    model.lm_head = head
    use_packed_attention(model)
    model.train()
    rows = [[1, 20, 30, 40, 50, 60], [1, 50]] * 4  # different lengths: left padding
    kw = dict(max_new_tokens=6, temperature=1.0, stops=[eos], pad=eos, precision="fp32")
    a = sample_completions(model, rows, seed=7, **kw)
    assert a == sample_completions(model, rows, seed=7, **kw)  # seeded
    assert a != sample_completions(model, rows, seed=8, **kw)
    for c in a:
        assert 1 <= len(c) <= 6 and eos not in c[:-1]  # cut right after the first end-of-turn, kept
    assert any(c[-1] == eos and len(c) < 6 for c in a) and any(eos not in c for c in a)
    assert model.config._attn_implementation == PACKED and model.training  # switched back for training


# ----------------------------------------------------------------------------- the loop


class YesTask:
    """A toy verifiable task: the answer is right when it says `yes`."""
    name, metric, system_prompt = "yes", "accuracy", "Answer yes or no."

    def examples(self, split):
        return [Example(f"q{i}", f"Q{i}?", "yes") for i in range(8)]

    def score(self, prediction, example):
        ok = "yes" in prediction.lower()
        return Verdict(ok, float(ok))


@pytest.fixture(scope="module")
def yes_no_model(tokenizer):
    """A tiny random model after a short SFT on `yes` and `no` in equal measure: the policy GRPO
    starts from says each about half the time (a random 49k-token model never says either)."""
    from tunesmith.data.render import Renderer
    from tunesmith.objectives.sft import causal_lm_loss

    model = make_tiny_model(tokenizer)
    render, task = Renderer(tokenizer), YesTask()
    samples = [render.chat([{"role": "system", "content": task.system_prompt},
                            {"role": "user", "content": ex.prompt}, {"role": "assistant", "content": answer}])
               for ex in task.examples("train") for answer in ("yes", "no")]
    batch = collate(samples, packing=True, pad_id=tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        loss, n, _ = causal_lm_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    return model


def train_grpo(recipe, task=None, **kw):
    """GRPO through the run harness, with a Task object in place of objective.grpo.task."""
    return train(recipe, objective=GRPO.build(recipe, task=task), **kw)


def grpo_recipe(tmp_path, *overrides):
    return load_recipe(None, [f"output_dir={tmp_path}", "name=g", "objective.name=grpo", "train.precision=fp32",
                              "train.warmup=0", "train.schedule=constant", "train.lr=1e-2", "method.lora.rank=8",
                              "method.lora.alpha=16", "objective.grpo.samples=8", "objective.grpo.prompts_per_step=4",
                              "objective.grpo.max_new_tokens=2", "objective.grpo.reward=[task]", *overrides])


def rewards_of(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r]


def test_reward_rises_on_a_toy_task(tmp_path, tokenizer, yes_no_model):
    result = train_grpo(grpo_recipe(tmp_path, "train.steps=20"), task=YesTask(),
                        model=copy.deepcopy(yes_no_model), tokenizer=tokenizer)
    rows = rewards_of(result.run_dir)
    curve = [r["reward_mean"] for r in rows]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert result.status == "completed" and len(rows) == 20
    assert 0.2 < first < 0.8, curve  # the start really is a coin flip, so there is something to learn
    assert last > first + 0.2, curve
    assert all(r["pass_rate"] == r["reward_mean"] for r in rows)  # reward [task] is exactly the pass rate
    # iterations=1: old logps are the current ones. A step whose groups all drew equal rewards trains
    # nothing (no ratio is logged); sampling decides how often that happens
    trained = [r for r in rows if r["trained_tokens"]]
    assert len(trained) >= 15 and all("ratio" not in r for r in rows if not r["trained_tokens"])
    assert all(r["ratio"] == pytest.approx(1.0) for r in trained)
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    report = (result.run_dir / "report.md").read_text()
    assert "reward.png" in report and (result.run_dir / "reward.png").is_file()


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tokenizer, yes_no_model):
    settings = ["train.steps=5", "objective.grpo.kl_beta=0.05", "objective.grpo.iterations=2", "train.save_every=0",
                "objective.grpo.max_new_tokens=3"]
    whole = train_grpo(grpo_recipe(tmp_path / "a", *settings), task=YesTask(), model=copy.deepcopy(yes_no_model),
                       tokenizer=tokenizer)
    with stopping_after(2):
        part = train_grpo(grpo_recipe(tmp_path / "b", *settings), task=YesTask(), model=copy.deepcopy(yes_no_model),
                          tokenizer=tokenizer)
    assert part.status == "interrupted" and part.step == 2
    rest = train_grpo(grpo_recipe(tmp_path / "b", *settings, "resume=true"), task=YesTask(),
                      model=copy.deepcopy(yes_no_model), tokenizer=tokenizer)
    assert rest.status == "completed" and rest.step == 5
    a, b = rewards_of(whole.run_dir), rewards_of(rest.run_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "reward_mean", "kl", "clip_fraction", "grad_norm", "completion_len"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-7), key
    assert any(r["kl"] > 0 for r in a) and any(r["loss"] != 0 for r in a)  # the compared numbers are live
    from safetensors.torch import load_file

    wa = load_file(whole.run_dir / "adapter" / "adapter_model.safetensors")
    wb = load_file(rest.run_dir / "adapter" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_grpo_needs_steps_and_one_process(tmp_path, tokenizer):
    with pytest.raises((TrainError, ObjectiveError), match="train.steps"):
        train_grpo(grpo_recipe(tmp_path), task=YesTask(), tokenizer=tokenizer)
    with pytest.raises((TrainError, ObjectiveError), match="one process"):
        train_grpo(grpo_recipe(tmp_path, "train.steps=2", "nproc=2"), task=YesTask(), tokenizer=tokenizer)
    with pytest.raises((TrainError, ObjectiveError), match="unknown reward"):
        train_grpo(grpo_recipe(tmp_path, "train.steps=2", "objective.grpo.reward=[tsak]"), task=YesTask(),
                   tokenizer=tokenizer)
    with pytest.raises((TrainError, ObjectiveError), match="unknown task"):
        train_grpo(grpo_recipe(tmp_path / "t", "train.steps=2", "objective.grpo.task=nope"), tokenizer=tokenizer)
    with pytest.raises((TrainError, ObjectiveError), match="temperature"):
        train_grpo(grpo_recipe(tmp_path, "train.steps=2", "objective.grpo.temperature=0"), task=YesTask(),
                   tokenizer=tokenizer)


def test_train_runs_grpo_on_the_sql_task(tmp_path, tiny_model_dir):
    """`train()` (what `tunesmith train` calls) builds GRPO from objective.name, here with the
    built-in sql task, its execution reward and an evaluation at the end."""
    recipe = grpo_recipe(tmp_path, f"model.name={tiny_model_dir}", "train.steps=2", "objective.grpo.task=sql",
                         "objective.grpo.reward=[task, format]", "objective.grpo.samples=2",
                         "objective.grpo.prompts_per_step=2", "objective.grpo.max_new_tokens=4", "eval.task=sql",
                         "eval.split=test", "eval.limit=2", "eval.max_new_tokens=4")
    result = train(recipe)
    rows = rewards_of(result.run_dir)
    assert result.status == "completed" and [r["step"] for r in rows] == [1, 2]
    assert all("reward_task" in r and "reward_format" in r and r["completion_len"] <= 4 for r in rows)
    assert "eval_accuracy" in result.summary and (result.run_dir / "eval-test.json").is_file()
    assert "Evaluation: sql (test split, 2 examples)" in (result.run_dir / "report.md").read_text()


def test_grpo_calls_the_epoch_hook_once_per_pass_over_the_prompts(tmp_path, tokenizer, yes_no_model, monkeypatch):
    from tunesmith.methods.base import MethodBase

    seen = []
    monkeypatch.setattr(MethodBase, "on_epoch", lambda self, model, epoch, optimizer=None: seen.append(
        (epoch, optimizer is not None)))
    n = len(YesTask().examples("train"))
    steps = 2 * n // 4 + 1  # 4 prompts a step: a little over two passes
    train_grpo(grpo_recipe(tmp_path, f"train.steps={steps}"), task=YesTask(), model=copy.deepcopy(yes_no_model),
               tokenizer=tokenizer)
    assert seen == [(0, True), (1, True), (2, True)]

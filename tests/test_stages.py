"""Recipe stages on a tiny model: each stage starts from the previous stage's output (the same
losses as chaining the runs by hand, different from not carrying it), a job stopped in stage 2 and
resumed equals the uninterrupted job, finished stages are not rerun nor silently replaced, stacked
mode is one run over all the stages' data, and stage mistakes are one-line recipe errors."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_recipe, train_losses, write_chats
from tunesmith.config import RecipeError
from tunesmith.recipe import load_recipe
from tunesmith.train.loop import TrainError, stopping_after, train
from tunesmith.train.stages import plan_stages


def write_products(path, n=16):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} times {i + 2}?"},
                          {"role": "assistant", "content": f"{i} times {i + 2} is {i * (i + 2)}."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def staged(tmp_path, model_dir, *extra, steps=(2, 4)):
    """Stage `sums` (the arithmetic chats, lr 1e-2) then stage `products` (other chats, lr 5e-3)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    products = write_products(tmp_path / "products.jsonl")
    stages = (f"stages=[{{name: sums, train: {{steps: {steps[0]}}}}}, "
              f"{{name: products, data: {{train: '{products}'}}, train: {{steps: {steps[1]}, lr: 5.0e-3, warmup: 0, "
              f"schedule: constant}}}}]")
    return tiny_recipe(tmp_path, model_dir, "method.lora.dropout=0", "data.val_fraction=0", stages, *extra)


def adapter(folder):
    return load_file(str(folder / "adapter" / "delta.safetensors"))


def test_stage_two_starts_from_stage_one(tmp_path, tiny_model_dir):
    job = train(staged(tmp_path / "job", tiny_model_dir))
    assert job.status == "completed" and (job.step, job.total_steps) == (6, 6)
    first, second = job.run_dir / "sums", job.run_dir / "products"
    assert len(train_losses(first)) == 2 and len(train_losses(second)) == 4
    # stage 2 by hand: a single run that continues stage 1's adapter — the same losses, the same adapter
    alone = [f"model.name={tiny_model_dir}", f"data.train={tmp_path / 'job' / 'products.jsonl'}", "name=p",
             "data.val_fraction=0", "train.batch_tokens=256", "train.steps=4", "train.precision=fp32", "train.lr=5e-3",
             "train.warmup=0", "train.schedule=constant", "data.max_length=128", "method.lora.dropout=0"]
    hand = train(load_recipe(None, [*alone, f"model.adapter={first / 'adapter'}", f"output_dir={tmp_path / 'hand'}"]))
    assert train_losses(hand.run_dir) == train_losses(second)
    a, b = adapter(second), adapter(hand.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and not what stage 2 gives from the base model: the carried adapter matters
    fresh = train(load_recipe(None, [*alone, f"output_dir={tmp_path / 'fresh'}"]))
    assert abs(train_losses(fresh.run_dir)[0] - train_losses(second)[0]) > 1e-3
    # the job folder answers for its last stage; its report has a row per stage
    assert (job.run_dir / "adapter").resolve() == (second / "adapter").resolve()
    from tunesmith.export.tuned import load_tuned
    from tunesmith.models.load import load_model

    model, _ = load_model(str(tiny_model_dir))
    load_tuned(model, job.run_dir)  # `--adapter <job folder>` reads the last stage's adapter
    trained = dict(model.named_parameters())
    assert all(torch.equal(trained[k], v) for k, v in adapter(second).items())
    assert job.output == second / "adapter"
    report = (job.run_dir / "report.md").read_text()
    assert "[sums](sums/report.md)" in report and "[products](products/report.md)" in report
    state = json.loads((job.run_dir / "stages.json").read_text())
    assert [(s["name"], s["status"], s["steps"], s["output"]) for s in state["stages"]] == [
        ("sums", "completed", 2, "sums/adapter"), ("products", "completed", 4, "products/adapter")]


def test_stopped_in_stage_two_and_resumed_equals_uninterrupted(tmp_path, tiny_model_dir):
    full = train(staged(tmp_path / "a", tiny_model_dir))
    with stopping_after(3):  # stage 1 ends at step 2 (< 3); stage 2 stops after its step 3
        first = train(staged(tmp_path / "b", tiny_model_dir))
    job = first.run_dir
    assert first.status == "interrupted" and first.step == 2 + 3
    assert json.loads((job / "stages.json").read_text())["stages"][1]["status"] == "interrupted"
    assert not (job / "adapter").exists()
    with pytest.raises(TrainError, match="resume=true"):
        train(staged(tmp_path / "b", tiny_model_dir))
    # a finished stage is never silently replaced by another recipe
    with pytest.raises(TrainError, match="stage 1 `sums` finished under another recipe"):
        train(staged(tmp_path / "b", tiny_model_dir, "resume=true", "train.lr=2e-2"))
    stage_one = (job / "sums" / "metrics.jsonl").read_text()
    job = job.parent.rename(tmp_path / "b" / "moved") / "t"  # a job folder may move between sessions
    resumed = train(staged(tmp_path / "b", tiny_model_dir, "resume=true", "train.threads=1",
                           f"output_dir={job.parent}"))
    assert resumed.run_dir == job
    assert resumed.status == "completed" and resumed.step == 6
    assert (job / "sums" / "metrics.jsonl").read_text() == stage_one, "a finished stage ran again"
    for name in ("sums", "products"):
        a, b = train_losses(full.run_dir / name), train_losses(job / name)
        assert len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b)), (name, a, b)
    a, b = adapter(full.run_dir / "products"), adapter(job / "products")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], adapter(job / "sums")[k]) for k in a), "stage 2 did not train"
    # killed outright (SIGKILL, no chance to record anything) right after a checkpoint: in stage 2 after
    # its step 2; in stage 1 after its last step, before its output and the job's record were written
    for folder, stage, step in (("c", "products", 2), ("d", "sums", 2)):
        killed = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / folder), str(tiny_model_dir), stage,
                                 str(step)], cwd=Path(__file__).parent.parent, capture_output=True, text=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        job = tmp_path / folder / "runs" / "t"
        assert [e["status"] for e in json.loads((job / "stages.json").read_text())["stages"]] == \
            (["completed", "pending"] if stage == "products" else ["pending", "pending"])
        resumed = train(staged(tmp_path / folder, tiny_model_dir, "resume=true"))
        assert resumed.status == "completed" and resumed.step == 6
        for name in ("sums", "products"):
            a, b = train_losses(full.run_dir / name), train_losses(job / name)
            assert len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b)), (folder, name, a, b)


# a staged job whose process dies (SIGKILL) just after stage argv[3] writes its step-argv[4] checkpoint
KILLED = """
import os, signal, sys
from pathlib import Path
from tests.test_stages import staged
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import train

save = ckpt.save_checkpoint
def save_then_die(run_dir, step, *args, **kwargs):
    folder = save(run_dir, step, *args, **kwargs)
    if Path(run_dir).name == sys.argv[3] and step == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
    return folder
ckpt.save_checkpoint = save_then_die
train(staged(Path(sys.argv[1]), Path(sys.argv[2])))
"""


def test_full_fine_tuning_carries_the_saved_model(tmp_path, tiny_model_dir):
    # a job that fails before its first step (a missing file) has made no progress: run it again as new
    with pytest.raises(ValueError, match="missing.jsonl"):
        train(staged(tmp_path, tiny_model_dir, f"data.train={tmp_path / 'missing.jsonl'}"))
    job = train(staged(tmp_path, tiny_model_dir, "method.name=full", "train.lr=1e-4", steps=(1, 1)))
    assert job.status == "completed"
    second = load_recipe(job.run_dir / "products" / "recipe.yaml")
    assert second.model.name == str(job.run_dir / "sums" / "model") and second.model.adapter is None
    assert (job.run_dir / "model").resolve() == (job.run_dir / "products" / "model").resolve()


def test_stacked_is_one_run_over_every_stage(tmp_path, tiny_model_dir):
    recipe = staged(tmp_path, tiny_model_dir, "stage_mode=stacked", steps=(2, 3))
    (stacked,) = plan_stages(recipe)
    sums = tmp_path / "chats.jsonl"
    assert stacked.name == "stacked"
    assert stacked.recipe.data.train == f"{sums}+{tmp_path / 'products.jsonl'}"
    assert stacked.recipe.train.steps == 5 and stacked.recipe.train.lr == recipe.train.lr  # the recipe's own train
    assert stacked.recipe.run_dir == recipe.run_dir / "stacked"
    job = train(recipe)
    assert job.status == "completed" and job.step == 5
    assert len(train_losses(job.run_dir / "stacked")) == 5
    # phased: the same stages, two runs
    phased = plan_stages(staged(tmp_path, tiny_model_dir, steps=(2, 3)))
    assert [s.name for s in phased] == ["sums", "products"]
    assert [s.recipe.train.lr for s in phased] == [1e-2, 5e-3]


def test_stage_mistakes_are_recipe_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nstages:\n  - name: a\n    train:\n      lrr: 1.0e-4\n")
    with pytest.raises(RecipeError, match=r"r.yaml:5: unknown recipe key `stages\[0\].train.lrr`; did you mean `lr`"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="stage names must differ: `a`"):
        load_recipe(None, ["stages=[{name: a}, {name: a}]"])
    with pytest.raises(RecipeError, match=r"stages\[0\].name: `a/b` is not a folder name"):
        load_recipe(None, ["stages=[{name: a/b}]"])
    with pytest.raises(RecipeError, match=r"stages\[1\].data.max_length: must be > 0"):
        load_recipe(None, ["stages=[{}, {data: {max_length: 0}}]"])
    unnamed = load_recipe(None, ["stages=[{}, {train: {lr: 1.0e-5}}]"])
    assert [s.name for s in unnamed.stages] == ["stage1", "stage2"]
    # a stage's keys are laid over the recipe's own; the rest is inherited
    recipe = load_recipe(None, ["train.lr=3e-4", "train.steps=7", "stages=[{}, {train: {lr: 1.0e-5}}]"])
    one, two = plan_stages(recipe)
    assert (one.recipe.train.lr, two.recipe.train.lr) == (3e-4, 1e-5)
    assert one.recipe.train.steps == two.recipe.train.steps == 7 and not two.recipe.stages


def test_a_staged_recipe_file_through_the_cli(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main

    products = write_products(tmp_path / "products.jsonl")
    path = tmp_path / "two-stage.yaml"
    path.write_text(f"name: two\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: {tiny_model_dir}}}\n"
                    f"data: {{train: {write_chats(tmp_path / 'chats.jsonl')}, max_length: 128}}\n"
                    "train: {steps: 1, batch_tokens: 256, precision: fp32, speed: off}\n"
                    "stages:\n  - name: first\n  - name: second\n"
                    f"    data: {{train: {products}}}\n    train: {{lr: 1.0e-5}}\n")
    assert main(["train", str(path)]) == 0
    job = tmp_path / "runs" / "two"
    assert f"report: {job / 'report.md'}" in capsys.readouterr().out
    assert load_recipe(job / "recipe.yaml") == load_recipe(path)  # the whole job's recipe, stages included
    assert load_recipe(job / "second" / "recipe.yaml").train.lr == 1e-5
    assert main(["train", str(path)]) != 0  # a second fresh run refuses the job folder, in one line
    assert "already holds a staged run: continue it with resume=true" in capsys.readouterr().err


def test_two_processes_run_the_stages_as_one(tmp_path, tiny_model_dir):
    """Every rank carries the model from stage to stage (only rank 0 saves it): two FSDP processes
    (each builds its own shard, nothing is broadcast) with the same global batch give the
    one-process job's losses in both stages."""
    from tests.test_distributed import ROOT, overrides, torchrun

    products = write_products(tmp_path / "products.jsonl")
    extra = (f"stages=[{{name: a, train: {{steps: 2}}}}, {{name: b, data: {{train: '{products}'}}, "
              f"train: {{steps: 2, lr: 2.0e-3}}}}]", "method.name=full", "train.lr=1e-3")
    one = train(load_recipe(ROOT / "recipes" / "lora-sft.yaml",
                            overrides(tmp_path, tiny_model_dir, "one", "train.grad_accum=2", *extra)))
    torchrun(overrides(tmp_path, tiny_model_dir, "two", "train.grad_accum=1", "train.strategy=fsdp", *extra))
    two = tmp_path / "runs" / "two"
    for name in ("a", "b"):
        x, y = train_losses(one.run_dir / name), train_losses(two / name)
        assert len(x) == len(y) == 2 and all(abs(p - q) < 1e-4 for p, q in zip(x, y)), (name, x, y)
    assert load_recipe(two / "b" / "recipe.yaml").model.name == str(two / "a" / "model")

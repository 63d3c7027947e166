"""`tunesmith bench --lengths`: one measured row per length, each in its own process; the estimate's
peak against the measured one at two lengths, and activation checkpointing chosen when the
estimate says a step would not fit (and measured to need less)."""
import json

import pytest

from tests.conftest import make_tiny_model, save_model_dir, tiny_recipe
from tunesmith.bench import lengths as bl
from tunesmith.recipe import to_yaml


@pytest.fixture(scope="module")
def mid_model_dir(tokenizer, tmp_path_factory):
    """4 layers, hidden 128: activations are a visible share of a step's peak at 1-2K tokens."""
    model = make_tiny_model(tokenizer, layers=4, hidden=128, intermediate=512, positions=4096)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("mid-model"))


@pytest.fixture(scope="module", autouse=True)
def fixed_mmap_threshold():
    """glibc's sliding mmap threshold keeps the freed heap pages of few-MB tensors in the RSS (70 MB
    at 2K tokens here, growing with the length); a fixed threshold returns them, so the measured
    peak follows the live tensors the estimate counts. The spawned processes inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
        mp.setenv("TUNESMITH_ALLOCATOR", "system")
        yield


@pytest.fixture(scope="module")
def measured(mid_model_dir, tmp_path_factory):
    """`tunesmith bench --lengths 512,2k` as a user runs it (the JSON it writes), with the recipe's settings."""
    from tunesmith.cli import main

    tmp = tmp_path_factory.mktemp("lengths")
    recipe = tiny_recipe(tmp, mid_model_dir, "method.name=full", "train.threads=1", "train.loss_chunk=256",
                         "model.attention=packed")
    path = tmp / "recipe.yaml"
    path.write_text(to_yaml(recipe))
    assert main(["bench", str(path), "--lengths", "512,2k", "--steps", "1", "--warmup", "0",
                 "--json", str(tmp / "rows.json")]) == 0
    return recipe, json.loads((tmp / "rows.json").read_text())["rows"]


def test_parse_lengths():
    assert bl.parse_lengths("1k,2k, 16K,3000") == [1024, 2048, 16384, 3000]
    with pytest.raises(ValueError, match="--lengths: `2m`"):
        bl.parse_lengths("1k,2m")


def test_one_row_per_length_with_the_estimate_beside_it(measured):
    _, rows = measured
    assert [r["length"] for r in rows] == [512, 2048]
    assert all(r["tokens_per_s"] > 0 and not r["checkpointing"] and r["chosen"] == [] for r in rows)
    assert rows[1]["peak_mem_gb"] > rows[0]["peak_mem_gb"]
    for r in rows:  # the estimate (its own fresh process) against the bench's peak RSS
        assert r["estimated_gb"] == pytest.approx(r["peak_mem_gb"], rel=0.15)
    grown = rows[1]["peak_mem_gb"] - rows[0]["peak_mem_gb"]
    assert rows[1]["estimated_gb"] - rows[0]["estimated_gb"] == pytest.approx(grown, rel=0.35)


def test_checkpointing_is_chosen_when_the_estimate_does_not_fit(measured):
    recipe, rows = measured
    budget = 0.97 * rows[1]["estimated_gb"]  # the 2K row as the recipe has it would not fit
    messages = []
    [row] = bl.bench_lengths(recipe, [2048], steps=1, warmup=0, budget_gb=budget, log=messages.append)
    assert row.chosen == ["activation checkpointing"] and row.checkpointing
    assert row.estimated_gb < budget and row.estimated_gb < rows[1]["estimated_gb"]
    assert row.peak_mem_gb < rows[1]["peak_mem_gb"]  # measured: checkpointing needs less
    assert row.estimated_gb == pytest.approx(row.peak_mem_gb, rel=0.15)
    assert any("activation checkpointing" in m for m in messages)

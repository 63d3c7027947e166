"""Mixing by tokens: each source's share of the epoch's tokens is its weight (within 1% on a
benchmark-sized set), small sources repeat with a fresh shuffle per pass, big ones are subsampled,
the choice is a function of the seed, and a mixed run (shards + a file) resumes exactly."""
import json

import numpy as np
import pytest

from tests.conftest import tiny_recipe, train_losses, write_chats
from tunesmith.config import RecipeError
from tunesmith.data import DataError, format_inspection, load_data
from tunesmith.data.mix import MixedSamples, mix_by_tokens, mix_rows
from tunesmith.data.shards import ShardWriter, tokenizer_meta
from tunesmith.objectives.sft import SFT
from tunesmith.recipe import load_recipe
from tunesmith.train.batches import MicroBatches
from tunesmith.train.loop import stopping_after, train


def benchmark_lengths(seed=0):
    """Three sources as unlike as mixing meets: many short samples, few long ones, a wide spread."""
    rng = np.random.default_rng(seed)
    return [rng.integers(20, 80, 40_000), rng.integers(400, 2000, 1_500), rng.lognormal(5, 1, 10_000).astype(int) + 1]


@pytest.mark.parametrize("weights,total", [([0.5, 0.3, 0.2], None), ([0.1, 0.6, 0.3], None),
                                           ([1, 1, 1], 5_000_000), ([0.7, 0.2, 0.1], 200_000)])
def test_token_shares_match_the_weights(weights, total):
    lengths = benchmark_lengths()
    chosen = mix_by_tokens(lengths, weights, seed=1, total_tokens=total)
    tokens = np.array([x[c].sum() for x, c in zip(lengths, chosen)], dtype=float)
    share, want = tokens / tokens.sum(), np.array(weights) / np.sum(weights)
    assert np.abs(share - want).max() < 0.01, (share, want)
    # each source lands within half a sample of its own target
    target = want * (total or sum(int(x.sum()) for x in lengths))
    for x, t, k in zip(lengths, tokens, range(3)):
        assert abs(t - target[k]) <= x.max() / 2 + 1
    # by samples the shares are far from the weights: counting samples would be the wrong mix
    by_samples = np.array([len(c) for c in chosen]) / sum(len(c) for c in chosen)
    assert np.abs(by_samples - want).max() > 0.05


def test_small_sources_repeat_reshuffled_big_ones_subsample():
    lengths = [np.full(100, 10), np.full(1000, 10)]  # 1,000 and 10,000 tokens
    small, big = mix_by_tokens(lengths, [0.5, 0.5], seed=3)  # 5,500 tokens each
    counts = np.bincount(small, minlength=100)
    assert len(small) == 550 and set(counts.tolist()) == {5, 6}  # 5 full passes and half of a sixth
    passes = small[:500].reshape(5, 100)
    assert all(sorted(p) == list(range(100)) for p in passes)  # every full pass is a permutation ...
    assert len({tuple(p) for p in passes}) == 5  # ... a fresh one each time
    assert len(big) == 550 and len(set(big.tolist())) == 550  # subsampled: no sample twice
    rows = mix_rows(["s", "b"], lengths, [small, big], [0.5, 0.5])
    assert [r["repeats"] for r in rows] == [5.5, 0.55] and [r["share"] for r in rows] == [0.5, 0.5]


def test_the_choice_is_a_function_of_the_seed():
    lengths = benchmark_lengths(2)
    a, b = mix_by_tokens(lengths, [2, 1, 1], seed=7), mix_by_tokens(lengths, [2, 1, 1], seed=7)
    c = mix_by_tokens(lengths, [2, 1, 1], seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_bad_mixes_are_clear_errors():
    with pytest.raises(DataError, match="2 sources but 1 weights"):
        mix_by_tokens([np.ones(3), np.ones(3)], [1.0], seed=0)
    with pytest.raises(DataError, match="positive"):
        mix_by_tokens([np.ones(3), np.ones(3)], [1.0, 0.0], seed=0)
    with pytest.raises(DataError, match="source 1 has no tokens"):
        mix_by_tokens([np.ones(3), np.zeros(0)], [1.0, 1.0], seed=0)
    with pytest.raises(RecipeError, match="data.train or data.mix, not both"):
        load_recipe(None, ["data.train=a.jsonl", "data.mix=[{path: b.jsonl, weight: 1}]"])
    with pytest.raises(RecipeError, match=r"data.mix\[0\].weight: must be > 0"):
        load_recipe(None, ["data.mix=[{path: b.jsonl, weight: 0}]"])


def write_texts(path, n, words):
    path.write_text("".join(json.dumps({"text": " ".join([f"w{i}"] * words)}) + "\n" for i in range(n)))
    return path


def test_load_data_mixes_files_by_tokens(tmp_path, tokenizer):
    short = write_texts(tmp_path / "short.jsonl", 200, 3)
    long = write_texts(tmp_path / "long.jsonl", 20, 60)
    recipe = load_recipe(None, [f"data.mix=[{{path: {short}, weight: 0.1}}, {{path: {long}, weight: 0.9}}]",
                                "data.mix_tokens=12000"])
    splits = load_data(recipe.data, tokenizer, seed=0, report=False)
    rows = splits.stats["train"]["mix"]
    assert [r["source"] for r in rows] == [str(short), str(long)]
    assert abs(rows[0]["share"] - 0.1) < 0.01 and rows[1]["repeats"] > 1 > rows[0]["repeats"]
    assert isinstance(splits.train, list) and len(splits.train) == sum(r["samples"] for r in rows)
    assert sum(len(s["input_ids"]) for s in splits.train) == splits.stats["train"]["tokens"]
    shown = format_inspection(splits.train, tokenizer, splits.stats, n=0)  # `tunesmith data inspect`
    assert f"mix {short}" in shown and "weight 0.100" in shown and f"{rows[1]['samples']:,} samples" in shown
    again = load_data(recipe.data, tokenizer, seed=0, report=False).train
    assert again == splits.train
    assert load_data(recipe.data, tokenizer, seed=1, report=False).train != splits.train


def test_a_mix_of_shards_and_a_file_is_lazy_and_resumes_exactly(tmp_path, tiny_model_dir, tokenizer):
    chats = write_chats(tmp_path / "chats.jsonl", n=24)
    base = load_recipe(None, [f"data.train={chats}", "data.max_length=128"])
    with ShardWriter(tmp_path / "s", meta=tokenizer_meta(tokenizer)) as w:
        for s in load_data(base.data, tokenizer, report=False).train:
            w.add(s, "chats.jsonl")
    other = write_chats(tmp_path / "more.jsonl", n=10)
    mix = f"data.mix=[{{path: {tmp_path / 's'}, weight: 0.6}}, {{path: {other}, weight: 0.4}}]"
    splits = load_data(load_recipe(None, [mix, "data.val_fraction=0.2"]).data, tokenizer, report=False)
    assert isinstance(splits.train, MixedSamples) and splits.val is not None
    assert splits.train.sources.tolist().count(1) == splits.stats["train"]["mix"][1]["samples"]
    assert [len(x["input_ids"]) for x in splits.train] == splits.train.lengths.tolist()
    recipe = load_recipe(None, ["data.packing=true", "train.batch_tokens=256"])
    stream = MicroBatches(splits.train, SFT(), recipe.data, recipe.train, seed=0, pad_id=0)
    assert int(sum(stream.get(i)[0]["input_ids"].numel() for i in range(len(stream.plan(0))))) == \
           int(splits.train.lengths.sum())

    full = train(tiny_recipe(tmp_path / "a", tiny_model_dir, 'data.train=""', mix))
    with stopping_after(3):
        train(tiny_recipe(tmp_path / "b", tiny_model_dir, 'data.train=""', mix))
    resumed = train(tiny_recipe(tmp_path / "b", tiny_model_dir, 'data.train=""', mix, "resume=true"))
    a, b = train_losses(full.run_dir), train_losses(resumed.run_dir)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-6, (a, b)

"""Tokenized shards: what is written is what is read (lazily), a shard folder trains exactly like the
file it came from, and a run stopped at a shard position resumes into the uninterrupted run."""
import json

import numpy as np
import pytest

from tests.conftest import tiny_recipe, train_losses, write_chats
from tunesmith.data import DataError, load_data
from tunesmith.data.shards import ShardWriter, is_shard_folder, open_shards, tokenizer_meta
from tunesmith.objectives.sft import SFT
from tunesmith.recipe import load_recipe
from tunesmith.train.batches import MicroBatches
from tunesmith.train.loop import stopping_after, train


def random_samples(n, seed=0, domains=False, vocab=49152):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(3, 40))
        start = int(rng.integers(1, k))
        weights = [0.0] * start + [1.0] * (k - start)
        s = {"input_ids": rng.integers(0, vocab, k).tolist(), "weights": weights}
        if domains:
            s["domain"] = i % 3
        out.append(s)
    return out


def write(folder, samples, tokenizer, shard_tokens=100, sources=("a.jsonl",)):
    with ShardWriter(folder, meta={**tokenizer_meta(tokenizer), "format": "chat"}, shard_tokens=shard_tokens) as w:
        for i, s in enumerate(samples):
            w.add(s, source=sources[i % len(sources)])
    return folder


def test_round_trip_across_shards(tmp_path, tokenizer):
    samples = random_samples(60, domains=True)
    samples[5]["weights"][-1] = 0.25  # a fractional weight: that shard keeps float weights
    write(tmp_path / "s", samples, tokenizer, shard_tokens=200, sources=("x.jsonl", "y.jsonl"))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert len(manifest["shards"]) > 3 and manifest["samples"] == 60
    assert manifest["sources"] == ["x.jsonl", "y.jsonl"]
    data = open_shards(tmp_path / "s", tokenizer)
    assert len(data) == 60
    assert list(data) == samples  # ids, weights (0/1 stored as bytes, 0.25 as float) and domains
    assert data.lengths.tolist() == [len(s["input_ids"]) for s in samples]
    assert data.unit_counts.tolist() == [sum(w > 0 for w in s["weights"]) for s in samples]
    assert data.sources.tolist() == [i % 2 for i in range(60)]
    assert manifest["tokens"] == int(data.lengths.sum())
    sub = data.subset([7, 3, 7, 59])  # order kept, repeats allowed; a subset of a subset
    assert list(sub) == [samples[7], samples[3], samples[7], samples[59]]
    assert sub.lengths.tolist() == [len(samples[i]["input_ids"]) for i in (7, 3, 7, 59)]
    assert list(sub.subset([3, 0])) == [samples[59], samples[7]]
    assert data[-1] == samples[-1] and list(data[10:13]) == samples[10:13]
    with pytest.raises(IndexError):
        data[60]


def test_a_folder_without_manifest_is_not_shards_and_bad_folders_are_refused(tmp_path, tokenizer):
    w = ShardWriter(tmp_path / "s", meta=tokenizer_meta(tokenizer), shard_tokens=50)
    for s in random_samples(20):
        w.add(s)
    assert list((tmp_path / "s").glob("shard-*.safetensors"))  # shards flushed while writing ...
    assert not is_shard_folder(tmp_path / "s")  # ... but no manifest yet: not a usable folder
    w.close({"kept": 20})
    assert is_shard_folder(tmp_path / "s")
    assert open_shards(tmp_path / "s").manifest["report"] == {"kept": 20}
    with pytest.raises(DataError, match="already holds shards"):
        ShardWriter(tmp_path / "s", meta={})
    # another tokenizer's shards are refused, naming both
    other = tmp_path / "o"
    with ShardWriter(other, meta={"tokenizer": "gpt2", "vocab_size": 50257, "tokenizer_hash": "0" * 16}) as w2:
        w2.add(random_samples(1)[0])
    with pytest.raises(DataError, match="tokenized with gpt2"):
        open_shards(other, tokenizer)
    (tmp_path / "s" / "shard-00001.safetensors").unlink()
    with pytest.raises(DataError, match="shard-00001.safetensors listed in the manifest is missing"):
        open_shards(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "shards": "x"}))
    with pytest.raises(DataError, match="`shards` must list the shard files"):
        open_shards(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        open_shards(tmp_path / "s")
    with pytest.raises(DataError, match="one length"):
        ShardWriter(tmp_path / "bad", meta={}).add({"input_ids": [1, 2], "weights": [0.0]}, "f.jsonl:3")


def shards_from_chats(path, folder, tokenizer, **overrides):
    """The chats of `path` rendered by load_data and written as shards (what `data prepare` does)."""
    recipe = load_recipe(None, [f"data.train={path}", "data.max_length=128", *overrides])
    samples = load_data(recipe.data, tokenizer, report=False).train
    write(folder, samples, tokenizer, shard_tokens=150)
    return samples


def test_load_data_from_shards_equals_from_the_file(tmp_path, tokenizer):
    chats = write_chats(tmp_path / "chats.jsonl", n=30)
    shards_from_chats(chats, tmp_path / "s", tokenizer)
    for extra in (["data.val_fraction=0.2"], ["data.limit=11"], []):
        a = load_data(load_recipe(None, [f"data.train={chats}", "data.max_length=128", *extra]).data, tokenizer,
                      seed=3, report=False)
        b = load_data(load_recipe(None, [f"data.train={tmp_path / 's'}", *extra]).data, tokenizer, seed=3,
                      report=False)
        assert list(b.train) == a.train and (b.val is None) == (a.val is None)
        assert b.val is None or list(b.val) == a.val
        assert {k: b.stats["train"][k] for k in ("samples", "tokens", "trained_tokens", "length_max")} == \
               {k: a.stats["train"][k] for k in ("samples", "tokens", "trained_tokens", "length_max")}


@pytest.mark.parametrize("packing", [True, False])
def test_lazy_micro_batches_equal_in_memory(tmp_path, tokenizer, packing):
    samples = random_samples(80, seed=4)
    lazy = open_shards(write(tmp_path / "s", samples, tokenizer, shard_tokens=300))
    recipe = load_recipe(None, [f"data.packing={packing}", "train.batch_tokens=120", "train.batch_size=3"])
    a = MicroBatches(samples, SFT(), recipe.data, recipe.train, seed=5, pad_id=0)
    b = MicroBatches(lazy, SFT(), recipe.data, recipe.train, seed=5, pad_id=0)
    assert b.lengths == a.lengths and b.unit_counts == a.unit_counts
    n = len(a.plan(0)) + len(a.plan(1))  # two epochs: the second is ordered differently
    assert a.plan(0) != a.plan(1)
    for i in range(n):
        (x, ex), (y, ey) = a.get(i), b.get(i)
        assert ex == ey and x.keys() == y.keys() and a.units(i) == b.units(i)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].equal(y[k]), (i, k)


def test_resume_from_a_shard_position_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, tokenizer):
    chats = write_chats(tmp_path / "chats.jsonl")
    shards_from_chats(chats, tmp_path / "s", tokenizer)
    shard = f"data.train={tmp_path / 's'}"
    from_file = train(tiny_recipe(tmp_path / "f", tiny_model_dir))
    full = train(tiny_recipe(tmp_path / "a", tiny_model_dir, shard))
    with stopping_after(3):
        first = train(tiny_recipe(tmp_path / "b", tiny_model_dir, shard))
    assert first.status == "interrupted" and first.step == 3
    resumed = train(tiny_recipe(tmp_path / "b", tiny_model_dir, shard, "resume=true"))
    assert resumed.status == "completed"
    f, a, b = train_losses(from_file.run_dir), train_losses(full.run_dir), train_losses(resumed.run_dir)
    assert len(a) == len(b) == 6
    assert a == f  # the shard folder trains exactly like the file it was made from
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-6, (a, b)


def test_resume_over_other_data_is_refused(tmp_path, tiny_model_dir, tokenizer):
    chats = write_chats(tmp_path / "chats.jsonl")
    samples = shards_from_chats(chats, tmp_path / "s", tokenizer)
    shard = f"data.train={tmp_path / 's'}"
    with stopping_after(2):
        first = train(tiny_recipe(tmp_path / "b", tiny_model_dir, shard))
    state = json.loads((first.run_dir / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["data"]["samples"] == len(samples) - round(0.2 * len(samples))
    import shutil

    shutil.rmtree(tmp_path / "s")
    write(tmp_path / "s", samples[:-3], tokenizer)  # the folder was prepared again, with other data
    with pytest.raises(DataError, match="training data changed since the checkpoint"):
        train(tiny_recipe(tmp_path / "b", tiny_model_dir, shard, "resume=true"))

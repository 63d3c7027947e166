"""`tunesmith data long-docs`: fake packages on disk -> the documents written by hand, token counts
from the tokenizer itself, rows that rebuild the text, a package split with no overlap, same bytes twice."""
import json

import pytest

from tunesmith.data.errors import DataError
from tunesmith.data.long_docs import build_long_docs, cut, split_packages, write_long_docs

FILES = {
    "alpha/__init__.py": "from .core import run\n",
    "alpha/core.py": "def run(x):\n    return x + 1\n" * 30,
    "alpha/empty.py": "   \n",
    "alpha/notes.txt": "not python",
    "alpha/__pycache__/core.py": "stale = True\n",
    "alpha/.hidden/w.py": "hidden = True\n",
    "alpha/sub/b.py": "B = 2  # second\n" * 20,
    "alpha/sub/a.py": "A = 1  # first\n" * 20,
    "beta/__init__.py": "from .core import run\n",  # the same bytes as alpha/__init__.py: left out
    "beta/tools.py": "import os\n\n\ndef walk(p):\n    return list(os.walk(p))\n" * 40,
    "gamma/g.py": "G = 'gamma'\n" * 200,
}


@pytest.fixture
def fake(tmp_path):
    for rel, text in FILES.items():
        path = tmp_path / "src" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "src"


def _doc(*rels):
    return "\n".join(f"# file: {rel}\n{FILES[rel]}" for rel in rels)


def _count(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_documents_headers_order_and_dedup(fake, tokenizer):
    docs = build_long_docs(tokenizer, packages=[], folders=[fake / "gamma", fake / "alpha", fake / "beta"],
                           min_tokens=1, held_out=["gamma"])
    expected = {"alpha": _doc("alpha/__init__.py", "alpha/core.py"), "alpha/sub": _doc("alpha/sub/a.py", "alpha/sub/b.py"),
                "beta": _doc("beta/tools.py")}
    assert [d.source for d in docs.train] == ["alpha", "alpha/sub", "beta"]
    assert {d.source: d.text for d in docs.train} == expected
    assert all(d.tokens == _count(tokenizer, d.text) for d in docs.train + docs.held_out)
    assert [(d.source, d.text) for d in docs.held_out] == [("gamma", _doc("gamma/g.py"))]
    assert docs.skipped == {"duplicate files": 1, "empty or unreadable files": 1}


def test_min_tokens_keeps_exactly_the_long_documents(fake, tokenizer):
    every = build_long_docs(tokenizer, packages=[], folders=[fake / "alpha", fake / "beta", fake / "gamma"],
                            min_tokens=1, held_out_fraction=0)
    counts = sorted(d.tokens for d in every.train)
    threshold = counts[1] + 1  # between the second and third shortest
    kept = build_long_docs(tokenizer, packages=[], folders=[fake / "alpha", fake / "beta", fake / "gamma"],
                           min_tokens=threshold, held_out_fraction=0)
    assert sorted(d.source for d in kept.train) == sorted(d.source for d in every.train if d.tokens >= threshold)
    with pytest.raises(DataError, match="--min-tokens"):
        build_long_docs(tokenizer, packages=[], folders=[fake / "alpha"], min_tokens=10 ** 6)


def test_rows_rebuild_the_text_at_token_boundaries(tokenizer):
    text = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(120))
    n = _count(tokenizer, text)
    rows = cut(text, tokenizer, min_tokens=1, max_tokens=100)
    assert "".join(t for t, _ in rows) == text
    assert [k for _, k in rows] == [100] * (n // 100) + ([n % 100] if n % 100 else [])
    assert all(abs(_count(tokenizer, t) - k) <= 2 for t, k in rows)  # re-tokenised rows: the same up to a seam
    long_only = cut(text, tokenizer, min_tokens=n % 100 + 1, max_tokens=100)
    assert long_only == [r for r in rows if r[1] == 100]  # the short tail is dropped


def test_split_is_by_whole_packages(fake, tokenizer):
    folders = [fake / "alpha", fake / "beta", fake / "gamma"]
    for fraction in (0.2, 0.5, 0.9):
        docs = build_long_docs(tokenizer, packages=[], folders=folders, min_tokens=1, held_out_fraction=fraction)
        train, held = {d.package for d in docs.train}, {d.package for d in docs.held_out}
        assert train and held and not train & held and train | held == {"alpha", "beta", "gamma"}
    assert split_packages({"a": 10, "b": 10, "c": 80}, None, 0.25) <= {"a", "b"}
    assert split_packages({"a": 50, "b": 50}, None, 0.1) == {"a"}  # none fits: the smallest (then by name)
    assert split_packages({"a": 50}, None, 0.5) == set()
    with pytest.raises(DataError, match="every package"):
        split_packages({"a": 1, "b": 1}, ["a", "b"], 0.1)
    with pytest.raises(DataError, match="`z`"):
        split_packages({"a": 1, "b": 1}, ["z"], 0.1)


def test_same_input_same_bytes(fake, tokenizer, tmp_path):
    outs = []
    for i, folders in enumerate(([fake / "alpha", fake / "beta", fake / "gamma"],
                                 [fake / "gamma", fake / "beta", fake / "alpha"])):
        docs = build_long_docs(tokenizer, packages=[], folders=folders, min_tokens=1, max_tokens=64)
        outs.append(write_long_docs(docs, tmp_path / f"out{i}"))
    for name in ("train.jsonl", "held_out.jsonl", "summary.md"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    rows = [json.loads(line) for line in (outs[0] / "train.jsonl").read_text().splitlines()]
    assert rows and all(set(r) == {"text", "source", "tokens"} and r["tokens"] <= 64 for r in rows)


def test_installed_package_and_command_line(tokenizer, tmp_path, fake):
    from tunesmith.cli import main

    docs = build_long_docs(tokenizer, packages=["tunesmith"], min_tokens=1, held_out_fraction=0)
    bench = next(d for d in docs.train if d.source == "tunesmith/bench")
    assert "# file: tunesmith/bench/estimate.py\n" in bench.text
    with pytest.raises(DataError, match="no_such_package"):
        build_long_docs(tokenizer, packages=["no_such_package"])
    out = tmp_path / "cli"
    assert main(["data", "long-docs", "--packages", "--folder", str(fake / "alpha"), "--folder", str(fake / "gamma"),
                 "--min-tokens", "1", "--held-out", "gamma", "--output", str(out), "--quiet"]) == 0
    held = [json.loads(line)["source"] for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert held == ["gamma"] and "| train | alpha |" in (out / "summary.md").read_text()

"""Long-context evaluation: prompt sizes and depths measured with the real tokenizer, scoring, the
grid's arithmetic with oracle models, position perplexity against the full logits, the command."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_model
from tunesmith.cli import main
from tunesmith.eval.long_context import LONG_TASKS, NEW_TOKENS, build_prompt, parse_depths, parse_lengths, score
from tunesmith.eval.long_grid import format_grid, position_perplexity, run_grid
from tunesmith.eval.runner import EvalError


def fact_offset(prompt) -> int:
    """Character offset of the sought fact in the haystack (not in the question or primer)."""
    if prompt.task == "passkey":
        return prompt.text.index(f"The pass key is {prompt.expected}.")
    if prompt.task == "needle":
        return prompt.text.index(f"is {prompt.expected}.")
    return prompt.text.index(f'": "{prompt.expected}"')


@pytest.mark.parametrize("task", LONG_TASKS)
def test_prompt_fills_the_length_without_passing_it(tokenizer, task):
    for length in (1024, 3000, 8192):
        p = build_prompt(task, tokenizer, length, 0.5, seed=1)
        budget = length - NEW_TOKENS[task]
        assert p.ids == tokenizer(p.text, add_special_tokens=False)["input_ids"]
        assert p.text.startswith("<|im_start|>") and p.text.count("<|im_start|>assistant") == 1  # chat template
        # never over the budget, and short of it by less than one haystack unit (a kv pair is ~65 tokens)
        assert budget - 70 <= len(p.ids) <= budget, (length, len(p.ids))
    assert build_prompt(task, tokenizer, 1024, 0.5, seed=1).ids == build_prompt(task, tokenizer, 1024, 0.5, seed=1).ids
    assert build_prompt(task, tokenizer, 1024, 0.5, seed=2).expected != build_prompt(task, tokenizer, 1024, 0.5,
                                                                                      seed=1).expected


@pytest.mark.parametrize("task", LONG_TASKS)
def test_fact_sits_at_the_requested_depth(tokenizer, task):
    for depth in (0, 0.25, 0.5, 0.75, 1):
        p = build_prompt(task, tokenizer, 4096, depth, seed=3)
        at = len(tokenizer(p.text[:fact_offset(p)], add_special_tokens=False)["input_ids"])
        assert abs(at / len(p.ids) - depth) < 0.04, (depth, at, len(p.ids))


def test_needle_prompt_holds_k_distinct_needles_and_asks_one(tokenizer):
    p = build_prompt("needle", tokenizer, 2048, 0.5, seed=0, needles=5)
    needles = re.findall(r"The special magic number for (\w+) is (\d{7})\.", p.text)
    assert len(needles) == 5 and len({w for w, _ in needles}) == 5 and len({n for _, n in needles}) == 5
    asked = re.search(r"What is the special magic number for (\w+) ", p.text).group(1)
    assert dict(needles)[asked] == p.expected


def test_a_prompt_shorter_than_the_fixed_text_is_refused(tokenizer):
    with pytest.raises(EvalError, match="too short"):
        build_prompt("kv", tokenizer, 100, 0.5)


def test_scoring():
    assert score("passkey", " 51318. Remember", "51318") and not score("passkey", " 5131", "51318")
    assert score("needle", " 4555231.", "4555231")
    assert not score("needle", " 45552310", "4555231") and not score("needle", " 1 or 4555231", "4555231")
    assert not score("needle", " none", "4555231")
    u, v = "b9818d2d-347a-4cf7-974a-26ad9fbb93d5", "aafe1643-2cd0-4db2-81b3-ec96d4601db8"
    assert score("kv", f'{u}"', u) and not score("kv", f"{v} {u}", u) and not score("kv", u[:-1], u)


def test_parse_lengths_and_depths():
    assert parse_lengths("1k, 2k,1.5k,300,1k") == [1024, 2048, 1536, 300]
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("1m", "0", "-1k"):
        with pytest.raises(EvalError, match="--lengths"):
            parse_lengths(bad)
    with pytest.raises(EvalError, match="outside"):
        parse_depths("0,1.5")


class Oracle(torch.nn.Module):
    """A "model" whose generate reads the fact out of the prompt: right everywhere (`mode="right"`),
    wrong everywhere ("wrong"), or right only when the fact lies in the first half of the prompt ("half")."""

    def __init__(self, tokenizer, mode):
        super().__init__()
        self.tokenizer, self.mode, self.anchor = tokenizer, mode, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, **kw):
        text = self.tokenizer.decode(input_ids[0])
        if "pass key" in text:
            m = re.search(r"The pass key is (\d+)\. Remember", text)
        elif "magic number" in text:
            word = re.search(r"What is the special magic number for (\w+) ", text).group(1)
            m = re.search(rf"magic number for {word} is (\d+)\.", text)
        else:
            key = re.search(r'Key: "([^"]+)"', text).group(1)
            m = re.search(rf'"{key}": "([^"]+)"', text)
        answer = m.group(1)
        if self.mode == "wrong" or (self.mode == "half" and m.start() > len(text) / 2):
            answer = answer[1:] + answer[0] if len(set(answer)) > 1 else "0" + answer[1:]
        new = self.tokenizer(f" {answer}.\n", add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id] * 3
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


@pytest.mark.parametrize("task", LONG_TASKS)
def test_grid_arithmetic_with_oracle_models(tokenizer, task):
    lengths, depths = [512, 1024], [0, 0.25, 0.75, 1]
    right = run_grid(Oracle(tokenizer, "right"), tokenizer, task, lengths, depths, samples=2, progress=False)
    assert right.accuracy == 1 and all(r["correct"] for r in right.records) and len(right.records) == 16
    assert all(r["answer"] == f" {r['expected']}." for r in right.records)  # cut at the newline
    wrong = run_grid(Oracle(tokenizer, "wrong"), tokenizer, task, lengths, depths, samples=2, progress=False)
    assert wrong.accuracy == 0 and wrong.cell(512, 0) == 0
    half = run_grid(Oracle(tokenizer, "half"), tokenizer, task, lengths, depths, samples=2, progress=False)
    for n in lengths:
        assert [half.cell(n, d) for d in depths] == [1, 1, 0, 0] and half.by_length(n) == 0.5
    assert half.to_json()["cells"] == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert format_grid(half).splitlines()[1].split() == ["0.5k", "100", "100", "0", "0", "50"]


def test_grid_with_a_tiny_model_records_answers_and_resumes(tokenizer):
    model = make_tiny_model(tokenizer)
    seen = []
    grid = run_grid(model, tokenizer, "passkey", [256, 384], [0, 1], seed=5, progress=False, on_record=seen.append)
    assert len(grid.records) == len(seen) == 4
    for r in grid.records:
        assert isinstance(r["answer"], str) and r["tokens"] <= r["length"] - NEW_TOKENS["passkey"]
        assert r["correct"] == (r["expected"] in r["answer"])
    again = []
    resumed = run_grid(model, tokenizer, "passkey", [256, 384], [0, 1], seed=5, progress=False,
                       done=grid.records[:3], on_record=again.append)
    assert len(again) == 1 and again[0] == grid.records[3] | {"seconds": again[0]["seconds"]}
    assert [r["answer"] for r in resumed.records] == [r["answer"] for r in grid.records]


def test_position_perplexity_equals_full_logits_loss_per_bucket(tokenizer):
    model = make_tiny_model(tokenizer, seed=1)
    words = "river stone lantern quiet harbour winter orchard candle meadow letter".split()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, 10, (n,), generator=g)) for n in (400, 90)]
    length, bucket = 300, 64
    rows = position_perplexity(model, tokenizer, texts, length, bucket, chunk=50)
    sums, counts = torch.zeros(len(rows), dtype=torch.float64), torch.zeros(len(rows))
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:length]])
            nll = F.cross_entropy(model(ids).logits[0, :-1].double(), ids[0, 1:], reduction="none")
            b = torch.arange(1, ids.shape[1]) // bucket
            sums.index_add_(0, b, nll)
            counts.index_add_(0, b, torch.ones(len(b)))
    assert [r["tokens"] for r in rows] == counts.long().tolist() and counts[0] > counts[-1] > 0
    assert [r["start"] for r in rows] == [0, 64, 128, 192, 256] and rows[-1]["end"] == 300
    assert torch.allclose(torch.tensor([r["loss"] for r in rows], dtype=torch.float64), sums / counts, rtol=1e-5)


def test_cli_grid_and_position_ppl_write_their_files(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "pk"
    argv = ["eval", "--task", "passkey", "--model", str(tiny_model_dir), "--lengths", "256,384", "--depths", "0,1",
            "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr()
    data = json.loads((out / "grid.json").read_text())
    assert data["lengths"] == [256, 384] and len(data["cells"]) == 2 and len(data["cells"][0]) == 2
    assert (out / "heatmap.png").stat().st_size > 0 and "| length | 0% | 100% | mean |" in (out / "grid.md").read_text()
    assert len((out / "records.jsonl").read_text().splitlines()) == 4
    assert main(argv) == 0 and "4 answers kept" in capsys.readouterr().out  # a rerun asks nothing again
    assert len((out / "records.jsonl").read_text().splitlines()) == 4
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": "the sky is blue and " * n}) + "\n" for n in (60, 20)))
    ppl = tmp_path / "ppl"
    assert main(["eval", "--task", f"position-ppl:{texts}", "--model", str(tiny_model_dir), "--lengths", "128",
                 "--bucket", "32", "--output", str(ppl)]) == 0
    rows = json.loads((ppl / "positions.json").read_text())["buckets"]
    assert [r["start"] for r in rows] == [0, 32, 64, 96] and (ppl / "positions.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", "--task", "kv", "--model", str(tiny_model_dir), "--lengths", "2q"]) == 2
    assert capsys.readouterr().err.strip().startswith("tunesmith: error: --lengths")


def test_cli_rope_flag_scales_positions_for_the_evaluation_only(capsys, tmp_path, tiny_model_dir):
    """`--rope scaling=linear,factor=4` gives the loss of the model with its positions divided by 4 (a
    different loss from the plain model's), the same as applying the recipe keys by hand; bad keys are one line."""
    from tunesmith.cli.long_context import parse_rope
    from tunesmith.config import RopeConfig
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.models.rope import apply_rope

    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "the sky is blue and the grass is green " * 30}) + "\n")
    losses = {}
    for rope in (None, "scaling=linear,factor=4"):
        out = tmp_path / f"ppl-{rope is not None}"
        argv = ["eval", "--task", f"position-ppl:{texts}", "--model", str(tiny_model_dir), "--lengths", "128",
                "--bucket", "128", "--output", str(out)] + (["--rope", rope] if rope else [])
        assert main(argv) == 0, capsys.readouterr()
        saved = json.loads((out / "positions.json").read_text())
        assert saved["rope"] == rope
        losses[rope] = saved["buckets"][0]["loss"]
    assert "linear ×4" in capsys.readouterr().out
    model, tok = load_for_inference(str(tiny_model_dir))
    text = [json.loads(texts.read_text())["text"]]
    plain = position_perplexity(model, tok, text, 128, 128)[0]["loss"]
    apply_rope(model, RopeConfig(scaling="linear", factor=4))
    scaled = position_perplexity(model, tok, text, 128, 128)[0]["loss"]
    # same process, same kernels: equal to the last bits; a random tiny model's loss moves little with positions
    assert (losses[None], losses["scaling=linear,factor=4"]) == pytest.approx((plain, scaled), rel=1e-12)
    assert scaled != pytest.approx(plain, rel=1e-9)
    assert parse_rope("theta=250000").theta == 250000
    for bad in ("scaling=cubic", "facter=2", "linear"):
        with pytest.raises(EvalError, match="--rope"):
            parse_rope(bad)

"""The synthesis engine: stop strings, dedup, provenance, greedy parity with infer.generate, samples
independent of the batching, untempered log-probs, and resuming after a crash equal to an
uninterrupted run (a simulated crash and a real SIGKILL)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, lively_model
from tunesmith.infer.generate import generate
from tunesmith.synth.engine import (Job, SynthError, _Decoder, _encode, _sample_group, cut_at_stop, duplicates,
                                    job_seed, normalise, read_jobs, read_samples, synthesize)

SETTINGS = dict(max_new_tokens=10, progress=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively_model(tokenizer)


def jobs_of(prompts, prefix="j"):
    return [Job(f"{prefix}{i}", p, {"k": i}) for i, p in enumerate(prompts)]


def texts(path) -> dict[str, list[str]]:
    return {j: [r["text"] for r in rs] for j, rs in read_samples(path).items()}


# ---- pure pieces


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("abc###def\n\nghi", ["\n\n", "###"]) == ("abc", True)
    assert cut_at_stop("abc\n\nd###", ["###", "\n\n"]) == ("abc", True)
    assert cut_at_stop("abcdef", ["x", ""]) == ("abcdef", False)
    assert cut_at_stop("stop at start", ["stop"]) == ("", True)


def test_duplicates_compare_normalised_text():
    assert normalise("  Hello \n  World ") == "hello world"
    assert duplicates(["A  b", "c", "a b", " A B\n", "c ", "d"]) == [None, None, 0, 0, 1, None]


def test_job_seed_is_stable_and_depends_on_both_parts():
    assert job_seed(0, "a") == job_seed(0, "a")  # no salted hash(): the same in every process
    assert len({job_seed(0, "a"), job_seed(1, "a"), job_seed(0, "b")}) == 3
    assert all(0 <= job_seed(s, "a") < 2**63 for s in range(20))


def test_job_seed_is_the_same_in_another_process():
    out = subprocess.run([sys.executable, "-c", "from tunesmith.synth.engine import job_seed; print(job_seed(7, 'x'))"],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(out.stdout) == job_seed(7, "x")


# ---- generation


def test_greedy_equals_infer_generate(model, tokenizer, tmp_path):
    jobs = jobs_of(PROMPTS)
    for batch_size in (1, 3):
        out = tmp_path / f"g{batch_size}.jsonl"
        synthesize(model, tokenizer, jobs, out, temperature=0, batch_size=batch_size, **SETTINGS)
        expected = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=batch_size)
        assert [texts(out)[j.id] for j in jobs] == [[e] for e in expected]
    assert len(set(expected)) > 2  # the prompts really give different outputs


def test_greedy_with_several_samples_warns_and_makes_one(model, tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="greedily"):
        synthesize(model, tokenizer, jobs_of(PROMPTS[:2]), tmp_path / "o.jsonl", n=4, temperature=0, **SETTINGS)
    assert [len(v) for v in read_samples(tmp_path / "o.jsonl").values()] == [1, 1]


def test_stop_string_cuts_the_text_and_ends_the_sample(model, tokenizer, tmp_path):
    jobs = jobs_of(PROMPTS[1:2])
    synthesize(model, tokenizer, jobs, tmp_path / "free.jsonl", temperature=0, max_new_tokens=16, progress=False)
    free = read_samples(tmp_path / "free.jsonl")["j0"][0]
    assert free["finish"] == "length" and free["tokens"] == 16
    stop = free["text"][len(free["text"]) // 2:][:3]  # a piece from the middle of the free-running text
    synthesize(model, tokenizer, jobs, tmp_path / "cut.jsonl", temperature=0, max_new_tokens=16, stop=[stop, "@@@@"],
               progress=False)
    cut = read_samples(tmp_path / "cut.jsonl")["j0"][0]
    assert cut["text"] == free["text"][:free["text"].find(stop)]
    assert cut["finish"] == "stop" and cut["tokens"] < 16
    assert cut["logprob"] > free["logprob"]  # fewer tokens, each with a negative log-prob


def test_eos_ends_a_sample_with_empty_text(tokenizer, tmp_path):
    model = lively_model(tokenizer)
    boost = torch.zeros(len(tokenizer))
    boost[tokenizer.eos_token_id] = 1e3  # eos becomes the only likely next token
    model.get_output_embeddings().register_forward_hook(lambda module, inputs, out: out + boost)
    synthesize(model, tokenizer, jobs_of(PROMPTS[:2]), tmp_path / "o.jsonl", n=2, temperature=0.5, **SETTINGS)
    for rows in read_samples(tmp_path / "o.jsonl").values():
        assert [(r["text"], r["finish"], r["tokens"]) for r in rows] == [("", "stop", 1)] * 2
    assert generate(model, tokenizer, PROMPTS[:2], max_new_tokens=10) == ["", ""]


def test_samples_do_not_depend_on_the_batch_size(model, tokenizer, tmp_path):
    """Each sample draws from its own generator: the same texts whether a sample decodes alone, with
    its siblings, or beside other (padded) prompts. Padding changes the logits in the last float bits,
    so log-probs agree to rounding, not bit for bit."""
    jobs = jobs_of(PROMPTS)
    runs = {}
    for batch_size in (1, 2, 6):  # alone; in chunks of 2 + 1 from one prefill; beside another (padded) prompt
        out = tmp_path / f"b{batch_size}.jsonl"
        synthesize(model, tokenizer, jobs, out, n=3, temperature=1.0, top_k=500, top_p=0.9, seed=5,
                   batch_size=batch_size, max_new_tokens=6, progress=False)
        runs[batch_size] = read_samples(out)
    for batch_size in (2, 6):
        for j in runs[1]:
            assert [r["text"] for r in runs[batch_size][j]] == [r["text"] for r in runs[1][j]]
            assert [r["seed"] for r in runs[batch_size][j]] == [r["seed"] for r in runs[1][j]]
            for a, b in zip(runs[batch_size][j], runs[1][j]):
                assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)
    # a job's samples also do not depend on the other jobs in the list
    synthesize(model, tokenizer, jobs[2:3], tmp_path / "alone.jsonl", n=3, temperature=1.0, top_k=500, top_p=0.9,
               seed=5, max_new_tokens=6, progress=False)
    assert texts(tmp_path / "alone.jsonl")["j2"] == [r["text"] for r in runs[1]["j2"]]
    assert len({r["text"] for r in runs[1]["j1"]}) == 3  # sampling really samples


def test_logprob_is_the_untempered_log_probability_of_the_tokens(model, tokenizer):
    decoder = _Decoder(model, tokenizer, temperature=2.0, top_k=0, top_p=1.0, max_new_tokens=8, stop=())
    prompts = [_encode(tokenizer, Job("a", p), None, False) for p in PROMPTS[:3]]
    groups = _sample_group(decoder, prompts, [11, 22, 33], n=2, batch_size=4)
    for prompt, rows in zip(prompts, groups):
        for row in rows:
            ids = torch.tensor([prompt + row.ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            expected = sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(row.ids))
            assert row.logprob == pytest.approx(expected, abs=1e-3)


def test_dedup_marks_repeated_samples(model, tokenizer, tmp_path):
    jobs = jobs_of(PROMPTS[:2])
    # a tiny temperature samples the greedy answer every time: all samples equal
    synthesize(model, tokenizer, jobs, tmp_path / "d.jsonl", n=4, temperature=1e-4, **SETTINGS)
    for rows in read_samples(tmp_path / "d.jsonl").values():
        assert len({r["text"] for r in rows}) == 1
        assert [r["duplicate_of"] for r in rows] == [None, 0, 0, 0]
    synthesize(model, tokenizer, jobs, tmp_path / "nd.jsonl", n=4, temperature=1e-4, dedup=False, **SETTINGS)
    assert all(r["duplicate_of"] is None for rows in read_samples(tmp_path / "nd.jsonl").values() for r in rows)


def test_records_carry_their_provenance(model, tokenizer, tmp_path):
    jobs = [Job("a", "hi", {"source": "demo", "round": 1}), Job("b", PROMPTS[2], {})]
    stats = synthesize(model, tokenizer, jobs, tmp_path / "o.jsonl", n=2, temperature=0.8, seed=3, **SETTINGS)
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and stats.samples == 4 and stats.jobs == 2 and stats.skipped_jobs == 0
    assert stats.samples_per_s > 0 and stats.tokens_per_s > 0
    for job in jobs:
        mine = [r for r in lines if r["job"] == job.id]
        assert mine[-1] == {"job": job.id, "done": True, "n": 2}
        for i, r in enumerate(mine[:-1]):
            assert set(r) == {"job", "sample", "prompt", "text", "finish", "logprob", "tokens", "seed",
                              "duplicate_of", "meta"}
            seed = job_seed(3, job.id) + i
            assert (r["sample"], r["prompt"], r["meta"], r["seed"]) == (i, job.prompt, job.meta, seed)
            assert r["finish"] in ("stop", "length") and 1 <= r["tokens"] <= 10 and r["logprob"] < 0


def test_bad_jobs_are_rejected(model, tokenizer, tmp_path):
    with pytest.raises(SynthError, match="duplicate id 'a'"):
        synthesize(model, tokenizer, [Job("a", "x"), Job("b", "y"), Job("a", "z")], tmp_path / "o.jsonl", **SETTINGS)
    with pytest.raises(SynthError, match="job 'b'.*prompt"):
        synthesize(model, tokenizer, [Job("b", [{"role": "user"}])], tmp_path / "o.jsonl", **SETTINGS)
    with pytest.raises(SynthError, match="n must be"):
        synthesize(model, tokenizer, [Job("a", "x")], tmp_path / "o.jsonl", n=0, **SETTINGS)
    assert not (tmp_path / "o.jsonl").exists()


def test_read_jobs_and_read_samples_name_the_bad_line(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a", "topic": "x"}\n\n{"id": "q", "messages": [{"role": "user", "content": "b"}]}\n')
    jobs = read_jobs(good)
    assert [(j.id, j.prompt, j.meta) for j in jobs] == [("0", "a", {"topic": "x"}),
                                                        ("q", [{"role": "user", "content": "b"}], {})]
    for body, where, what in [('{"prompt": 3}\n', ":1:", "`prompt`"),
                              ('{"prompt": "a"}\n{"text": "b"}\n', ":2:", "needs `prompt`"),
                              ('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', ":2:", "repeats"),
                              ('{"messages": []}\n', ":1:", "`messages`"),
                              ('{"prompt": "a"\n', ":1:", "not valid JSON")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body)
        with pytest.raises(SynthError, match=f"bad.jsonl{where}.*{what}"):
            read_jobs(bad)
    bad = tmp_path / "out.jsonl"
    bad.write_text('{"job": "a", "done": true, "n": 1}\n{"job": "a", "sam')
    with pytest.raises(SynthError, match="out.jsonl:2"):
        read_samples(bad)


# ---- resuming


def _done_line_offsets(data: bytes) -> list[tuple[int, int]]:
    """(start, end) byte offsets of every `done` line."""
    spans, pos = [], 0
    for line in data.split(b"\n")[:-1]:
        if b'"done": true' in line:
            spans.append((pos, pos + len(line) + 1))
        pos += len(line) + 1
    return spans


RESUME = dict(n=3, temperature=0.9, max_new_tokens=6, batch_size=6, seed=1, stop=["."], progress=False)


def test_resume_after_a_crash_equals_an_uninterrupted_run(model, tokenizer, tmp_path):
    jobs = jobs_of(PROMPTS)
    full = tmp_path / "full.jsonl"
    synthesize(model, tokenizer, jobs, full, **RESUME)
    data = full.read_bytes()
    spans = _done_line_offsets(data)
    assert len(spans) == len(jobs)
    # crash 1: the last written job lost its done line, and the next record was cut mid-line
    k = len(spans) // 2
    start, end = spans[k]
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_bytes(data[:start] + data[end:end + 25])
    stats = synthesize(model, tokenizer, jobs, crashed, **RESUME)
    assert crashed.read_bytes() == data
    assert stats.skipped_jobs == k and stats.samples == 3 * (len(jobs) - k)
    # crash 2: cut inside a sample line of the first group
    crashed.write_bytes(data[:spans[0][0] - 7])
    synthesize(model, tokenizer, jobs, crashed, **RESUME)
    assert crashed.read_bytes() == data
    # a finished file: nothing to do
    stats = synthesize(model, tokenizer, jobs, crashed, **RESUME)
    assert (stats.samples, stats.skipped_jobs) == (0, len(jobs)) and crashed.read_bytes() == data
    with pytest.raises(SynthError, match="n=3.*n=2"):
        synthesize(model, tokenizer, jobs, crashed, **{**RESUME, "n": 2})


def test_resume_after_an_exception_mid_run(model, tokenizer, tmp_path, monkeypatch):
    import tunesmith.synth.engine as engine

    jobs = jobs_of(PROMPTS)
    synthesize(model, tokenizer, jobs, tmp_path / "full.jsonl", **RESUME)
    calls = []
    real = engine._sample_group

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(engine, "_sample_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(model, tokenizer, jobs, tmp_path / "cut.jsonl", **RESUME)
    monkeypatch.setattr(engine, "_sample_group", real)
    assert 0 < len(read_samples(tmp_path / "cut.jsonl")) < len(jobs)
    synthesize(model, tokenizer, jobs, tmp_path / "cut.jsonl", **RESUME)
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from conftest import PROMPTS, lively_model
    from tunesmith.models.load import load_tokenizer
    from tunesmith.synth.engine import Job, synthesize
    tok = load_tokenizer("smollm2-135m-instruct")
    jobs = [Job(f"j{{i}}", p, {{"k": i}}) for i, p in enumerate(PROMPTS * {copies})]
    synthesize(lively_model(tok), tok, jobs, sys.argv[1], n=2, temperature=0.9, max_new_tokens=12, batch_size=2,
               seed=4, progress=False)
""")


def test_resume_after_sigkill_has_no_duplicates_and_no_gaps(tokenizer, tmp_path):
    """A real interrupt: the process is killed (SIGKILL) once some jobs are on disk; the continued
    file has every record of an uninterrupted run, once, in the same order."""
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), copies=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full.jsonl", tmp_path / "killed.jsonl"
    jobs = [Job(f"j{i}", p, {"k": i}) for i, p in enumerate(PROMPTS * 2)]
    synthesize(lively_model(tokenizer), tokenizer, jobs, full, n=2, temperature=0.9, max_new_tokens=12,
               batch_size=2, seed=4, progress=False)
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if killed.exists() and killed.read_bytes().count(b'"done": true') >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    was_killed = proc.returncode == -signal.SIGKILL
    subprocess.run([sys.executable, str(script), str(killed)], check=True, env=env)
    # the uninterrupted run is in this process, whose threads round floats differently in the last
    # bits: log-probs agree to rounding, everything else exactly (the byte-for-byte comparison, one
    # process, is test_resume_after_a_crash_equals_an_uninterrupted_run)
    records = [json.loads(x) for x in killed.read_text().splitlines()]
    expected = [json.loads(x) for x in full.read_text().splitlines()]
    assert [{**r, "logprob": 0} for r in records] == [{**r, "logprob": 0} for r in expected]
    assert [r.get("logprob", 0) for r in records] == pytest.approx([r.get("logprob", 0) for r in expected], abs=1e-3)
    keys = [(r["job"], r.get("sample", "done")) for r in records]
    assert len(keys) == len(set(keys)) == 10 * 3  # 10 jobs x (2 samples + done), once each
    assert was_killed or pytest.skip("the run finished before it could be killed")


def test_cli_generate(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi", "topic": "t"}\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    out = tmp_path / "o.jsonl"
    args = ["synth", "generate", str(prompts), "--out", str(out), "--model", str(tiny_model_dir), "--n", "3",
            "--max-new-tokens", "5", "--stop", "\n", "--stop", "###", "--seed", "2"]
    assert main(args) == 0
    assert "6 samples of 2 prompts" in capsys.readouterr().out
    samples = read_samples(out)
    assert sorted(samples) == ["1", "a"] and samples["a"][0]["meta"] == {"topic": "t"}
    assert main(args) == 0 and "0 samples of 0 prompts" in capsys.readouterr().out
    prompts.write_text('{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "yo"}\n')
    assert main(args) == 2
    assert "p.jsonl:2" in capsys.readouterr().err

"""tunesmith dashboard's JSON side over a live uvicorn server: runs as `tunesmith train` leaves them
(real tiny runs: finished, interrupted, launched from the form), their status, the metrics cursor
while a file grows (a torn last line, a resumed run that drops rows), evaluations side by side, the
benchmark table, staged jobs — and that no request reaches a file outside the runs folder."""
import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import uvicorn

from conftest import tiny_recipe, write_chats
from tunesmith.cli import main
from tunesmith.dashboard import Launcher, RunsFolder, build_app
from tunesmith.train.loop import stopping_after, train
from tunesmith.train.metrics import read_metrics


@contextlib.contextmanager
def serving(app):
    """The app on a free local port, in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the dashboard server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def call(url, body=None):
    """(status, decoded body) of a GET, or of a POST when `body` is given."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            raw, status, kind = r.read(), r.status, r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        raw, status, kind = e.read(), e.code, e.headers.get("content-type", "")
    return status, json.loads(raw) if "json" in kind else raw.decode()


def write_rows(path: Path, rows, mode="w"):
    with open(path, mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def fake_run(root: Path, name: str, steps: int, **files) -> Path:
    """A run folder as train writes it: recipe.yaml and metrics.jsonl (train rows, a validation row
    every 5 steps), plus `files` (relative path -> text, or None for a folder)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(f"name: {name}\nmethod: {{name: dora}}\ndata: {{train: d.jsonl}}\n"
                                        f"train: {{steps: {steps}}}\n")
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "loss": 4.0 / s, "lr": 1e-3, "grad_norm": 1.0 + s})
        if s % 5 == 0:
            rows.append({"step": s, "val_loss": 5.0 / s})
    write_rows(folder / "metrics.jsonl", rows)
    for rel, text in files.items():
        path = folder / rel
        if text is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return folder


def age(folder: Path, seconds: float):
    """Make every file of a run look `seconds` old (a run that stopped a while ago)."""
    t = time.time() - seconds
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, (t, t), follow_symlinks=False)


# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_runs(tiny_model_dir, tmp_path_factory):
    """Two real tiny runs in one runs folder: `done` finished, `cut` stopped after 3 of 6 steps."""
    tmp = tmp_path_factory.mktemp("dash")
    root = tmp / "runs"
    assert train(tiny_recipe(tmp, tiny_model_dir, f"output_dir={root}", "name=done")).status == "completed"
    with stopping_after(3):
        assert train(tiny_recipe(tmp, tiny_model_dir, f"output_dir={root}", "name=cut")).status == "interrupted"
    return root


def test_real_runs_listed_with_status_method_and_metrics(real_runs):
    age(real_runs / "cut", 600)  # stopped ten minutes ago
    with serving(build_app(RunsFolder(real_runs, live_window=0))) as url:
        status, listing = call(f"{url}/api/runs")
        assert status == 200
        runs = {r["id"]: r for r in listing["runs"]}
        assert sorted(runs) == ["cut", "done"]
        rows = read_metrics(real_runs / "done" / "metrics.jsonl")
        train_rows = [r for r in rows if "loss" in r]
        done = runs["done"]
        assert (done["status"], done["method"], done["steps"], done["total_steps"]) == ("finished", "lora", 6, 6)
        assert done["loss"] == train_rows[-1]["loss"]
        assert done["best_val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)
        assert (runs["cut"]["status"], runs["cut"]["steps"]) == ("interrupted", 3)  # a checkpoint, no adapter

        status, m = call(f"{url}/api/runs/done/metrics")
        assert (status, m["rows"], m["next"], m["reset"]) == (200, rows, len(rows), False)
        _, tail = call(f"{url}/api/runs/done/metrics?since=4")
        assert tail["rows"] == rows[4:] and tail["next"] == len(rows)
        _, recipe = call(f"{url}/api/runs/done/recipe")
        assert recipe == (real_runs / "done" / "recipe.yaml").read_text()
    # the same folders, within the live window: a run without output counts as running
    assert RunsFolder(real_runs, live_window=3600).status(real_runs / "cut") == "running"


def test_status_from_what_is_on_disk(tmp_path):
    runs = RunsFolder(tmp_path, live_window=60)
    fresh = fake_run(tmp_path, "fresh", 3)
    done = fake_run(tmp_path, "done", 3, **{"model/config.json": "{}"})
    cut = fake_run(tmp_path, "cut", 3, **{"checkpoints/step-2/state.json": "{}"})
    dead = fake_run(tmp_path, "dead", 0)
    for folder in (done, cut, dead):
        age(folder, 600)
    assert [runs.status(f) for f in (fresh, done, cut, dead)] == ["running", "finished", "interrupted", "failed"]
    write_rows(dead / "metrics.jsonl", [{"step": 1, "loss": 2.0, "step_s": 250.0}])  # a slow model: 250 s a step
    age(dead, 600)
    assert runs.status(dead) == "running"  # quiet for 600 s, under three of its steps
    age(dead, 800)
    assert runs.status(dead) == "failed"
    write_rows(cut / "metrics.jsonl", [{"step": 4, "loss": 1.0}], "a")  # it was resumed and logs again
    assert runs.status(cut) == "running"
    # a process the dashboard launched decides while it is known: alive → running, ended → by the files
    assert RunsFolder(tmp_path, alive=lambda f: f == dead).status(dead) == "running"
    assert RunsFolder(tmp_path, alive=lambda f: False).status(fresh) == "failed"


def test_metrics_cursor_follows_a_growing_file(tmp_path):
    folder = fake_run(tmp_path, "live", 2)
    path = folder / "metrics.jsonl"
    with serving(build_app(RunsFolder(tmp_path))) as url:
        first = call(f"{url}/api/runs/live/metrics")[1]
        assert [r["step"] for r in first["rows"]] == [1, 2] and first["next"] == 2
        with open(path, "a") as f:  # one full row and a torn one, as a crash mid-write leaves
            f.write(json.dumps({"step": 3, "loss": 0.5}) + "\n" + '{"step": 4, "lo')
        more = call(f"{url}/api/runs/live/metrics?since=2")[1]
        assert (more["rows"], more["next"]) == ([{"step": 3, "loss": 0.5}], 3)
        with open(path, "a") as f:
            f.write('ss": 0.25}\n')
        assert call(f"{url}/api/runs/live/metrics?since=3")[1]["rows"] == [{"step": 4, "loss": 0.25}]
        assert call(f"{url}/api/runs/live/metrics?since=4")[1]["rows"] == []
        write_rows(path, [{"step": 1, "loss": 9.0}])  # resumed from step 1: later rows dropped
        again = call(f"{url}/api/runs/live/metrics?since=4")[1]
        assert (again["rows"], again["next"], again["reset"]) == ([{"step": 1, "loss": 9.0}], 1, True)


def eval_file(label, verdicts, task="sql"):
    records = [{"id": f"q{i}", "prompt": f"<b>question</b> {i}", "prediction": f"{label} {i}", "reference": f"r{i}",
                "correct": ok, "score": float(ok)} for i, ok in enumerate(verdicts)]
    summary = {"examples": len(verdicts), "accuracy": sum(verdicts) / len(verdicts)}
    return json.dumps({"task": task, "split": "test", "metric": "accuracy", "summary": summary, "records": records})


def test_evaluations_side_by_side_before_then_after(tmp_path):
    tuned = json.loads(eval_file("tuned", [True, True, False, True]))
    tuned["records"] = tuned["records"][::-1]  # joined on the record id, not the position
    fake_run(tmp_path, "qs", 3, **{"eval-tuned.json": json.dumps(tuned), "eval-base.json":
                                   eval_file("base", [False, True, False, False]), "eval-test.json": "not json"})
    with serving(build_app(RunsFolder(tmp_path))) as url:
        run = call(f"{url}/api/runs")[1]["runs"][0]
        assert run["evals"] == {"base": {"task": "sql", "split": "test", "metric": "accuracy", "value": 0.25,
                                         "examples": 4},
                                "tuned": {"task": "sql", "split": "test", "metric": "accuracy", "value": 0.75,
                                          "examples": 4}}
        data = call(f"{url}/api/runs/qs/evals")[1]
    assert data["labels"] == ["base", "tuned", "test"]  # before, after, then the rest
    assert [x["id"] for x in data["examples"]] == ["q0", "q1", "q2", "q3"]
    q0 = data["examples"][0]
    assert q0["prompt"] == "<b>question</b> 0" and q0["reference"] == "r0"
    assert q0["answers"] == {"base": {"prediction": "base 0", "correct": False, "score": 0.0},
                             "tuned": {"prediction": "tuned 0", "correct": True, "score": 1.0}}
    assert len(RunsFolder(tmp_path).evals("qs", limit=2)["examples"]) == 2


def test_bench_table_and_its_errors(tmp_path):
    good = tmp_path / "methods" / "results.json"
    good.parent.mkdir()
    good.write_text(json.dumps([{"method": "base", "sql": 0.03}, {"method": "lora", "lr": 1e-3, "sql": 0.33}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "lora"}))
    runs = RunsFolder(tmp_path)
    with serving(build_app(runs, bench=good)) as url:
        status, table = call(f"{url}/api/bench")
        assert status == 200 and table["columns"] == ["method", "sql", "lr"] and table["rows"][1]["sql"] == 0.33
        assert call(f"{url}/api/config")[1]["bench"] is True
    with serving(build_app(runs, bench=bad)) as url:
        status, body = call(f"{url}/api/bench")
        assert status == 422 and body["error"] == f"{bad}: benchmark results must be a JSON list of objects, one per row"
    with serving(build_app(runs)) as url:
        assert call(f"{url}/api/bench")[0] == 404 and call(f"{url}/api/config")[1]["bench"] is False


def test_nothing_outside_the_runs_folder_is_served(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "ok", 2)
    secret = fake_run(tmp_path, "outside", 2)  # a run folder beside the runs folder, not in it
    (root / "link").symlink_to(secret, target_is_directory=True)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "metrics.jsonl").write_text('{"step": 1}\n')
    with serving(build_app(RunsFolder(root))) as url:
        assert [r["id"] for r in call(f"{url}/api/runs")[1]["runs"]] == ["ok"]
        for bad in ["link", ".hidden", "..%2Foutside", "../outside", "ok%2F..%2F..%2Foutside", "%2Fetc", "ok/..",
                    str(secret).lstrip("/")]:
            for what in ("metrics", "evals", "recipe", "log"):
                status, body = call(f"{url}/api/runs/{bad}/{what}")
                assert status == 404, (bad, what, body)
        for name in ("..%2Fapp.py", "runs.py", "__init__.py", "..%2F..%2Fconfig.py"):
            assert call(f"{url}/static/{name}")[0] == 404
        status, page = call(f"{url}/")
        assert status == 200 and '<script src="/static/app.js">' in page
        assert call(f"{url}/static/app.js")[0] == 200


def test_staged_job_and_its_stages(tmp_path):
    job = tmp_path / "job"
    fake_run(job, "general", 4, **{"adapter/adapter_config.json": "{}"})
    fake_run(job, "target", 3)
    (job / "stages.json").write_text(json.dumps({"stage_mode": "phased", "stages": [
        {"name": "general", "status": "completed", "steps": 4}, {"name": "target", "status": "interrupted"}]}))
    age(job, 600)
    runs = RunsFolder(tmp_path)
    assert list(runs.ids()) == ["job", "job/general", "job/target"]
    with serving(build_app(runs)) as url:
        listing = {r["id"]: r for r in call(f"{url}/api/runs")[1]["runs"]}
        assert listing["job"]["kind"] == "job" and listing["job"]["status"] == "failed"
        assert listing["job/general"]["status"] == "finished" and listing["job/target"]["kind"] == "stage"
        rows = call(f"{url}/api/runs/job/metrics")[1]["rows"]
        train_rows = [(r["step"], r["stage"]) for r in rows if "loss" in r]
        assert train_rows == [(1, "general"), (2, "general"), (3, "general"), (4, "general"),
                              (5, "target"), (6, "target"), (7, "target")]  # stage 2 after stage 1's 4 steps
        assert [r["step"] for r in call(f"{url}/api/runs/job/target/metrics")[1]["rows"]] == [1, 2, 3]
    entry = json.loads((job / "stages.json").read_text())
    entry["stages"][1]["status"] = "completed"
    (job / "stages.json").write_text(json.dumps(entry))
    assert runs.status(job) == "finished"


def test_train_form_is_off_unless_allowed(tmp_path):
    fake_run(tmp_path, "ok", 1)
    with serving(build_app(RunsFolder(tmp_path))) as url:
        assert call(f"{url}/api/config")[1]["allow_train"] is False
        status, body = call(f"{url}/api/train", {"recipe": "r.yaml", "name": "x"})
        assert status == 403 and "--allow-train" in body["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_train_form_checks_each_field(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "taken", 1)
    (tmp_path / "r.yaml").write_text("name: x\n")
    launcher = Launcher(root, cwd=tmp_path)
    with serving(build_app(RunsFolder(root), launcher=launcher)) as url:
        for form, field in [({"name": "a"}, "recipe:"), ({"recipe": "nope.yaml", "name": "a"}, "recipe:"),
                            ({"recipe": "r.yaml", "name": "../up"}, "name:"), ({"recipe": "r.yaml", "name": "taken"}, "name:"),
                            ({"recipe": "r.yaml", "name": "a", "overrides": "rm -rf /"}, "overrides:"),
                            ({"recipe": "r.yaml", "name": "a", "overrides": ["output_dir=/elsewhere"]}, "overrides:")]:
            status, body = call(f"{url}/api/train", form)
            assert status == 400 and body["error"].startswith(field), (form, body)
        assert call(f"{url}/api/train", b"{not json")[0] == 400
    assert sorted(p.name for p in root.iterdir()) == ["taken"]


def test_train_form_launches_a_real_training(tmp_path, tiny_model_dir):
    """POST /api/train runs `python -m tunesmith train` into the runs folder; the run is listed as
    running while the process lives and as finished once it saved its adapter."""
    root = tmp_path / "runs"
    root.mkdir()
    chats = write_chats(tmp_path / "chats.jsonl")
    (tmp_path / "tiny.yaml").write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: chats.jsonl, max_length: 128}}\n"
        "train: {steps: 4, batch_tokens: 256, precision: fp32, save_every: 0}\n")
    assert chats.is_file()
    launcher = Launcher(root, cwd=tmp_path)  # the recipe's data path is relative to where the dashboard runs
    with serving(build_app(RunsFolder(root, alive=launcher.alive), launcher=launcher)) as url:
        status, started = call(f"{url}/api/train", {"recipe": "tiny.yaml", "name": "from-form",
                                                    "overrides": "train.lr=5e-3\nmethod.lora.rank=4"})
        assert status == 200 and started["id"] == "from-form"
        assert call(f"{url}/api/runs")[1]["runs"][0]["status"] == "running"
        proc = launcher._procs[(root / "from-form").resolve()]
        assert proc.wait(180) == 0, (root / "from-form" / "train.log").read_text()
        run = call(f"{url}/api/runs")[1]["runs"][0]
        assert (run["id"], run["status"], run["steps"]) == ("from-form", "finished", 4)
        log = call(f"{url}/api/runs/from-form/log")[1]
        assert log.startswith("$ -m tunesmith train tiny.yaml train.lr=5e-3 method.lora.rank=4 output_dir=runs "
                              "name=from-form\n") and "[tunesmith] report:" in log
    assert "rank: 4" in (root / "from-form" / "recipe.yaml").read_text()


def test_cli_names_a_missing_runs_folder(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunesmith: error: runs folder") and "nope" in err and "\n" not in err
    assert main(["dashboard", str(tmp_path), "--bench", str(tmp_path / "none.json")]) == 2
    assert "--bench" in capsys.readouterr().err
    assert main(["dashboard", str(tmp_path), "--host", "0.0.0.0", "--allow-train"]) == 2
    assert "--allow-train serves only this machine" in capsys.readouterr().err

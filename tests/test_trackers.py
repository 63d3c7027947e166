"""`train.report_to`: every metrics.jsonl row reaches TensorBoard, MLflow and W&B (each read back with
its own reader), a resumed run continues the trackers' runs without a step twice, a crash ends the
MLflow run FAILED, a missing tracker stops the run at start, and no tracker is imported unless asked."""
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_recipe
from tunesmith.recipe import RecipeError
from tunesmith.train import loop
from tunesmith.train import trackers as trk
from tunesmith.train.loop import TrainError, train
from tunesmith.train.metrics import MetricsLog, read_metrics

ALL = "train.report_to=[tensorboard,mlflow,wandb]"


@pytest.fixture(autouse=True)
def own_env(monkeypatch):
    """No tracker setting from outside; what the trackers set for themselves is undone afterwards."""
    for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                 "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


# ---- readers: each tracker's data as {step: {key: value}}, through the tracker's own code


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    return client, client.get_run(run_id)


def mlflow_history(run_dir: Path) -> dict:
    client, run = mlflow_run(run_dir)
    out: dict = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            assert key not in out.setdefault(m.step, {}), f"{key} logged twice at step {m.step}"
            out[m.step][key] = m.value
    return out


def wandb_records(path: Path):
    """The protobuf records of a W&B offline run file: a 7-byte `:W&B` header, then LevelDB's log
    format (32 KiB blocks of records with a 7-byte header: crc, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        parts, pos = parts + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # full, or the last piece
            record = pb.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def wandb_history(run_dir: Path) -> tuple[dict, list, list]:
    """Every offline file of the run (one per session), in order: history by step, the run records
    and the exit codes."""
    out, runs, exits = {}, [], []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                runs.append(r.run)
            elif kind == "exit":
                exits.append(r.exit.exit_code)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                row = {k: v for k, v in items.items() if not k.startswith("_")}
                step = r.history.step.num
                assert not set(row) & set(out.get(step, {})), f"step {step} logged twice: {row}"
                out.setdefault(step, {}).update(row)
    return out, runs, exits


def tensorboard_history(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    out: dict = {}
    for key in acc.Tags()["scalars"]:
        for e in acc.Scalars(key):
            assert key not in out.setdefault(e.step, {}), f"{key} twice at step {e.step}"
            out[e.step][key] = e.value
    return out


def jsonl_history(run_dir: Path) -> dict:
    out: dict = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        out.setdefault(row["step"], {}).update(trk.numbers(row))
    return out


def assert_same(tracked: dict, expected: dict, rel: float = 0.0, steps=None):
    """The tracker holds exactly the expected steps and keys, each value equal (within `rel`)."""
    assert sorted(tracked) == sorted(expected)
    for step in steps or expected:
        assert sorted(tracked[step]) == sorted(expected[step]), step
        for key, value in expected[step].items():
            assert math.isclose(tracked[step][key], value, rel_tol=rel, abs_tol=1e-30 if rel else 0), (step, key)


# ---- end to end


def test_every_row_reaches_every_tracker(tmp_path, tiny_model_dir):
    result = train(tiny_recipe(tmp_path, tiny_model_dir, ALL))
    run_dir = result.run_dir
    rows = jsonl_history(run_dir)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6] and "val_loss" in rows[6] and "loss" in rows[1]
    assert_same(mlflow_history(run_dir), rows)
    _, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["train.report_to"] == json.dumps(
        ["tensorboard", "mlflow", "wandb"])
    history, runs, exits = wandb_history(run_dir)
    assert_same(history, rows)
    assert exits == [0] and len(runs) == 1 and runs[0].project == "tunesmith" and runs[0].display_name == "t"
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert config["train"]["lr"] == 0.01 and config["model"]["name"] == str(tiny_model_dir)
    assert_same(tensorboard_history(run_dir), rows, rel=1e-6)  # TensorBoard keeps float32


def test_crash_then_resume_continues_the_runs_without_a_step_twice(tmp_path, tiny_model_dir, monkeypatch):
    evaluate = loop._evaluate

    def crash_after_step_5(run):
        evaluate(run)
        if run.step == 5:
            raise RuntimeError("power cut")

    monkeypatch.setattr(loop, "_evaluate", crash_after_step_5)
    with pytest.raises(RuntimeError, match="power cut"):  # checkpoints at 2 and 4; step 5 already logged
        train(tiny_recipe(tmp_path, tiny_model_dir, ALL))
    run_dir = tmp_path / "runs" / "t"
    ids = json.loads((run_dir / "trackers.json").read_text())
    _, run = mlflow_run(run_dir)
    assert run.info.status == "FAILED" and max(mlflow_history(run_dir)) == 5
    before = mlflow_history(run_dir)
    assert wandb_history(run_dir)[2] == [1]

    monkeypatch.setattr(loop, "_evaluate", evaluate)
    train(tiny_recipe(tmp_path, tiny_model_dir, ALL, "resume=true"))
    assert json.loads((run_dir / "trackers.json").read_text()) == ids  # the same runs continued
    rows = jsonl_history(run_dir)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    # step 5 was sent before the crash and is not sent again: MLflow and W&B keep its first values
    # (the timing differs; the loss is the same, resume reproduces the run)
    tracked = mlflow_history(run_dir)
    assert tracked[5] == before[5] and math.isclose(tracked[5]["loss"], rows[5]["loss"], rel_tol=1e-6)
    assert_same(tracked, rows, steps=[1, 2, 3, 4, 6])
    _, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED"
    history, runs, exits = wandb_history(run_dir)
    assert [r.run_id for r in runs] == [ids["wandb"]["run_id"]] * 2 and exits == [1, 0]
    assert history[5] == tracked[5]
    assert_same(history, rows, steps=[1, 2, 3, 4, 6])
    # TensorBoard drops the crashed session's step 5 itself and holds the new one
    assert_same(tensorboard_history(run_dir), rows, rel=1e-6)


def test_a_tracker_first_named_on_resume_gets_the_kept_history(tmp_path):
    log = MetricsLog(tmp_path, report_to=[])
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 1.0 / step, "note": "text is not a metric"})
    log.close()
    log = MetricsLog(tmp_path, resume_step=3, report_to=["mlflow"], config={"train": {"lr": 0.5}})
    log.write({"step": 4, "loss": 0.2})
    log.close()
    assert jsonl_history(tmp_path) == {1: {"loss": 1.0}, 2: {"loss": 0.5}, 3: {"loss": 1 / 3}, 4: {"loss": 0.2}}
    assert mlflow_history(tmp_path) == jsonl_history(tmp_path)
    assert mlflow_run(tmp_path)[1].data.params == {"train.lr": "0.5"}


def test_a_failing_tracker_is_turned_off_and_the_log_goes_on(tmp_path, monkeypatch, capsys):
    def broken(self, row, step):
        raise OSError("disk full")

    monkeypatch.setattr(trk.MLflowTracker, "log", broken)
    log = MetricsLog(tmp_path, report_to=["mlflow", "tensorboard"])
    for step in (1, 2):
        log.write({"step": step, "loss": float(step)})
    log.close()
    assert capsys.readouterr().out.count("mlflow failed (OSError: disk full)") == 1
    assert jsonl_history(tmp_path) == {1: {"loss": 1.0}, 2: {"loss": 2.0}} == tensorboard_history(tmp_path)
    assert mlflow_run(tmp_path)[1].info.status == "FAILED"  # its run is incomplete, and says so


def test_a_tracker_that_cannot_start_stops_the_run_and_ends_the_others(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    def refuse(self, resuming, state):
        raise PermissionError("read-only folder")

    monkeypatch.setattr(trk.WandbTracker, "open", refuse)
    with pytest.raises(TrainError, match=r"train.report_to: wandb could not start \(PermissionError: read-only"):
        MetricsLog(tmp_path, report_to=["mlflow", "wandb"])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


# ---- the key itself


def test_a_missing_tracker_stops_the_run_before_it_starts(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(trk._MODULE, "wandb", "tunesmith_no_such_module")
    with pytest.raises(TrainError, match=r"train.report_to names wandb, which is not installed: pip install wandb"):
        train(tiny_recipe(tmp_path, tiny_model_dir, "train.report_to=[tensorboard,wandb]"))
    assert not (tmp_path / "runs" / "t").exists()  # nothing left behind
    # TensorBoard alone (the default) is skipped quietly, as before the key; named with others, it is not
    monkeypatch.setitem(trk._MODULE, "tensorboard", "tunesmith_no_such_module")
    assert trk.available(["tensorboard"]) == [] and trk.available([]) == []
    with pytest.raises(TrainError, match="pip install tensorboard"):
        trk.available(["mlflow", "tensorboard"])
    assert trk.available(["mlflow", "mlflow"]) == ["mlflow"]


def test_report_to_in_recipes(tmp_path, tiny_model_dir):
    assert tiny_recipe(tmp_path, tiny_model_dir).train.report_to == ["tensorboard"]
    assert tiny_recipe(tmp_path, tiny_model_dir, "train.report_to=mlflow").train.report_to == ["mlflow"]
    assert tiny_recipe(tmp_path, tiny_model_dir, "train.report_to=[]").train.report_to == []
    with pytest.raises(RecipeError, match=r"train.report_to\[1\]: 'comet' is not allowed; choose one of "
                                          "tensorboard, mlflow, wandb"):
        tiny_recipe(tmp_path, tiny_model_dir, "train.report_to=[wandb,comet]")


def test_flatten_gives_mlflow_params():
    assert trk.flatten({"train": {"lr": 0.01, "betas": [0.9, 0.99], "steps": None}, "name": "t"}) == {
        "train.lr": "0.01", "train.betas": "[0.9, 0.99]", "name": "t"}


def test_trackers_are_imported_only_when_named(tmp_path):
    code = ("import sys\nfrom tunesmith.train.metrics import MetricsLog\n"
            "for i, names in enumerate([[], ['tensorboard'], ['mlflow']]):\n"
            f"    log = MetricsLog({str(tmp_path)!r} + f'/{{i}}', report_to=names)\n"
            "    log.write({'step': 1, 'loss': 1.0}); log.close()\n"
            "    print(sorted(m for m in ('mlflow', 'wandb', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-3:] == ["[]", "['tensorboard']", "['mlflow', 'tensorboard']"]


def test_the_users_tracker_settings_win(tmp_path, monkeypatch):
    store = tmp_path / "shared-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sql-sweep")
    monkeypatch.setenv("WANDB_PROJECT", "sql")
    run_dir = tmp_path / "run"
    log = MetricsLog(run_dir, report_to=["mlflow", "wandb"])
    log.write({"step": 1, "loss": 2.0})
    log.close()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # a resume finds the store the run began in
    log = MetricsLog(run_dir, resume_step=1, report_to=["mlflow"])
    log.write({"step": 2, "loss": 1.0})
    log.close()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    state = json.loads((run_dir / "trackers.json").read_text())
    run = client.get_run(state["mlflow"]["run_id"])
    assert state["mlflow"]["tracking_uri"] == store.as_uri() and not (run_dir / "mlruns").exists()
    assert client.get_experiment(run.info.experiment_id).name == "sql-sweep"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")) == [(1, 2.0), (2, 1.0)]
    assert [r.project for r in wandb_history(run_dir)[1]] == ["sql"]

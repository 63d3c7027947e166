"""A fast quickstart on a tiny model, end to end: every report section is written. (The real
quickstart, on the embedded model, is the `make quickstart` job.)"""
import json
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_fast_quickstart_writes_every_section(tmp_path, tiny_model_dir):
    from tunesmith.quickstart import quickstart

    report = quickstart(ROOT / "recipes" / "quickstart.yaml", [
        f"model.name={tiny_model_dir}", f"output_dir={tmp_path}", "model.frozen_dtype=same",
        "data.limit=24", "train.steps=2", "train.eval_every=1", "train.batch_tokens=512", "train.precision=fp32",
        "eval.limit=4", "eval.max_new_tokens=8", "train.eval_batches=1"])
    text = report.read_text()
    for section in ("## Before and after: sql", "| accuracy |", "## Loss", "loss.png", "tokens/s",
                    "peak memory", "## Time per stage", "| train (LoRA) |", "| evaluate base |",
                    "| evaluate tuned |", "## Answers before and after", "before_after.png"):
        assert section in text, section
    run = report.parent
    for name in ("loss.png", "before_after.png", "eval-base.json", "eval-tuned.json", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    tuned = json.loads((run / "eval-tuned.json").read_text())
    assert tuned["split"] == "test" and len(tuned["records"]) == 4
    assert {"prompt", "prediction", "reference", "correct", "error"} <= set(tuned["records"][0])

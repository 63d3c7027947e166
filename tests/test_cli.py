"""User mistakes reach the terminal as one clear line (exit code 2), never a traceback."""
import json
import subprocess
import sys


from tunesmith.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_recipe_key(capsys, tmp_path):
    code, _, err = run(capsys, "train", "recipes/lora-sft.yaml", "train.learning_rate=1e-4")
    assert code == 2 and "unknown recipe key `train.learning_rate`" in err and "Traceback" not in err


def test_missing_model_path(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    code, _, err = run(capsys, "train", "recipes/lora-sft.yaml", f"model.name={tmp_path / 'nope'}",
                       f"data.train={data}", f"output_dir={tmp_path}")
    assert code == 2 and "model not found" in err and "nope" in err


def test_malformed_jsonl_names_file_and_line(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n{oops\n")
    code, _, err = run(capsys, "train", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}",
                       f"data.train={data}", f"output_dir={tmp_path}")
    assert code == 2 and "bad.jsonl:2" in err


def test_missing_field_names_field(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"conversation": []}) + "\n")
    code, _, err = run(capsys, "train", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}",
                       f"data.train={data}", "data.format=chat", "data.val_fraction=0", f"output_dir={tmp_path}")
    assert code == 2 and "chat.jsonl:1" in err and "messages" in err


def test_empty_after_filtering(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * 200}) + "\n" for _ in range(3)))
    code, _, err = run(capsys, "train", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}",
                       f"data.train={data}", "data.max_length=16", "data.overflow=drop", f"output_dir={tmp_path}")
    assert code == 2 and "no usable samples" in err


def test_data_inspect_marks_trained_tokens(capsys, tiny_model_dir):
    code, out, _ = run(capsys, "data", "inspect", "recipes/lora-sft.yaml", f"model.name={tiny_model_dir}",
                       "data.limit=20", "-n", "1")
    assert code == 0
    assert "⟦" in out and "Answer:" in out


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "tunesmith", "recipe"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "method.lora.rank" in r.stdout

"""Enforced domain routing for SFT and generation: a mix of sources gives each record its source's
domain; domains are numbered in sorted order and ride through packing as per-token route ids; every
token of a record runs through its domain's expert (spied, and by per-expert distinct weights); a
packed batch equals its samples one by one; the names are saved with the run; `--domain NAME` at
generation runs that expert."""
import json
from itertools import islice

import pytest
import torch

from tests.conftest import make_tiny_model, perturb
from tunesmith.config import DataConfig
from tunesmith.data import DataError, collate, load_data
from tunesmith.data.render import fit_length
from tunesmith.data.sources import mixed_sources, read_records
from tunesmith.methods import attach, build_method
from tunesmith.models.embedding import DOMAINS_FILE
from tunesmith.models.moe import moe_modules, routing
from tunesmith.objectives.sft import causal_lm_loss
from tunesmith.recipe import method_from_dict


def write_task(path, word, n=6, domain=None):
    rows = []
    for i in range(n):
        row = {"messages": [{"role": "user", "content": f"{word} question {i}?"},
                            {"role": "assistant", "content": f"{word} answer {i} " + "x " * (i % 3)}]}
        if domain is not None:
            row["domain"] = domain
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mixed_sources_name_each_source_by_its_task_file_or_prefix(tmp_path):
    assert mixed_sources("task:sql/train+task:json/train") == [("sql", "task:sql/train"), ("json", "task:json/train")]
    assert mixed_sources("a/sql.jsonl + b/extract.jsonl") == [("sql", "a/sql.jsonl"), ("extract", "b/extract.jsonl")]
    assert mixed_sources("code=a.jsonl+prose=task:json/train") == [("code", "a.jsonl"), ("prose", "task:json/train")]
    assert mixed_sources("sql=a.jsonl") == [("sql", "a.jsonl")]  # one source given a domain
    assert mixed_sources("task:sql/train") is None and mixed_sources("data/train.jsonl") is None
    odd = tmp_path / "c++=notes.jsonl"
    write_task(odd, "c")
    assert mixed_sources(str(odd)) is None  # a path that exists is one source, however it is spelled
    assert [r.fields.get("domain") for r in read_records(odd)] == [None] * 6
    with pytest.raises(DataError, match="empty source"):
        mixed_sources("a.jsonl++b.jsonl")


def test_a_mix_interleaves_its_sources_and_a_record_keeps_its_own_domain(tmp_path):
    sql = write_task(tmp_path / "sql.jsonl", "select", n=3)
    js = tmp_path / "json.jsonl"
    js.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two", "domain": "other"}) + "\n")
    records = list(read_records(f"{sql}+{js}"))
    assert [r.fields["domain"] for r in records] == ["sql", "json", "sql", "other", "sql"]
    assert records[1].where.endswith("json.jsonl:1") and records[4].where.endswith("sql.jsonl:3")
    tasks = list(islice(read_records("task:sql/train+task:json/train"), 4))
    assert [r.fields["domain"] for r in tasks] == ["sql", "json", "sql", "json"]
    assert "SQLite" in tasks[0].fields["messages"][0]["content"] and "JSON" in tasks[1].fields["messages"][0]["content"]


def test_load_data_numbers_domains_in_sorted_order(tmp_path, tokenizer):
    sql, js = write_task(tmp_path / "sql.jsonl", "select"), write_task(tmp_path / "json.jsonl", "object")
    splits = load_data(DataConfig(train=f"{sql}+{js}", val_fraction=0.25), tokenizer, report=False)
    assert splits.domains == ["json", "sql"]
    everything = splits.train + splits.val
    assert sorted(s["domain"] for s in everything) == [0] * 6 + [1] * 6
    for s in everything:  # the sample's text is its domain's
        assert ("select" in tokenizer.decode(s["input_ids"])) == (s["domain"] == 1)
    plain = load_data(DataConfig(train=str(sql)), tokenizer, report=False)
    assert plain.domains == [] and all("domain" not in s for s in plain.train)


def test_domains_are_all_or_none_and_strings(tmp_path, tokenizer):
    half = tmp_path / "half.jsonl"
    half.write_text(json.dumps({"text": "a", "domain": "x"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(DataError, match=r"half.jsonl:2: field 'domain' is missing, but .*half.jsonl:1 has one"):
        load_data(DataConfig(train=str(half)), tokenizer, report=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "domain": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'domain' must be a non-empty string, got 3"):
        load_data(DataConfig(train=str(bad)), tokenizer, report=False)


def test_route_ids_follow_the_samples_through_packing_and_padding():
    samples = [{"input_ids": [5, 6, 7], "weights": [0, 1, 1], "domain": 1},
               {"input_ids": [8, 9], "weights": [0, 1], "domain": 0},
               {"input_ids": [10, 11, 12, 13], "weights": [0, 1, 1, 1], "domain": 2}]
    packed = collate(samples, packing=True, pad_id=0)
    assert packed["route_ids"].tolist() == [[1, 1, 1, 0, 0, 2, 2, 2, 2]]
    padded = collate(samples, packing=False, pad_id=0)
    assert padded["route_ids"].tolist() == [[1, 1, 1, -1], [0, 0, -1, -1], [2, 2, 2, 2]]
    plain = collate([{k: v for k, v in s.items() if k != "domain"} for s in samples], packing=True, pad_id=0)
    assert "route_ids" not in plain
    cut, truncated = fit_length(samples[2], 2, "truncate")
    assert truncated and cut == {"input_ids": [10, 11], "weights": [0, 1], "domain": 2}


def routed_model(tokenizer, method="moe_lora", experts=2):
    model = make_tiny_model(tokenizer)
    opts = {"experts": experts, "rank": 4, "alpha": 8, "routing": "enforced"} if method == "moe_lora" \
        else {"experts": experts}
    m = build_method(method_from_dict(method, opts))
    torch.manual_seed(1)
    attach(model, m)
    perturb(model, std=0.2)  # distinct experts
    return model


@pytest.fixture
def mixed(tmp_path, tokenizer):
    sql, js = write_task(tmp_path / "sql.jsonl", "select", n=4), write_task(tmp_path / "json.jsonl", "object", n=4)
    return load_data(DataConfig(train=f"{sql}+{js}"), tokenizer, report=False).train


def test_every_token_of_a_record_runs_its_domains_expert(tokenizer, mixed):
    """A spy on every expert: in each layer, expert k reads exactly the MLP inputs at the positions of
    domain-k records' tokens, in order."""
    model = routed_model(tokenizer)
    seen, inputs = {}, {}
    for i, m in enumerate(moe_modules(model)):
        m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
        for k in range(m.n_experts):
            m.expert(k).gate_proj.register_forward_hook(
                lambda mod, args, out, key=(i, k): seen.setdefault(key, []).append(args[0]))
    batch = collate(mixed, packing=True, pad_id=0)
    with torch.no_grad():
        causal_lm_loss(model, batch)
    route = batch["route_ids"][0]
    assert set(route.tolist()) == {0, 1}
    for i in range(2):
        x = inputs[i].reshape(-1, inputs[i].shape[-1])  # (T, d): the layer's input, packed row
        for k in range(2):
            assert len(seen[(i, k)]) == 1  # one call per expert and layer: grouped
            assert torch.equal(seen[(i, k)][0], x[route == k])


def test_perturbing_one_domains_expert_changes_only_that_domains_samples(tokenizer, mixed):
    model = routed_model(tokenizer)
    alone = lambda: [float(causal_lm_loss(model, collate([s], packing=True, pad_id=0))[0]) for s in mixed]  # noqa: E731
    with torch.no_grad():
        before = alone()
        for m in moe_modules(model):
            for lin in m.expert(1).modules():
                if hasattr(lin, "lora_b"):
                    lin.lora_b.add_(0.3)
        after = alone()
    changed = [abs(a - b) > 1e-4 for a, b in zip(before, after)]
    assert changed == [s["domain"] == 1 for s in mixed] and any(changed) and not all(changed)


@pytest.mark.parametrize("method", ["moe_lora", "moe"])
def test_packed_equals_one_by_one_with_per_record_domains(tokenizer, mixed, method):
    model = routed_model(tokenizer, method)
    with torch.no_grad():
        packed, n, _ = causal_lm_loss(model, collate(mixed, packing=True, pad_id=0))
        singles = [causal_lm_loss(model, collate([s], packing=True, pad_id=0)) for s in mixed]
        padded, _, _ = causal_lm_loss(model, collate(mixed, packing=False, pad_id=0))
        unrouted, _, _ = causal_lm_loss(model, {k: v for k, v in collate(mixed, packing=True, pad_id=0).items()
                                                if k != "route_ids"})
    assert n == sum(s[1] for s in singles)
    torch.testing.assert_close(packed, sum(s[0] for s in singles), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(padded, packed, atol=1e-4, rtol=1e-5)
    assert abs(float(unrouted) - float(packed)) > 1e-2  # the route matters: every token on expert 0 differs


def test_an_sft_run_on_a_mix_saves_its_domains(tmp_path, tiny_model_dir, capsys):
    from tests.conftest import tiny_recipe
    from tunesmith.objectives import ObjectiveError
    from tunesmith.train.loop import train

    sql, js = write_task(tmp_path / "sql.jsonl", "select", n=8), write_task(tmp_path / "json.jsonl", "object", n=8)
    extra = [f"data.train={sql}+{js}", "method.name=moe_lora", "method.moe_lora.routing=enforced",
             "method.moe_lora.rank=4", "train.steps=2"]
    recipe = tiny_recipe(tmp_path / "a", tiny_model_dir, *extra, "method.moe_lora.experts=2", "eval.task=sql",
                         "eval.limit=1", "eval.max_new_tokens=2")
    result = train(recipe)
    assert json.loads((result.run_dir / DOMAINS_FILE).read_text()) == ["json", "sql"]
    assert json.loads((result.output / DOMAINS_FILE).read_text()) == ["json", "sql"]
    # evaluation during training measures the task with its own domain's expert, as `tunesmith eval` does
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.train.prepare import evaluate_task

    capsys.readouterr()
    model, tok = load_for_inference(adapter=str(result.run_dir))
    evaluate_task(model, tok, recipe)
    assert "runs the `sql` expert" in capsys.readouterr().err
    with pytest.raises(ObjectiveError, match="the data has 2 domains .* but the MoE layers have 1 experts"):
        train(tiny_recipe(tmp_path / "b", tiny_model_dir, *extra, "method.moe_lora.experts=1"))


def save_routed_adapter(tokenizer, tiny_model_dir, folder):
    from transformers import AutoModelForCausalLM

    from tunesmith.export.tuned import save_tuned

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    method = build_method(method_from_dict("moe_lora", {"experts": 2, "rank": 4, "alpha": 8, "routing": "enforced"}))
    torch.manual_seed(1)
    attach(model, method)
    perturb(model, std=0.5)
    save_tuned(model, method, str(tiny_model_dir), folder)
    (folder / DOMAINS_FILE).write_text(json.dumps(["json", "sql"]))
    return model


def test_generate_with_domain_runs_that_expert(tokenizer, tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main
    from tunesmith.infer.generate import generate

    model = save_routed_adapter(tokenizer, tiny_model_dir, tmp_path / "adapter")
    prompts = ["Write a query.", "Give me an object", "hello there"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    expected = {}
    for k, name in enumerate(["json", "sql"]):
        with routing(model, k):
            expected[name] = generate(model, tokenizer, prompts, max_new_tokens=6)
    assert expected["json"] != expected["sql"]  # the experts answer differently
    for name in ("sql", "json"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", "--adapter", str(tmp_path / "adapter"), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(out), "--domain", name, "--max-new-tokens", "6"]) == 0
        got = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
        assert got == expected[name]
    capsys.readouterr()
    assert main(["generate", "--adapter", str(tmp_path / "adapter"), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "x.jsonl"), "--domain", "prose", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "--domain prose: unknown domain;" in err and "lists json, sql" in err


def test_eval_domain_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--task", "sql", "--limit", "1", "--domain", "sql"]) == 2
    err = capsys.readouterr().err
    assert "--domain sql: this model was not trained with domains" in err and "Traceback" not in err


def test_eval_of_a_task_that_is_a_domain_uses_its_expert_by_default(tokenizer, tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main

    save_routed_adapter(tokenizer, tiny_model_dir, tmp_path / "adapter")
    common = ["eval", "--adapter", str(tmp_path / "adapter"), "--task", "sql", "--limit", "3",
              "--max-new-tokens", "5"]

    def outputs(*extra, name):
        assert main([*common, *extra, "--output", str(tmp_path / name)]) == 0
        return [json.dumps(r, sort_keys=True) for r in json.loads((tmp_path / name).read_text())["records"]]

    default = outputs(name="default.json")
    assert "runs the `sql` expert" in capsys.readouterr().err
    assert default == outputs("--domain", "sql", name="sql.json")
    assert default != outputs("--domain", "json", name="json.json")


def test_a_learned_router_ignores_the_datas_domains(tokenizer, mixed):
    """A mix of sources gives every record a domain; a learned router must still route (and train)."""
    model = make_tiny_model(tokenizer)
    attach(model, build_method(method_from_dict("moe_lora", {"experts": 2, "rank": 4, "alpha": 8})))
    perturb(model, std=0.2)
    batch = collate(mixed, packing=True, pad_id=0)
    with torch.no_grad():
        with_domains, _, _ = causal_lm_loss(model, batch)
        assert all(m.router.last is not None for m in moe_modules(model))  # the routers ran
        without, _, _ = causal_lm_loss(model, {k: v for k, v in batch.items() if k != "route_ids"})
    assert torch.equal(with_domains, without)

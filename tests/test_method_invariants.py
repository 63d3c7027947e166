"""Every method, the same invariants (ARCHITECTURE.md): base keys unchanged; gradients only on the
method's parameters; frozen parameters bit-identical after optimizer steps; merged == unmerged with
non-zero deltas and merged != base (methods that merge); adapter save → load gives the same logits;
a run interrupted and resumed reproduces the uninterrupted loss curve (method state included:
sparse indices, HFT draws, ...). Method-specific behaviour is tested in each method's own file."""

import pytest
import torch

from tests.conftest import make_tiny_model, perturb, tiny_recipe, train_losses
from tunesmith.methods import attach, build_method
from tunesmith.methods.catalog import catalog
from tunesmith.recipe import method_from_dict
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import stopping_after, train
from tunesmith.train.metrics import read_metrics
from tunesmith.train.optim import build_optimizer

# (case id, method name, options): every registered method and each of its named variants, sized by
# the method's `tiny` options for the tiny model (hidden 64, 2 layers) — derived from the registry
CASES = [(e.label, e.method, e.options) for e in catalog(tiny=True)]


def _traits(name, opts):
    """(mergeable, output) of a case's method; None when it cannot be built, so the case stays in
    every list below and its tests fail with the real error (a missing method module is a failure)."""
    try:
        method = build_method(method_from_dict(name, opts))
    except Exception:  # noqa: BLE001 — reported by the tests themselves
        return None
    return method.mergeable, method.output


TRAITS = {cid: _traits(name, opts) for cid, name, opts in CASES}
PARAMS = [pytest.param(name, opts, id=cid) for cid, name, opts in CASES]
MERGEABLE = [p for p in PARAMS if TRAITS[p.id] is None or TRAITS[p.id][0]]
ADAPTERS = [p for p in PARAMS if TRAITS[p.id] is None or TRAITS[p.id][1] == "adapter"]


def make(tokenizer, name, opts, seed=0):
    model = make_tiny_model(tokenizer, seed=seed)
    base_keys = set(model.state_dict())
    cfg = method_from_dict(name, opts)
    method = build_method(cfg)
    torch.manual_seed(1)
    attach(model, method)
    return model, method, cfg, base_keys


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name,opts", PARAMS)
def test_base_keys_kept_and_gradients_only_on_method_parameters(tokenizer, name, opts):
    model, method, _, base_keys = make(tokenizer, name, opts)
    assert base_keys <= set(model.state_dict()), "base checkpoint keys must be unchanged"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, p in model.named_parameters() if method.is_trainable(n, p)}
    perturb(model)  # zero-initialised parts would block gradients to their partners
    model.train()
    model(IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable, f"gradients on frozen parameters: {sorted(with_grad - trainable)[:5]}"
    assert with_grad, "no trainable parameter received a gradient"


@pytest.mark.parametrize("name,opts", PARAMS)
def test_frozen_bit_identical_after_steps(tokenizer, name, opts):
    model, method, cfg, _ = make(tokenizer, name, opts)
    recipe = tiny_recipe_cfg()
    optimizer = build_optimizer(model, recipe.train, method)
    trained = set(method.trained_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    method.on_epoch(model, 0)
    for step in range(1, 4):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        method.after_step(model, step, optimizer)
        optimizer.zero_grad(set_to_none=True)
    after = dict(model.named_parameters())
    frozen = [n for n in before if n not in trained]
    assert all(torch.equal(before[n], after[n]) for n in frozen), "a frozen parameter changed"
    moved = [n for n in trained if not torch.equal(before[n], after[n])]
    assert moved, "no trainable parameter moved"


def tiny_recipe_cfg():
    from tunesmith.recipe import load_recipe

    return load_recipe(None, ["train.lr=1e-2", "train.weight_decay=0.1"])


@pytest.mark.parametrize("name,opts", MERGEABLE)
def test_merged_equals_unmerged_and_differs_from_base(tokenizer, name, opts):
    model, method, _, base_keys = make(tokenizer, name, opts)
    assert method.mergeable
    base = logits(make_tiny_model(tokenizer), IDS)
    perturb(model)
    model.eval()
    unmerged = logits(model, IDS)
    method.merge(model)
    merged = logits(model, IDS)
    assert set(model.state_dict()) == base_keys, "a merged model has exactly the base keys"
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert (merged - base).abs().max() > 1e-3, "merged must differ from the base model"


@pytest.mark.parametrize("name,opts", ADAPTERS)
def test_adapter_save_load_round_trip(tokenizer, name, opts, tmp_path):
    from tunesmith.export.tuned import load_tuned, save_tuned

    model, method, _, _ = make(tokenizer, name, opts)
    assert method.output == "adapter"
    perturb(model)
    model.eval()
    expected = logits(model, IDS)
    save_tuned(model, method, "tiny", tmp_path / "adapter")
    fresh = make_tiny_model(tokenizer)
    base = logits(fresh, IDS)
    loaded, cfg = load_tuned(fresh, tmp_path)  # a run folder resolves to its adapter/
    assert cfg.name == name
    fresh.eval()
    got = logits(fresh, IDS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - base).abs().max() > 1e-3


def epoch_losses(run_dir):
    """Per epoch, the loss over every trained token of that epoch (each step's mean loss weighted by
    its trained tokens), with the token count: epochs cover the same samples, so they compare."""
    sums: dict[int, list[float]] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if "loss" in r:
            acc = sums.setdefault(r["epoch"], [0.0, 0])
            acc[0] += r["loss"] * r["trained_tokens"]
            acc[1] += r["trained_tokens"]
    return [(total / n, n) for _, (total, n) in sorted(sums.items())]


@pytest.mark.parametrize("name,opts", PARAMS)
def test_run_resumes_exactly(tmp_path, tiny_model_dir, name, opts):
    """Through the real loop: 6 steps straight vs 3 + resume 3; output saved; loss goes down (the
    last epoch's loss over the training set is below the first epoch's, on the same samples)."""
    extra = [f"method.name={name}"] + [f"method.{name}.{k}={v if not isinstance(v, list) else '[' + ','.join(v) + ']'}"
                                       for k, v in opts.items()]
    extra += ["train.batch_tokens=512"]  # 2 micro-batches an epoch: 3 epochs in 6 steps, so per-epoch hooks run
    full = train(tiny_recipe(tmp_path / "a", tiny_model_dir, *extra))
    with stopping_after(3):
        first = train(tiny_recipe(tmp_path / "b", tiny_model_dir, *extra))
    assert first.status == "interrupted" and ckpt.latest_checkpoint(first.run_dir).name == "step-3"
    resumed = train(tiny_recipe(tmp_path / "b", tiny_model_dir, *extra, "resume=true"))
    a, b = train_losses(full.run_dir), train_losses(resumed.run_dir)
    assert len(a) == len(b) == 6
    assert all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)
    assert full.output is not None and full.output.is_dir()
    epochs = epoch_losses(full.run_dir)
    assert len(epochs) == 3 and epochs[0][1] == epochs[-1][1], epochs  # the same trained tokens each epoch
    assert epochs[-1][0] < epochs[0][0], f"loss did not go down over 3 epochs: {epochs}"


def test_every_registered_method_has_a_catalog_entry_and_a_case():
    """The registry is the source of truth: each method class declares its options, paper, what to
    pick it for and valid variants, so the catalog and the cases above cover it without a hand-kept list."""
    from tunesmith.config import Config
    from tunesmith.methods import REGISTRY, method_class

    entries = catalog()
    assert [e.label for e in entries if e.label in REGISTRY] == list(REGISTRY), "a registered method has no entry"
    assert len({e.label for e in entries}) == len(entries), "catalog labels must be unique"
    for name in REGISTRY:
        cls = method_class(name)
        assert isinstance(cls.Options, type) and issubclass(cls.Options, Config), f"{name}: no Options class"
        assert cls.paper and cls.when, f"{name}: the catalog needs its paper and what to pick it for"
        assert cls(cls.Options()).name == name, f"REGISTRY says {name}, the class says otherwise"
    for e in entries:
        assert e.paper and e.when, f"{e.label}: no paper or when-to-pick"
        method_from_dict(e.method, e.options)  # every variant is a valid options block
    assert {name for _, name, _ in CASES} == set(REGISTRY)
    assert [cid for cid, _, _ in CASES] == [e.label for e in entries], "every catalog entry is an invariant case"


def test_methods_command_lists_every_method_with_its_size(tiny_model_dir, capsys):
    from tunesmith.cli import main

    assert main(["methods", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert set(rows) == {e.label for e in catalog()}
    sizes = {k: int(v[1].replace(",", "")) for k, v in rows.items()}
    total = int(out.split("(")[1].split()[0].replace(",", ""))
    assert sizes["full"] == total  # every parameter trains
    assert all(0 < n <= total for n in sizes.values())
    assert sizes["ia3"] < sizes["lora"] < sizes["hft"] < sizes["full"]
    assert sizes["dora"] > sizes["lora"]  # + a magnitude per output row
    assert "method.name=lora method.lora.dora=true" in out  # the overrides that pick it


def test_frozen_bf16_with_fp32_compute_is_refused_when_base_weights_train(tmp_path, tiny_model_dir):
    from tunesmith.train.loop import TrainError

    with pytest.raises(TrainError, match="model.frozen_dtype=bf16 with train.precision=fp32: method `freeze`"):
        train(tiny_recipe(tmp_path, tiny_model_dir, "method.name=freeze", "model.frozen_dtype=bf16"))


def greedy_cached(model, ids, n):
    """n new tokens by greedy decoding through `generate` (KV cache on)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[:, ids.shape[1]:]


def greedy_uncached(model, ids, n):
    """n new tokens by greedy decoding the slow way: a full forward per token, no cache."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, -n:]


@pytest.mark.parametrize("name,opts", [p for p in PARAMS if p.id in ("sparse", "ia3", "prefix", "mam")])
def test_trained_adapter_serves_and_exports(tmp_path, tiny_model_dir, name, opts):
    """After training: inference loads the run's adapter (merged when the method merges) with the
    same logits and, under greedy decoding, the same continuation token for token as the unmerged
    model decoded without a cache; `export` writes a plain model or refuses by name."""
    from transformers import AutoModelForCausalLM

    from tunesmith.export import ExportError, export_merged
    from tunesmith.infer.generate import generate, load_for_inference

    extra = [f"method.name={name}"] + [f"method.{name}.{k}={v}" for k, v in opts.items()]
    result = train(tiny_recipe(tmp_path, tiny_model_dir, *extra))
    unmerged, tok = load_for_inference(str(tiny_model_dir), adapter=str(result.run_dir), merge=False)
    served, _ = load_for_inference(str(tiny_model_dir), adapter=str(result.run_dir))
    expected = logits(unmerged, IDS)
    torch.testing.assert_close(logits(served, IDS), expected, atol=1e-5, rtol=1e-4)
    want = greedy_uncached(unmerged, IDS, 6)
    assert torch.equal(greedy_cached(served, IDS, 6), want)
    assert torch.equal(greedy_cached(unmerged, IDS, 6), want)
    texts = generate(served, tok, ["What is 2 plus 3?", "Name a colour."], max_new_tokens=6)
    assert all(texts) and texts == generate(unmerged, tok, ["What is 2 plus 3?", "Name a colour."], max_new_tokens=6)
    if not build_method(method_from_dict(name, opts)).mergeable:
        with pytest.raises(ExportError, match=f"a `{name}` adapter cannot be merged"):
            export_merged(str(tiny_model_dir), result.run_dir, tmp_path / "merged")
        return
    out = export_merged(str(tiny_model_dir), result.run_dir, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(plain, IDS), expected, atol=1e-5, rtol=1e-4)
    assert (logits(plain, IDS) - logits(make_tiny_model(tokenizer=tok), IDS)).abs().max() > 1e-3
    assert torch.equal(greedy_cached(plain, IDS, 6), want)

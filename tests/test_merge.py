"""Merging: each method on hand-built tensors against hand computations, parity with PEFT's
`add_weighted_adapter` on a tiny model with two LoRA adapters, full-model task vectors, and the
merged output loading where adapters and models load."""
import json
import math

import pytest
import torch

from tunesmith.models import merging

from conftest import lively_model

# ---- hand-built tensors

T1 = torch.tensor([1.0, -2.0, 0.5, 3.0])
T2 = torch.tensor([-3.0, 1.0, 0.4, -1.2])
T3 = torch.tensor([1.0, 1.5, -0.1, 2.0])


def test_trim_keeps_the_largest_magnitudes():
    assert torch.equal(merging.trim(T2, 0.5), torch.tensor([-3.0, 0.0, 0.0, -1.2]))
    assert torch.equal(merging.trim(T1, 0.25), torch.tensor([0.0, 0.0, 0.0, 3.0]))
    assert torch.equal(merging.trim(T1, 1.0), T1)


def test_ties_without_trimming_elects_the_sign_of_the_sum_and_averages_the_agreeing():
    # sums: -1.0, 0.5, 0.8, 3.8 -> signs -, +, +, +
    # entry 0: only T2 (-3) agrees; 1: T2, T3 (1, 1.5); 2: T1, T2 (0.5, 0.4); 3: T1, T3 (3, 2)
    got = merging.ties([T1, T2, T3], [1.0, 1.0, 1.0], density=1.0)
    assert torch.allclose(got, torch.tensor([-3.0, 1.25, 0.45, 2.5]))


def test_ties_trims_before_the_election():
    # trimmed to 2 of 4: T1 [0,-2,0,3], T2 [-3,0,0,-1.2], T3 [0,1.5,0,2]; sums -3, -0.5, 0, 3.8
    # entry 1 now elects − (untrimmed it was +): only T1's −2 agrees; entry 2: nobody is left -> 0
    got = merging.ties([T1, T2, T3], [1.0, 1.0, 1.0], density=0.5)
    assert torch.allclose(got, torch.tensor([-3.0, -2.0, 0.0, 2.5]))
    # weights scale the mean but not the election (PEFT's semantics): w = 2, 1, 1
    got = merging.ties([T1, T2, T3], [2.0, 1.0, 1.0], density=0.5)
    assert torch.allclose(got, torch.tensor([-3.0, -4.0, 0.0, 4.0]))


def test_sign_election_on_a_zero_sum_is_positive():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 2.0])
    assert torch.equal(merging.elect_sign(torch.stack([a, b])), torch.tensor([1.0, 1.0]))
    assert torch.allclose(merging.ties([a, b], [1.0, 1.0], 1.0), torch.tensor([1.0, 2.0]))


def test_linear_averages_and_task_arithmetic_sums():
    assert torch.allclose(merging.linear([T1, T2], [1.0, 3.0]), (T1 + 3 * T2) / 4)
    assert torch.allclose(merging.task_arithmetic([T1, T2], [1.0, 3.0]), T1 + 3 * T2)
    assert torch.allclose(merging.task_arithmetic([T1, T2], [1.0, -1.0]), T1 - T2)
    with pytest.raises(merging.MergeError, match="sum to 0"):
        merging.linear([T1, T2], [1.0, -1.0])


def test_magnitude_prune_is_task_arithmetic_of_the_trimmed():
    got = merging.magnitude_prune([T1, T2], [1.0, 2.0], density=0.5)
    assert torch.allclose(got, torch.tensor([0.0, -2.0, 0.0, 3.0]) + 2 * torch.tensor([-3.0, 0.0, 0.0, -1.2]))


def test_dare_drops_and_rescales_with_a_seeded_mask():
    t = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    got = merging.dare_drop(t, 0.25, torch.Generator().manual_seed(7))
    kept = got != 0
    assert torch.allclose(got[kept], t[kept] / 0.25)  # survivors rescaled by 1/density
    # the mask is Bernoulli(density) from the generator: the same draw by hand
    hand = torch.bernoulli(torch.full_like(t, 0.25), generator=torch.Generator().manual_seed(7)).bool()
    assert torch.equal(kept, hand)
    assert abs(kept.float().mean().item() - 0.25) < 0.03  # 4096 draws: 5 standard deviations
    assert torch.equal(got, merging.dare_drop(t, 0.25, torch.Generator().manual_seed(7)))
    assert not torch.equal(got, merging.dare_drop(t, 0.25, torch.Generator().manual_seed(8)))
    assert torch.equal(merging.dare_drop(t, 1.0, torch.Generator().manual_seed(7)), t)


def test_dare_linear_and_dare_ties_on_the_dropped_vectors():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ts = [torch.randn(32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    gen = g()
    dropped = [merging.dare_drop(t, 0.5, gen) for t in ts]  # the order dare_* draws in
    assert torch.allclose(merging.dare_linear(ts, [1.0, 2.0, 0.5], 0.5, g()),
                          dropped[0] + 2 * dropped[1] + 0.5 * dropped[2])
    assert torch.allclose(merging.dare_ties(ts, [1.0, 2.0, 0.5], 0.5, g()),
                          merging.ties(dropped, [1.0, 2.0, 0.5], density=1.0))
    # density 1 drops nothing: DARE-TIES is TIES without trimming (hand values above)
    assert torch.allclose(merging.dare_ties([T1, T2, T3], [1.0] * 3, 1.0, g()), torch.tensor([-3.0, 1.25, 0.45, 2.5]))


def test_slerp_ends_midpoint_and_colinear_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(merging.slerp(a, b, 0.0), a)
    assert torch.allclose(merging.slerp(a, b, 1.0), b)
    mid = merging.slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # on the circle, not the chord
    assert math.isclose(mid.norm().item(), 1.0, rel_tol=1e-6)
    third = merging.slerp(a, b, 1 / 3)  # 30° along the 90° arc
    assert torch.allclose(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    c = torch.tensor([2.0, 1e-4])  # nearly colinear with a: linear interpolation
    assert torch.allclose(merging.slerp(a, c, 0.5), 0.5 * a + 0.5 * c)
    with pytest.raises(merging.MergeError):
        merging.combine("slerp", [T1, T2, T3], [1.0] * 3)


# ---- LoRA adapters on a tiny model, and PEFT's add_weighted_adapter


@pytest.fixture(scope="module")
def lively_dir(tokenizer, tmp_path_factory):
    """A tiny model with large random weights (greedy outputs differ between models), as a folder."""
    path = tmp_path_factory.mktemp("merge-base")
    lively_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_lora(base_dir, out, seed: int, rank: int = 4, alpha: float = 8.0, **extra):
    """A tunesmith LoRA adapter folder (with PEFT's files) with non-zero A and B."""
    from tunesmith.export.tuned import save_tuned
    from tunesmith.methods import attach, build_method
    from tunesmith.methods.options import method_from_dict
    from tunesmith.models.load import load_model

    model, _ = load_model(str(base_dir))
    method = build_method(method_from_dict("lora", {"rank": rank, "alpha": alpha, **extra}))
    attach(model, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".lora_a", ".lora_b")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_tuned(model, method, str(base_dir), out)


@pytest.fixture(scope="module")
def two_loras(lively_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return (make_lora(lively_dir, root / "a", seed=1, alpha=8.0),
            make_lora(lively_dir, root / "b", seed=2, alpha=16.0))


def spec(**values):
    from tunesmith.export.merge import read_merge_recipe

    return read_merge_recipe({"merge": values})


def run(**values):
    from tunesmith.export.merge import run_merge

    return run_merge(spec(**values), progress=False)


def adapter_deltas(base_dir, folder) -> dict[str, torch.Tensor]:
    """ΔW per module of an adapter folder, loaded the way eval/generate load it (export.tuned)."""
    from tunesmith.export.tuned import load_tuned
    from tunesmith.methods.lora import lora_modules
    from tunesmith.models.load import load_model

    model, _ = load_model(str(base_dir))
    load_tuned(model, folder)
    return {n: m.delta_weight().detach() for n, m in lora_modules(model).items()}


def model_deltas(base_dir, folder) -> dict[str, torch.Tensor]:
    """Weight − base per Linear weight of a full model folder (non-zero ones)."""
    from tunesmith.models.load import load_model

    base, _ = load_model(str(base_dir))
    merged, _ = load_model(str(folder))
    ours = dict(base.named_parameters())
    return {n.removesuffix(".weight"): (p.detach() - ours[n].detach()) for n, p in merged.named_parameters()
            if not torch.equal(p, ours[n])}


def peft_merge(base_dir, loras, monkeypatch, combination, weights, seed=0, **kw) -> dict[str, torch.Tensor]:
    """PEFT's merged ΔW per module. add_weighted_adapter first creates the new adapter (its random
    init draws from torch's global generator), then merges: the generator is reseeded right after
    that creation, so DARE's masks are drawn from `seed` exactly as ours are."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(loras[0]), adapter_name="a")
    model.load_adapter(str(loras[1]), adapter_name="b")
    inject = LoraModel.inject_adapter

    def inject_then_seed(self, *args, **kwargs):
        out = inject(self, *args, **kwargs)
        torch.manual_seed(seed)
        return out

    monkeypatch.setattr(LoraModel, "inject_adapter", inject_then_seed)
    model.add_weighted_adapter(["a", "b"], weights, "merged", combination_type=combination, **kw)
    monkeypatch.undo()
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m.get_delta_weight("merged").detach()
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def assert_same(ours: dict, theirs: dict, atol=1e-6):
    assert set(ours) == set(theirs)
    for name in ours:
        diff = (ours[name] - theirs[name]).abs().max().item()
        assert diff <= atol, f"{name}: max |ours − PEFT| = {diff:.2e}"
    assert any(t.abs().max() > 0.1 for t in ours.values())  # not vacuous: real deltas


PARITY = [
    # (our method, our options, PEFT combination_type, PEFT weights from (w_a, w_b), PEFT kwargs)
    ("task_arithmetic", {}, "cat", lambda w: w, {}),
    ("linear", {}, "cat", lambda w: [x / sum(w) for x in w], {}),
    ("slerp", {}, None, None, {}),  # no PEFT counterpart: checked against the hand formula below
    ("task_arithmetic", {"rank": 4}, "svd", lambda w: w, {"svd_rank": 4}),
    ("ties", {"space": "adapter", "density": 0.5}, "ties", lambda w: w, {"density": 0.5}),
    ("ties", {"rank": 4, "density": 0.5}, "ties_svd", lambda w: w, {"density": 0.5, "svd_rank": 4}),
    ("dare_linear", {"space": "adapter", "density": 0.5, "seed": 5}, "dare_linear", lambda w: w, {"density": 0.5}),
    ("dare_ties", {"space": "adapter", "density": 0.5, "seed": 5}, "dare_ties", lambda w: w, {"density": 0.5}),
    ("dare_linear", {"rank": 4, "density": 0.3, "seed": 6}, "dare_linear_svd", lambda w: w,
     {"density": 0.3, "svd_rank": 4}),
    ("dare_ties", {"rank": 4, "density": 0.3, "seed": 6}, "dare_ties_svd", lambda w: w,
     {"density": 0.3, "svd_rank": 4}),
    ("magnitude_prune", {"space": "adapter", "density": 0.4}, "magnitude_prune", lambda w: w, {"density": 0.4}),
    ("magnitude_prune", {"rank": 4, "density": 0.4}, "magnitude_prune_svd", lambda w: w,
     {"density": 0.4, "svd_rank": 4}),
]


@pytest.mark.parametrize("method,options,combination,peft_weights,kw", [p for p in PARITY if p[2]],
                         ids=[f"{p[0]}-{p[2]}" for p in PARITY if p[2]])
def test_lora_merge_matches_peft_add_weighted_adapter(method, options, combination, peft_weights, kw,
                                                      lively_dir, two_loras, tmp_path, monkeypatch):
    weights = [0.7, 1.3]
    result = run(method=method, models=[{"path": str(p), "weight": w} for p, w in zip(two_loras, weights)],
                 output=str(tmp_path / "out"), **options)
    assert result.kind == "lora"
    ours = adapter_deltas(lively_dir, result.output)
    seed = options.get("seed", 0)
    if "svd_rank" in kw:
        kw = {**kw, "svd_full_matrices": False}  # the reduced SVD, as ours (same factors, less memory)
    theirs = peft_merge(lively_dir, two_loras, monkeypatch, combination, peft_weights(weights), seed=seed, **kw)
    assert_same(ours, theirs)


def peft_deltas(base_dir, loras) -> dict[str, list[torch.Tensor]]:
    """PEFT's ΔW = scaling·B·A of each adapter, per module."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(loras[0]), adapter_name="a")
    model.load_adapter(str(loras[1]), adapter_name="b")
    return {n.removeprefix("base_model.model."): [m.get_delta_weight("a").detach(), m.get_delta_weight("b").detach()]
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_merge_on_deltas_as_a_full_model_matches_peft_merge_utils(method, lively_dir, two_loras, tmp_path):
    """On the dense ΔW_i (what PEFT's *_svd types merge before their SVD), written as a full model:
    the weights minus the base equal PEFT's merge function on PEFT's ΔW_i, module by module in the
    model's order with torch's generator seeded as ours."""
    from peft.utils import merge_utils

    weights, seed = [0.7, 1.3], 4
    result = run(method=method, density=0.5, seed=seed, space="delta", output=str(tmp_path / "m"),
                 models=[{"path": str(p), "weight": w} for p, w in zip(two_loras, weights)])
    assert result.kind == "model"
    ours = model_deltas(lively_dir, result.output)
    deltas = peft_deltas(lively_dir, two_loras)
    w = torch.tensor(weights)
    torch.manual_seed(seed)
    theirs = {}
    for name, ds in deltas.items():  # named_modules order: the order DARE draws in
        theirs[name] = (merge_utils.task_arithmetic(ds, w) if method == "task_arithmetic" else
                        getattr(merge_utils, method)(ds, w, 0.5))
    assert_same(ours, theirs)


def test_slerp_of_two_loras_is_exact_per_module(lively_dir, two_loras, tmp_path):
    result = run(method="slerp", t=0.3, models=[str(p) for p in two_loras], output=str(tmp_path / "s"))
    assert result.kind == "lora"
    ours = adapter_deltas(lively_dir, result.output)
    da, db = adapter_deltas(lively_dir, two_loras[0]), adapter_deltas(lively_dir, two_loras[1])
    for name in ours:
        a, b = da[name].flatten().double(), db[name].flatten().double()
        omega = torch.arccos(a @ b / (a.norm() * b.norm()))
        hand = (torch.sin(0.7 * omega) * a + torch.sin(0.3 * omega) * b) / torch.sin(omega)
        assert torch.allclose(ours[name].flatten().double(), hand, atol=1e-6)


# ---- inputs of every kind, outputs that load, refusals


def logits(model_dir, adapter=None) -> torch.Tensor:
    from tunesmith.infer.generate import load_for_inference

    model, tok = load_for_inference(str(model_dir), str(adapter) if adapter else None)
    ids = torch.tensor([tok("Why is the sky blue? Tell me about the sea.")["input_ids"]])
    with torch.no_grad():
        return model(ids).logits[0]


def test_merged_lora_differs_from_inputs_and_base_reloads_and_generates(lively_dir, two_loras, tmp_path):
    from tunesmith.export.gguf import export_gguf_lora
    from tunesmith.infer.generate import generate, load_for_inference

    result = run(method="ties", space="adapter", density=0.5, models=[str(p) for p in two_loras],
                 output=str(tmp_path / "merged"))
    merged = logits(lively_dir, result.output)
    for other in (logits(lively_dir), logits(lively_dir, two_loras[0]), logits(lively_dir, two_loras[1])):
        assert (merged - other).abs().max() > 1e-2
    record = json.loads((result.output / "tunesmith_merge.json").read_text())
    assert record["method"] == "ties" and [m["path"] for m in record["models"]] == [str(p) for p in two_loras]
    model, tok = load_for_inference(None, str(result.output))  # the base comes from the adapter's record
    texts = generate(model, tok, ["hi", "Why is the sky blue?"], max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts) and any(texts)
    written = export_gguf_lora(result.output, tmp_path / "merged.gguf", progress=False)
    assert written.path.is_file() and written.tensors == 2 * len(adapter_deltas(lively_dir, result.output))


def test_full_model_output_differs_and_loads(lively_dir, two_loras, tmp_path):
    result = run(method="dare_ties", density=0.6, seed=1, models=[str(p) for p in two_loras],
                 output=str(tmp_path / "full"), dtype="bf16")
    assert result.kind == "model" and (result.output / "config.json").is_file()
    merged = logits(result.output)
    for other in (logits(lively_dir), logits(lively_dir, two_loras[0]), logits(lively_dir, two_loras[1])):
        assert (merged - other).abs().max() > 1e-2
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(result.output)).dtype == torch.bfloat16


def test_seeded_dare_is_reproducible_and_the_seed_matters(lively_dir, two_loras, tmp_path):
    out = [run(method="dare_linear", space="adapter", density=0.5, seed=s, models=[str(p) for p in two_loras],
               output=str(tmp_path / f"d{i}")).output for i, s in enumerate([3, 3, 4])]
    d = [adapter_deltas(lively_dir, o) for o in out]
    assert all(torch.equal(d[0][n], d[1][n]) for n in d[0])
    assert any(not torch.equal(d[0][n], d[2][n]) for n in d[0])


def test_cat_of_different_ranks_and_rslora_is_exact(lively_dir, tmp_path):
    a = make_lora(lively_dir, tmp_path / "a", seed=3, rank=4, alpha=8.0)
    b = make_lora(lively_dir, tmp_path / "b", seed=4, rank=2, alpha=4.0, rslora=True, targets=["q_proj", "up_proj"])
    result = run(method="task_arithmetic", models=[{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": -2.0}],
                 **{"lambda": 0.8}, output=str(tmp_path / "cat"))
    assert result.kind == "lora" and "rank 6" in result.summary
    ours, da, db = (adapter_deltas(lively_dir, f) for f in (result.output, a, b))
    assert set(db) < set(da) == set(ours)
    for name in ours:
        hand = 0.8 * (0.5 * da[name] - 2.0 * db.get(name, torch.zeros_like(da[name])))
        assert torch.allclose(ours[name], hand, atol=1e-6)


def test_peft_only_folder_and_run_folder_are_inputs(lively_dir, two_loras, tmp_path):
    import shutil

    peft_only = tmp_path / "peft"
    peft_only.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(two_loras[0] / f, peft_only / f)
    run_dir = tmp_path / "run"
    shutil.copytree(two_loras[1], run_dir / "adapter")  # a run folder: its adapter/ is used
    result = run(method="task_arithmetic", models=[str(peft_only), str(run_dir)], output=str(tmp_path / "o"))
    ours, da, db = (adapter_deltas(lively_dir, f) for f in (result.output, *two_loras))
    assert all(torch.allclose(ours[n], da[n] + db[n], atol=1e-6) for n in ours)


def test_full_models_and_other_adapters_merge_on_task_vectors(tokenizer, lively_dir, tmp_path):
    """τ = model − base for full model folders (tied embeddings counted once) and for a non-LoRA adapter."""
    from tunesmith.export.tuned import save_tuned
    from tunesmith.methods import attach, build_method
    from tunesmith.methods.options import method_from_dict
    from tunesmith.models.load import load_model

    base, _ = load_model(str(lively_dir))
    folders, taus = [], []
    for i in range(2):
        tuned, _ = load_model(str(lively_dir))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        tuned.save_pretrained(tmp_path / f"full{i}")
        folders.append(str(tmp_path / f"full{i}"))
        taus.append({n: p.detach() - dict(base.named_parameters())[n].detach() for n, p in tuned.named_parameters()})
    ia3, _ = load_model(str(lively_dir))
    method = build_method(method_from_dict("ia3", {}))
    attach(ia3, method)
    with torch.no_grad():
        for n, p in ia3.named_parameters():
            if n.endswith("ia3_l"):
                p.mul_(1.5)
    save_tuned(ia3, method, str(lively_dir), tmp_path / "ia3")
    method.merge(ia3)
    tau_ia3 = {n: p.detach() - dict(base.named_parameters())[n].detach() for n, p in ia3.named_parameters()}
    result = run(method="task_arithmetic", base=str(lively_dir), output=str(tmp_path / "out"),
                 models=[{"path": folders[0], "weight": 0.5}, {"path": folders[1], "weight": 0.25},
                         {"path": str(tmp_path / "ia3"), "weight": 1.0}])
    assert result.kind == "model"
    merged, _ = load_model(str(result.output))
    for n, p in merged.named_parameters():
        hand = dict(base.named_parameters())[n] + 0.5 * taus[0][n] + 0.25 * taus[1][n] + tau_ia3[n]
        assert torch.allclose(p, hand, atol=1e-6), n


def test_refusals_are_one_clear_line(tokenizer, lively_dir, two_loras, tmp_path):
    from tunesmith.export.atomic import ExportError
    from tunesmith.recipe import RecipeError

    other_base = tmp_path / "other-base"
    lively_model(tokenizer, seed=5).save_pretrained(other_base)
    tokenizer.save_pretrained(other_base)
    foreign = make_lora(other_base, tmp_path / "foreign", seed=9)
    with pytest.raises(ExportError, match=r"merge.models\[1\] .* was tuned from .*other-base.*do not add up"):
        run(method="ties", models=[str(two_loras[0]), str(foreign)], output=str(tmp_path / "x"))
    wide = tmp_path / "wide-base"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    with pytest.raises(ExportError, match=r"was tuned from .*merge-base.*, not .*wide-base"):
        run(method="ties", base=str(wide), models=[str(p) for p in two_loras], output=str(tmp_path / "x"))
    import shutil

    relabelled = tmp_path / "relabelled"  # an adapter that claims the wide base: the shapes give it away
    shutil.copytree(two_loras[0], relabelled)
    meta = json.loads((relabelled / "tunesmith_method.json").read_text())
    (relabelled / "tunesmith_method.json").write_text(json.dumps({**meta, "base_model_name_or_path": str(wide)}))
    with pytest.raises(ExportError, match=r"merge.models\[0\] .*`model.layers.0.self_attn.q_proj` is 32->32 in the "
                                          r"base but the adapter is for 64->64: is it for another base model\?"):
        run(method="ties", models=[str(relabelled)], output=str(tmp_path / "x"))
    prefix = tmp_path / "prefix"
    from tunesmith.export.tuned import save_tuned
    from tunesmith.methods import attach, build_method
    from tunesmith.methods.options import method_from_dict
    from tunesmith.models.load import load_model

    model, _ = load_model(str(lively_dir))
    method = build_method(method_from_dict("prefix", {"length": 2}))
    attach(model, method)
    save_tuned(model, method, str(lively_dir), prefix)
    with pytest.raises(ExportError, match="`prefix` adapter does not fold into the weights"):
        run(method="ties", models=[str(two_loras[0]), str(prefix)], output=str(tmp_path / "x"))
    with pytest.raises(ExportError, match=r"merge.models\[0\] .*not an adapter folder"):
        run(method="ties", models=[str(tmp_path / "nothing")], output=str(tmp_path / "x"))
    with pytest.raises(RecipeError, match="slerp merges exactly two models"):
        spec(method="slerp", models=["a", "b", "c"])
    with pytest.raises(RecipeError, match=r"merge.density: must be in \(0, 1\], got 1.5"):
        spec(method="ties", models=["a"], density=1.5)
    with pytest.raises(ExportError, match="merge.space: merging A's and B's needs one rank"):
        small = make_lora(lively_dir, tmp_path / "small", seed=3, rank=2)
        run(method="ties", space="adapter", models=[str(two_loras[0]), str(small)], output=str(tmp_path / "x"))


def test_cli_runs_a_recipe_with_overrides_and_reports_mistakes_by_file_and_field(lively_dir, two_loras, tmp_path,
                                                                                 capsys):
    from tunesmith.cli import main

    recipe = tmp_path / "m.yaml"
    recipe.write_text(f"merge:\n  method: ties\n  models:\n    - {{path: {two_loras[0]}, weight: 1.0}}\n"
                      f"    - {{path: {two_loras[1]}, weight: 1.0}}\n  density: 0.5\n  output: {tmp_path / 'cli'}\n")
    assert main(["merge", str(recipe), "space=adapter", "merge.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "ties (density 0.5, λ 1)" in out and str(two_loras[0]) in out and str(two_loras[1]) in out
    assert (tmp_path / "cli" / "tunesmith_method.json").is_file()
    assert main(["merge", str(recipe), "density=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tunesmith: error: {recipe}: merge.density: must be in (0, 1], got 2"
    assert main(["merge", str(recipe), "merge.metod=ties"]) == 2
    assert "unknown recipe key `merge.metod`; did you mean `method`?" in capsys.readouterr().err


def test_shipped_recipe_reads():
    from pathlib import Path

    import yaml

    from tunesmith.export.merge import read_merge_recipe

    path = Path(__file__).parent.parent / "recipes" / "merge" / "ties.yaml"
    spec_ = read_merge_recipe(yaml.safe_load(path.read_text()), where=str(path))
    assert spec_.method == "ties" and len(spec_.models) == 2 and 0 < spec_.density <= 1


def test_a_concatenation_too_wide_for_one_lora_becomes_a_full_model(lively_dir, tmp_path):
    """k_proj is 64 -> 32 here: two rank-20 LoRAs concatenate to rank 40 > 32, which no LoRA holds."""
    from tunesmith.export.atomic import ExportError

    a = make_lora(lively_dir, tmp_path / "a", seed=3, rank=20, alpha=20.0)
    b = make_lora(lively_dir, tmp_path / "b", seed=4, rank=20, alpha=20.0)
    result = run(method="linear", models=[str(a), str(b)], output=str(tmp_path / "o"))
    assert result.kind == "model"
    ours, da, db = model_deltas(lively_dir, result.output), adapter_deltas(lively_dir, a), adapter_deltas(lively_dir, b)
    assert all(torch.allclose(ours[n], (da[n] + db[n]) / 2, atol=1e-6) for n in da)
    with pytest.raises(ExportError, match=r"merge.space: the concatenated rank 40 exceeds min\(in, out\) = 32"):
        run(method="linear", space="adapter", models=[str(a), str(b)], output=str(tmp_path / "x"))


def test_trim_keeps_exactly_k_with_tied_magnitudes_and_matches_topk():
    t = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 2.0])
    got = merging.trim(t, 0.5)  # k = 3: the 2.0 and the first two of the four tied 1.0s
    assert torch.equal(got, torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 2.0]))
    assert torch.equal(merging.trim(t, 0.1), torch.zeros(6))  # k = 0
    x = torch.randn(37, 53, generator=torch.Generator().manual_seed(0))
    for density in (0.01, 0.2, 0.5, 0.99):
        k = int(density * x.numel())
        top = torch.zeros(x.numel())
        top[torch.topk(x.abs().flatten(), k).indices] = 1
        assert torch.equal(merging.trim(x, density), x * top.view(x.shape))


def test_a_dora_adapter_merges_through_its_folded_weights(lively_dir, two_loras, tmp_path):
    """DoRA is not additive in B·A: its task vector is the folded model minus the base, so the merge
    is a full model; with one other LoRA, weights − base = 0.5·τ_dora + 0.5·ΔW_lora."""
    from tunesmith.infer.generate import load_for_inference
    from tunesmith.models.load import load_model

    dora = make_lora(lively_dir, tmp_path / "dora", seed=7, dora=True)
    result = run(method="linear", models=[str(dora), str(two_loras[0])], output=str(tmp_path / "o"))
    assert result.kind == "model" and "dora" not in result.summary.split(" of ")[0]
    folded, _ = load_for_inference(str(lively_dir), str(dora))
    base, _ = load_model(str(lively_dir))
    merged, _ = load_model(str(result.output))
    dl = adapter_deltas(lively_dir, two_loras[0])
    b, f = dict(base.named_parameters()), dict(folded.named_parameters())
    for n, p in merged.named_parameters():
        lora = dl.get(n.removesuffix(".weight"), torch.zeros_like(p)) if n.endswith(".weight") else 0
        assert torch.allclose(p, b[n] + 0.5 * (f[n] - b[n]) + 0.5 * lora, atol=1e-6), n

"""Domain-expert MoE with enforced routing (methods.md §15): upcycled == dense at init, exactly; a
row reaches only its domain's expert; token-wise routing; save -> reload gives the same vectors;
mnr_plus against its formula."""
import copy

import pytest
import torch

from tests.conftest import make_tiny_model
from tunesmith.methods import attach, build_method
from tunesmith.methods.base import MethodError
from tunesmith.models.moe import MoEError, MoEMLP, dispatch, moe_modules, routing, upcycle
from tunesmith.recipe import method_from_dict


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


IDS = torch.randint(5, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(IDS)
MASK[1, 6:] = 0


def bert_out(model, route=None):
    with torch.no_grad(), routing(model, route):
        return model(input_ids=IDS, attention_mask=MASK).last_hidden_state


def llama_out(model, route=None):
    with torch.no_grad(), routing(model, route):
        return model(IDS, attention_mask=MASK).logits


def perturb_expert(model, k, std=0.2):
    g = torch.Generator().manual_seed(11 + k)
    with torch.no_grad():
        for m in moe_modules(model):
            for p in m.expert(k).parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_upcycled_at_init_equals_dense_exactly(tokenizer, kind):
    model = tiny_bert() if kind == "bert" else make_tiny_model(tokenizer)
    out = bert_out if kind == "bert" else llama_out
    dense = out(model)
    keys = set(model.state_dict())
    upcycle(model, experts=3)
    assert keys <= set(model.state_dict()), "expert 0 keeps the dense checkpoint keys"
    assert any(".experts.2." in k for k in model.state_dict())
    assert torch.equal(out(model), dense)  # unrouted: expert 0, the dense MLP itself
    assert torch.equal(out(model, torch.tensor([2, 2, 2, 2])), dense)  # one expert, a copy: bit-identical
    # several experts: the same math on row subsets (matmul blocking may round the last bit differently)
    torch.testing.assert_close(out(model, torch.tensor([0, 1, 2, 1])), dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_row_reaches_only_its_domain_expert(tokenizer, kind):
    model = tiny_bert() if kind == "bert" else make_tiny_model(tokenizer)
    out = bert_out if kind == "bert" else llama_out
    upcycle(model, experts=3)
    route = torch.tensor([0, 2, 1, 2])
    before = out(model, route)
    perturb_expert(model, 2)
    after = out(model, route)
    changed = (after - before).flatten(1).abs().amax(1) > 1e-4
    assert changed.tolist() == [False, True, False, True]


def test_routed_bert_equals_the_dense_model_of_that_expert():
    """Row b of the MoE model == the dense model whose MLPs are expert route[b]'s (BERT splits the MLP
    over two MoE modules; both must follow one route)."""
    model = tiny_bert()
    dense = copy.deepcopy(model)
    upcycle(model, experts=2)
    perturb_expert(model, 1)
    route = torch.tensor([1, 0, 1, 1])
    mixed = bert_out(model, route)
    for k in (0, 1):
        ref = copy.deepcopy(dense)
        with torch.no_grad():
            for layer, m in zip(ref.encoder.layer, model.encoder.layer):
                layer.intermediate.dense.load_state_dict(m.intermediate.expert(k).dense.state_dict())
                layer.output.dense.load_state_dict(m.output.dense.expert(k).state_dict())
        want = bert_out(ref)
        rows = route == k
        torch.testing.assert_close(mixed[rows], want[rows], atol=1e-5, rtol=1e-5)
        assert (mixed[~rows] - want[~rows]).abs().max() > 1e-3


def test_token_wise_routing_sends_each_token_to_its_expert():
    torch.manual_seed(0)
    experts = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)) for _ in range(3)]
    layer = MoEMLP(experts)
    x = torch.randn(2, 5, 8)
    ids = torch.tensor([[0, 1, 2, 1, 0], [2, 2, 0, 1, 1]])
    layer.route = ids
    got = layer(x)
    for b in range(2):
        for t in range(5):
            torch.testing.assert_close(got[b, t], experts[ids[b, t]](x[b, t]))
    # a whole model routed token-wise: changing expert 1 moves exactly the rows that hold an expert-1 token
    bert = tiny_bert()
    upcycle(bert, experts=3)
    token_ids = torch.zeros_like(IDS)
    token_ids[2, 4] = 1
    before = bert_out(bert, token_ids)
    perturb_expert(bert, 1)
    after = bert_out(bert, token_ids)
    changed = (after - before).abs().amax(-1) > 1e-4  # (B, T)
    assert changed[2].all() and not changed[[0, 1, 3]].any()  # attention spreads the change within row 2 only


def test_gradients_reach_only_the_experts_used():
    model = tiny_bert()
    upcycle(model, experts=3)
    with routing(model, torch.tensor([0, 2, 0, 2])):
        model(input_ids=IDS, attention_mask=MASK).last_hidden_state.sum().backward()
    m = model.encoder.layer[0].intermediate
    assert m.expert(0).dense.weight.grad is not None and m.expert(2).dense.weight.grad is not None
    assert m.expert(1).dense.weight.grad is None


def test_bad_routing_is_a_clear_error(tokenizer):
    model = make_tiny_model(tokenizer)
    upcycle(model, experts=2, layers=[1])
    assert len(moe_modules(model)) == 1 and isinstance(model.model.layers[1].mlp, MoEMLP)
    with pytest.raises(MoEError, match="out of range"):
        llama_out(model, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(MoEError, match="one id per row"):
        llama_out(model, torch.tensor([0, 1]))
    with pytest.raises(MoEError, match="not a layer"):
        upcycle(make_tiny_model(tokenizer), experts=2, layers=[5])
    with pytest.raises(MoEError, match="already upcycled"):
        upcycle(model, experts=2, layers=[1])
    with pytest.raises(MethodError, match="not a layer"):
        attach(make_tiny_model(tokenizer), build_method(method_from_dict("moe", {"layers": [7]})))


def test_dispatch_does_one_dense_pass_of_work():
    """Grouped by expert: each token is computed once (the sum of rows over experts is n)."""
    seen = []

    class Count(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x * 2

    ids = torch.tensor([2, 0, 2, 1, 0, 2])
    x = torch.arange(6.0)[:, None]
    out = dispatch(x, ids, lambda k: Count(), 3)
    assert sum(seen) == 6 and sorted(seen) == [1, 2, 3]
    assert torch.equal(out, x * 2)


def test_method_trains_experts_and_reloads_with_the_same_vectors(tmp_path):
    from tunesmith.export.tuned import load_tuned, save_tuned

    model = tiny_bert()
    cfg = method_from_dict("moe", {"experts": 2, "layers": [1]})
    method = build_method(cfg)
    trained = attach(model, method)
    assert trained and all(".layer.1." in n and ("intermediate" in n or "output.dense" in n) for n in trained)
    perturb_expert(model, 1)
    route = torch.tensor([1, 0, 1, 0])
    expected = bert_out(model, route)
    save_tuned(model, method, "tiny-bert", tmp_path / "adapter")
    fresh = tiny_bert()
    base = bert_out(fresh, None)
    loaded, saved_cfg = load_tuned(fresh, tmp_path)
    assert saved_cfg.moe.layers == [1] and isinstance(fresh.encoder.layer[1].intermediate, MoEMLP)
    got = bert_out(fresh, route)
    assert torch.equal(got, expected)
    assert (got - base).abs().max() > 1e-3
    # a text without a domain (-1) runs through expert 0
    torch.testing.assert_close(bert_out(fresh, torch.tensor([-1, 0, -1, 0])), bert_out(fresh, torch.tensor([0, 0, 0, 0])))


def test_train_all_trains_the_shared_weights_too():
    model = tiny_bert()
    attach(model, build_method(method_from_dict("moe", {"experts": 2, "train": "all"})))
    assert all(p.requires_grad for p in model.parameters())


def test_int_route_sends_everything_to_one_expert():
    model = tiny_bert()
    upcycle(model, experts=3)
    perturb_expert(model, 2)
    torch.testing.assert_close(bert_out(model, 2), bert_out(model, torch.tensor([2, 2, 2, 2])))
    assert (bert_out(model, 2) - bert_out(model, 0)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# end to end: domain-tagged pairs route each text to its domain's expert


FRUITS = ["apple", "pear", "plum", "cherry", "mango", "grape", "lemon", "melon"]
PLACES = ["river", "castle", "desert", "forest", "harbour", "valley", "island", "canyon"]


def write_domain_pairs(path):
    import json

    rows = [{"query": f"tell me about the {w}", "positive": f"the {w} is described here", "domain": d}
            for d, words in (("fruit", FRUITS), ("place", PLACES)) for w in words]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_contrastive_run_trains_each_domain_expert_and_reloads(tmp_path, tiny_bert_dir):
    import json

    from tunesmith.infer.embed import load_embedder
    from tunesmith.models.embedding import embed_texts
    from tunesmith.recipe import load_recipe
    from tunesmith.train.loop import train

    recipe = load_recipe(None, [
        f"model.name={tiny_bert_dir}", f"data.train={write_domain_pairs(tmp_path / 'pairs.jsonl')}",
        "objective.name=contrastive", "method.name=moe", "method.moe.experts=2", "method.moe.layers=[1]",
        f"output_dir={tmp_path / 'runs'}", "name=m", "train.steps=6", "train.batch_size=8", "train.precision=fp32",
        "train.lr=5e-3", "train.warmup=0", "data.val_fraction=0", "objective.contrastive.max_length=16"])
    result = train(recipe)
    assert result.status == "completed" and result.output.name == "adapter"
    assert json.loads((result.output / "tunesmith_domains.json").read_text()) == ["fruit", "place"]
    model, tokenizer, spec = load_embedder(str(result.run_dir))
    layer = model.encoder.layer[1].intermediate
    assert isinstance(layer, MoEMLP) and not isinstance(model.encoder.layer[0].intermediate, MoEMLP)
    base = tiny_bert_dir_model(tiny_bert_dir).encoder.layer[1].intermediate.dense.weight
    for k in (0, 1):  # each expert trained on its own domain's texts: both moved, differently
        assert (layer.expert(k).dense.weight - base).abs().max() > 1e-4
    assert (layer.expert(0).dense.weight - layer.expert(1).dense.weight).abs().max() > 1e-4
    texts = ["tell me about the apple", "the canyon is described here"]
    with routing(model, 0):
        fruit = embed_texts(model, tokenizer, texts, spec)
    with routing(model, 1):
        place = embed_texts(model, tokenizer, texts, spec)
    assert (fruit - place).abs().max() > 1e-4
    assert model.tunesmith_domains == ["fruit", "place"]
    # the command line: --domain NAME runs every text through that domain's expert
    import numpy as np

    from tunesmith.cli import main

    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    for name, want in (("place", place), ("fruit", fruit)):
        out = tmp_path / f"{name}.npy"
        assert main(["embed", "--model", str(result.run_dir), "--input", str(tmp_path / "texts.txt"),
                     "--output", str(out), "--domain", name]) == 0
        torch.testing.assert_close(torch.from_numpy(np.load(out)), want, atol=1e-5, rtol=1e-5)
    assert main(["embed", "--model", str(result.run_dir), "--input", str(tmp_path / "texts.txt"),
                 "--output", str(tmp_path / "x.npy"), "--domain", "sea"]) == 2
    assert not (tmp_path / "x.npy").exists()


def tiny_bert_dir_model(folder):
    from transformers import BertModel

    return BertModel.from_pretrained(str(folder))


def test_embed_routed_embeds_each_text_with_its_domain_expert(tokenizer):
    from tunesmith.models.embedding import EmbeddingSpec, embed_texts
    from tunesmith.models.moe import embed_routed

    model = make_tiny_model(tokenizer)
    upcycle(model, experts=3)
    perturb_expert(model, 1)
    perturb_expert(model, 2)
    spec = EmbeddingSpec()
    texts = ["a short one", "a somewhat longer text here", "mid text", "x", "the last of them"]
    domains = [2, 0, 1, 2, -1]
    got = embed_routed(model, tokenizer, texts, domains, spec, batch_size=2)
    for i, (t, d) in enumerate(zip(texts, domains)):
        with routing(model, max(d, 0)):
            torch.testing.assert_close(got[i], embed_texts(model, tokenizer, [t], spec)[0], atol=1e-5, rtol=1e-5)
    assert (got[0] - embed_texts(model, tokenizer, texts[:1], spec)[0]).abs().max() > 1e-4  # not expert 0

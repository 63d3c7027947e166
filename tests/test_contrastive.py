"""The contrastive objective: InfoNCE against a hand-written formula and against
sentence-transformers' MultipleNegativesRankingLoss, GradCache == the plain batch's gradients,
negatives gathered across processes, and `tunesmith train` end to end on a tiny decoder and a tiny
BERT whose saved folders reload with the same vectors."""
import json
import math

import pytest
import torch

from tests.conftest import make_tiny_model, train_losses
from tunesmith.data import collate
from tunesmith.data.pairs import PairRecord, tokenize_items
from tunesmith.objectives.contrastive import Contrastive, ContrastiveConfig, info_nce
from tunesmith.recipe import load_recipe
from tunesmith.train.loop import train
from tunesmith.train.metrics import read_metrics

WORDS = ["apple", "river", "castle", "violin", "desert", "falcon", "copper", "tulip", "glacier", "lantern",
         "harbor", "meadow", "comet", "pepper", "saddle", "walnut"]


def reference_loss(q, p, negatives, tau, symmetric=False):
    """InfoNCE written out one query at a time (cosine similarities)."""
    cos = torch.nn.functional.cosine_similarity
    docs = list(p) + list(negatives)
    out = []
    for i in range(len(q)):
        scores = torch.stack([cos(q[i], d, dim=0) for d in docs]) / tau
        forward = -(scores[i] - torch.logsumexp(scores, 0))
        if symmetric:
            back = torch.stack([cos(p[i], x, dim=0) for x in q]) / tau
            forward = 0.5 * (forward - (back[i] - torch.logsumexp(back, 0)))
        out.append(forward)
    return torch.stack(out)


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_formula_and_sentence_transformers(symmetric):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    g = torch.Generator().manual_seed(0)
    q, p, n1, n2 = (torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(4))
    negatives = torch.cat([n1, n2])
    losses, correct = info_nce(q, p, negatives, temperature=0.05, symmetric=symmetric)
    torch.testing.assert_close(losses, reference_loss(q, p, negatives, 0.05, symmetric), rtol=1e-9, atol=1e-9)
    options = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"} if symmetric else {}
    st = MultipleNegativesRankingLoss(None, scale=20.0, **options).compute_loss_from_embeddings([q, p, n1, n2], None)
    assert abs(float(losses.mean()) - float(st)) < 1e-6
    # the plain and the symmetric loss are different numbers
    other = info_nce(q, p, negatives, temperature=0.05, symmetric=not symmetric)[0]
    assert (other - losses).abs().max() > 1e-3


def test_hard_negatives_are_counted_and_accuracy_ranks_the_positive():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 8, generator=g, dtype=torch.float64)
    p = q + 0.01 * torch.randn(4, 8, generator=g, dtype=torch.float64)  # every positive is its query's nearest
    none = torch.zeros(0, 8, dtype=torch.float64)
    base, correct = info_nce(q, p, none, temperature=0.05)
    assert bool(correct.all())
    hard = torch.cat([q[:1] + 0.001 * torch.randn(1, 8, generator=g, dtype=torch.float64)])  # nearer q0 than p0
    with_hard, correct = info_nce(q, p, hard, temperature=0.05)
    torch.testing.assert_close(with_hard, reference_loss(q, p, hard, 0.05))
    assert float(with_hard[0]) > float(base[0]) + 0.1  # a hard negative raises its query's loss ...
    assert not bool(correct[0]) and bool(correct[1:].all())  # ... and outranks its positive
    assert bool((with_hard[1:] > base[1:]).all())  # every query competes with every hard negative


def toy_items(tokenizer, n=8, negatives=True):
    records = [PairRecord(f"toy:{i}", f"tell me about the {w}", f"the {w} is described here",
                          [f"the {WORDS[(i + 1) % len(WORDS)]} again"] * (i % 3 if negatives else 0), None)
               for i, w in enumerate(WORDS[:n])]
    return tokenize_items(records, tokenizer, [], max_length=32)[0]


def objective_grads(model, tokenizer, items, cfg, seed=1):
    obj = Contrastive(cfg)
    obj.ready(model)
    batch = obj.finish(items, collate(obj.rows(items), packing=False, pad_id=tokenizer.pad_token_id))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, n, metrics = obj(model, batch)
    (loss * 0.25).backward()  # the harness scales the sum; the cached backward must carry the scale
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), n, metrics, grads


@pytest.mark.parametrize("symmetric,projector", [(False, False), (True, True)])
def test_gradcache_equals_plain_batch_gradients(tokenizer, symmetric, projector):
    items = toy_items(tokenizer)
    runs = []
    for chunk in (0, 3):
        model = make_tiny_model(tokenizer).train()
        cfg = ContrastiveConfig(cache_chunk=chunk, symmetric=symmetric, projector=projector, pooling="mean")
        runs.append(objective_grads(model, tokenizer, items, cfg))
    (l0, n0, m0, g0), (l1, n1, m1, g1) = runs
    assert n0 == n1 == len(items) and m0 == m1
    assert math.isclose(l0, l1, rel_tol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == sum(1 for p in model.parameters() if p.requires_grad)
    for k in g0:
        scale = float(g0[k].abs().max())
        assert scale > 0, k
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5 * scale, rtol=1e-5)


def test_gradcache_replays_dropout(tokenizer):
    """With dropout on, the replay draws the first pass's masks: one chunk of all texts gives the plain
    gradient exactly (a replay with fresh masks would not), and dropout does change the gradient."""
    items = toy_items(tokenizer)

    def run(chunk, dropout):
        model = make_tiny_model(tokenizer).train()
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = dropout
        return objective_grads(model, tokenizer, items, ContrastiveConfig(cache_chunk=chunk))[3]

    plain, cached, still = run(0, 0.3), run(1000, 0.3), run(0, 0.0)
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], atol=1e-6, rtol=1e-5)
    assert max(float((plain[k] - still[k]).abs().max()) for k in plain) > 1e-4


def test_minilm_loss_and_gradients_match_sentence_transformers(tokenizer):
    """The packaged MiniLM: tunesmith's loss and gradients on a batch == sentence-transformers' own
    MultipleNegativesRankingLoss on the same model and texts (its tokenizer, pooling, normalisation)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from tunesmith.infer.embed import st_pooling
    from tunesmith.models.embedding import ENCODER_NAME, encoder_folder, load_any

    queries = ["what is a cat", "river in egypt", "fast car brands", "how to bake bread"]
    positives = ["cats are small pets", "the nile flows north", "ferrari and porsche", "flour, water and yeast"]
    negatives = ["dogs bark", "the amazon is long", "bicycles", "cake recipes"]
    st = SentenceTransformer(str(encoder_folder()), device="cpu").eval()  # eval: no dropout on either side
    st_loss = MultipleNegativesRankingLoss(st)([st.preprocess(x) for x in (queries, positives, negatives)], None)
    st_loss.backward()
    expected = {n: p.grad for n, p in st[0].auto_model.named_parameters() if p.grad is not None}

    model, tok = load_any(ENCODER_NAME)
    spec = st_pooling(encoder_folder())
    cfg = ContrastiveConfig(pooling=spec.pooling, normalize=spec.normalize, max_length=spec.max_length)
    records = [PairRecord("x", q, p, [n], None) for q, p, n in zip(queries, positives, negatives)]
    items = tokenize_items(records, tok, [], max_length=cfg.max_length)[0]
    obj = Contrastive(cfg)
    obj.ready(model)
    batch = obj.finish(items, collate(obj.rows(items), packing=False, pad_id=tok.pad_token_id))
    loss, n, _ = obj(model.eval(), batch)
    (loss / n).backward()
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert abs(float(loss.detach()) / n - float(st_loss.detach())) < 1e-6
    assert got.keys() == expected.keys() and len(got) > 90
    scale = max(float(g.abs().max()) for g in expected.values())
    for k in got:  # (key biases get a gradient that is 0 in exact arithmetic: compared on the global scale)
        torch.testing.assert_close(got[k], expected[k], atol=1e-5 * scale, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# end to end


def write_pairs(path, n=16):
    rows = [{"query": f"tell me about the {w}", "positive": f"the {w} is described here",
             "negative": f"the {WORDS[(i + 3) % len(WORDS)]} is described here"} for i, w in enumerate(WORDS[:n])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TEXTS = ["tell me about the apple", "the river is described here", "castle", "a longer text about a violin"]


@pytest.mark.parametrize("kind,method,extra", [
    ("decoder", "lora", ["objective.contrastive.bidirectional=true", "objective.contrastive.pooling=last"]),
    ("decoder", "full", ["objective.contrastive.projector=true", "objective.contrastive.cache_chunk=8"]),
    ("bert", "lora", ["data.val_fraction=0.25", "train.eval_every=6"]),
    ("bert", "full", ["objective.contrastive.symmetric=true", "objective.contrastive.projector=true"]),
])
def test_train_end_to_end_and_reload(tmp_path, tiny_model_dir, tiny_bert_dir, kind, method, extra):
    from tunesmith.infer.embed import load_embedder
    from tunesmith.models.embedding import embed_texts

    folder = tiny_model_dir if kind == "decoder" else tiny_bert_dir
    recipe = load_recipe(None, [
        f"model.name={folder}", f"data.train={write_pairs(tmp_path / 'pairs.jsonl')}", "objective.name=contrastive",
        f"method.name={method}", f"output_dir={tmp_path / 'runs'}", "name=e", "train.steps=12", "train.batch_size=8",
        "train.precision=fp32", "train.lr=5e-3", "train.warmup=0", "train.schedule=constant",
        "objective.contrastive.max_length=24", *extra])
    result = train(recipe)
    assert result.status == "completed"
    resolved = load_recipe(result.run_dir / "recipe.yaml")
    assert resolved.data.packing is False and resolved.model.attention == "sdpa"
    losses = train_losses(result.run_dir)
    assert len(losses) == 12
    if resolved.data.val_fraction:
        val = [r["val_loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "val_loss" in r]
        assert len(val) == 2 and val[1] < val[0]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses  # learnable: the loss falls
    assert (result.output / "tunesmith_embedding.json").is_file()

    model, tokenizer, spec = load_embedder(str(result.run_dir))
    assert spec.bidirectional == resolved.objective.contrastive.bidirectional
    assert spec.pooling == resolved.objective.contrastive.pooling
    has_projector = getattr(model, "tunesmith_projector", None) is not None  # load_embedder attached it
    assert has_projector == resolved.objective.contrastive.projector
    again = embed_texts(model, tokenizer, TEXTS, spec, kind="query")
    # the same vectors as the model the run ended with: its last checkpoint, loaded the way resume does
    trained = trained_vectors(resolved, tokenizer, spec)
    torch.testing.assert_close(again, trained, atol=2e-5, rtol=1e-4)
    base, base_tok, base_spec = load_embedder(str(folder))
    assert (embed_texts(base, base_tok, TEXTS, spec, kind="query") - again).abs().max() > 1e-3


def trained_vectors(recipe, tokenizer, spec):
    """Vectors of the run's final weights rebuilt from its last checkpoint (the harness's own path)."""
    from tunesmith.models.embedding import embed_texts
    from tunesmith.objectives import build_objective
    from tunesmith.train import checkpoint as ckpt
    from tunesmith.train.optim import build_optimizer, build_scheduler
    from tunesmith.train.prepare import prepare_model

    model, _, method = prepare_model(recipe, None, tokenizer)
    build_objective(recipe, model)
    opt = build_optimizer(model, recipe.train, method)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(recipe.run_dir), model, opt, build_scheduler(opt, recipe.train, 12),
                         method=method)
    return embed_texts(model, tokenizer, TEXTS, spec, kind="query")


def test_grad_accum_adds_micro_batches_not_negatives(tmp_path, tiny_model_dir):
    """A micro-batch is `train.batch_size` whole items in padded rows, queries first."""
    recipe = load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={write_pairs(tmp_path / 'p.jsonl')}",
                                "objective.name=contrastive", "train.batch_size=4", "train.grad_accum=2"])
    from tunesmith.models.load import load_tokenizer
    from tunesmith.train.batches import MicroBatches

    tokenizer = load_tokenizer(str(tiny_model_dir))
    splits = Contrastive.load(recipe, tokenizer)
    stream = MicroBatches(splits.train, Contrastive(recipe.objective.contrastive), recipe.data, recipe.train, 0,
                          tokenizer.pad_token_id)
    batch, _ = stream.get(0)
    assert batch["n_queries"] == 4 and batch["input_ids"].shape[0] == 4 * 3  # query, positive, one negative each
    assert batch["owner"].tolist() == [0, 1, 2, 3] * 3 and len(stream.plan(0)) == 4
    assert torch.equal(batch["attention_mask"], (batch["segment_ids"] > 0).long())


def test_cli_trains_the_packaged_encoder_name_resolves(tmp_path):
    """`model.name=all-minilm-l6-v2` loads the packaged MiniLM (tokenizer and model) for training."""
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.embedding import model_folder
    from tunesmith.train.prepare import prepare_model

    recipe = load_recipe(None, ["model.name=all-minilm-l6-v2", "objective.name=contrastive", "method.name=lora",
                                "model.attention=sdpa"])
    tokenizer = load_tokenizer(str(model_folder(recipe.model.name)))
    model, _, method = prepare_model(recipe, None, tokenizer)
    assert type(model).__name__ == "BertModel"
    assert any(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------
# several processes


@pytest.mark.parametrize("cache_chunk", [0, 4])
def test_two_processes_gather_negatives_and_equal_one(tmp_path, tiny_model_dir, cache_chunk):
    """DDP, 2 × 4 queries (plain, or with GradCache) == 1 process × 8 queries: the all-gather gives
    every query the other rank's documents, and gradients flow back across ranks. Same losses, same
    weights (with each rank's own negatives only, the losses would differ)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).parent.parent
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = [f"model.name={tiny_model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'runs'}",
              "data.shuffle=false", "train.steps=3", "train.precision=fp32", "train.lr=1e-3", "train.warmup=0",
              "train.threads=1", "method.lora.dropout=0", "objective.contrastive.symmetric=true",
              "objective.contrastive.max_length=24"]
    one = train(load_recipe(root / "recipes" / "contrastive.yaml", [*common, "name=one", "train.batch_size=8"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tunesmith",
           "train", str(root / "recipes" / "contrastive.yaml"), *common, "name=two", "train.batch_size=4",
           "train.strategy=ddp", f"objective.contrastive.cache_chunk={cache_chunk}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    two = tmp_path / "runs" / "two"
    a, b = train_losses(one.run_dir), train_losses(two)
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, abs=1e-5)
    wa = load_file(one.run_dir / "checkpoints" / "step-3" / "trainable.safetensors")
    wb = load_file(two / "checkpoints" / "step-3" / "trainable.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:  # (Adam turns an entry's tiny gradient into a whole step: float noise shows there first)
        torch.testing.assert_close(wa[k], wb[k], atol=5e-5, rtol=1e-4)


def test_batches_are_random_draws_not_grouped_by_length(tmp_path, tiny_model_dir):
    """Padded SFT batches are grouped by length; contrastive batches are not (in-batch negatives are a
    random sample, as sentence-transformers draws them)."""
    from tunesmith.models.load import load_tokenizer
    from tunesmith.train.batches import MicroBatches

    rows = [{"query": "q " * (1 + i % 5), "positive": f"the {w} " * (1 + i % 7)} for i, w in enumerate(WORDS)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={path}", "objective.name=contrastive",
                                "train.batch_size=4"])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    items = Contrastive.load(recipe, tokenizer).train
    obj = Contrastive(recipe.objective.contrastive)
    plan = MicroBatches(items, obj, recipe.data, recipe.train, 0, tokenizer.pad_token_id).plan(0)

    class ByLength(Contrastive):
        group_by_length = True

    grouped = MicroBatches(items, ByLength(recipe.objective.contrastive), recipe.data, recipe.train, 0,
                           tokenizer.pad_token_id).plan(0)
    assert sorted(i for b in plan for i in b) == list(range(len(items)))
    spread = lambda p: sum(max(obj.length(items[i]) for i in b) - min(obj.length(items[i]) for i in b) for b in p)
    assert spread(grouped) < spread(plan)  # grouping by length would have made tight batches


def test_resume_continues_on_the_same_curve_with_the_projector(tmp_path, tiny_bert_dir):
    """The projector is part of every checkpoint: a run stopped after step 2 and resumed ends where an
    uninterrupted run ends."""
    from tunesmith.train.loop import stopping_after

    data = write_pairs(tmp_path / "pairs.jsonl")

    def recipe(name, *extra):
        return load_recipe(None, [f"model.name={tiny_bert_dir}", f"data.train={data}", "objective.name=contrastive",
                                  f"output_dir={tmp_path / 'runs'}", f"name={name}", "train.steps=4",
                                  "train.batch_size=8", "train.precision=fp32", "train.lr=5e-3", "train.warmup=0",
                                  "train.save_every=2", "objective.contrastive.projector=true", *extra])

    whole = train(recipe("whole"))
    with stopping_after(2):
        assert train(recipe("cut")).status == "interrupted"
    train(recipe("cut", "resume=true"))
    assert train_losses(whole.run_dir) == pytest.approx(train_losses(tmp_path / "runs" / "cut"), abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(whole.run_dir / "adapter" / "tunesmith_projector.safetensors")
    b = load_file(tmp_path / "runs" / "cut" / "adapter" / "tunesmith_projector.safetensors")
    assert a.keys() == b.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for k in a:
        torch.testing.assert_close(a[k], b[k])

"""The encoding path shared by every embedding objective: the bidirectional switch, pooling, the
spec file, and MiniLM against sentence-transformers itself."""
import pytest
import torch

from conftest import make_tiny_model
from tunesmith.models.embedding import (EmbeddingSpec, ModelError, embed, embed_texts, encoder_folder,
                                        hidden_states, pool, tokenize)


def _ids(tokenizer, text):
    return tokenize(tokenizer, [text], 64)


def test_bidirectional_switch_lets_early_tokens_see_later_ones(tokenizer):
    model = make_tiny_model(tokenizer).eval()
    a, b = _ids(tokenizer, "the cat sat on the mat"), _ids(tokenizer, "the cat sat on the rug")
    assert a["input_ids"].shape == b["input_ids"].shape and (a["input_ids"] != b["input_ids"]).sum() == 1
    changed = int((a["input_ids"] != b["input_ids"]).nonzero()[0, 1])
    with torch.no_grad():
        causal_a, causal_b = (hidden_states(model, **x) for x in (a, b))
        bi_a, bi_b = (hidden_states(model, **x, bidirectional=True) for x in (a, b))
    # causal: tokens before the change cannot see it; bidirectional: they do
    assert torch.equal(causal_a[0, :changed], causal_b[0, :changed])
    assert (bi_a[0, :changed] - bi_b[0, :changed]).abs().max() > 1e-4
    # the same weights still generate causally: the LM's logits are untouched by the switch
    with torch.no_grad():
        logits = model(input_ids=a["input_ids"]).logits
        again = model.lm_head(hidden_states(model, **a))
    torch.testing.assert_close(logits, again, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_changes_nothing_in_either_direction(tokenizer, attention):
    model = make_tiny_model(tokenizer).eval()
    model.config._attn_implementation = attention
    texts = ["short", "a much longer text that forces padding on the first one"]
    batch = tokenize(tokenizer, texts, 64)
    alone = tokenize(tokenizer, texts[:1], 64)
    for bidirectional in (False, True):
        spec = EmbeddingSpec(bidirectional=bidirectional, pooling="mean")
        with torch.no_grad():
            both, one = embed(model, batch, spec), embed(model, alone, spec)
        torch.testing.assert_close(both[0], one[0], atol=1e-5, rtol=1e-5)


def test_pooling_modes_on_hand_built_states():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], (hidden[0, 0] + hidden[0, 1]) / 2)
    torch.testing.assert_close(pool(hidden, mask, "last")[0], hidden[0, 1])
    torch.testing.assert_close(pool(hidden, mask, "last")[1], hidden[1, 2])
    torch.testing.assert_close(pool(hidden, mask, "cls")[1], hidden[1, 0])
    torch.testing.assert_close(pool(hidden, mask, "weighted_mean")[1],
                               (1 * hidden[1, 0] + 2 * hidden[1, 1] + 3 * hidden[1, 2]) / 6)
    with pytest.raises(ModelError, match="pooling `max`"):
        pool(hidden, mask, "max")


def test_spec_round_trip_and_bad_file(tmp_path):
    spec = EmbeddingSpec(pooling="last", bidirectional=True, query_prefix="query: ")
    spec.save(tmp_path)
    assert EmbeddingSpec.load(tmp_path) == spec
    (tmp_path / "tunesmith_embedding.json").write_text('{"pooling": "mean", "colour": 1}')
    with pytest.raises(ModelError, match="unknown field `colour`"):
        EmbeddingSpec.load(tmp_path)


def test_embed_texts_keeps_order_and_matches_one_by_one(tokenizer):
    model = make_tiny_model(tokenizer).eval()
    texts = ["b", "a longer one here", "mid length", "x y z w v u t s"]
    spec = EmbeddingSpec(bidirectional=True)
    together = embed_texts(model, tokenizer, texts, spec, batch_size=3)
    for i, t in enumerate(texts):
        torch.testing.assert_close(together[i], embed_texts(model, tokenizer, [t], spec)[0], atol=1e-5, rtol=1e-5)


def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from tunesmith.infer.embed import load_embedder

    model, tokenizer, spec = load_embedder("all-minilm-l6-v2")
    assert spec.pooling == "mean" and spec.normalize
    texts = ["a cat sits on the mat", "stock markets fell sharply on Monday", "x"]
    ours = embed_texts(model, tokenizer, texts, spec)
    theirs = torch.tensor(SentenceTransformer(str(encoder_folder()), device="cpu").encode(texts))
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.99999

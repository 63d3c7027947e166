"""The sentence-transformers export round trip (SentenceTransformer(path).encode == embed_texts,
cosine >= 0.9999) for encoders and decoders, every pooling, both attention directions, a projector
and a merged LoRA; and `tunesmith embed` with its file:line errors."""
import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer  # a test dependency: the round trip must fail, not skip
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

from conftest import lively_model, make_tiny_model
from tunesmith.cli import main
from tunesmith.export import ExportError, save_adapter
from tunesmith.export.sentence_transformers import export_sentence_transformers, projector_layers
from tunesmith.infer.embed import load_embedder, read_texts
from tunesmith.infer.generate import InferError
from tunesmith.methods.lora import LoRA
from tunesmith.models.embedding import EmbeddingSpec, embed_texts, encoder_folder
from tunesmith.recipe import LoraConfig

# different lengths, so every batch pads (right padding is where poolings could disagree)
TEXTS = ["the cat sat on the mat", "x", "stock markets fell sharply on Monday after the report was published",
         "why is the sky blue?", "a b c d e f g h i j k l m n o p q r s t u v w x y z"]


def cosine(a, b) -> torch.Tensor:
    return nn.functional.cosine_similarity(torch.as_tensor(a).float(), torch.as_tensor(b).float())


def round_trip(model, tokenizer, spec, folder, kinds=("query", "document")) -> dict:
    """{kind: (tunesmith vectors, sentence-transformers vectors)} after exporting to `folder`."""
    export_sentence_transformers(model, tokenizer, spec, folder)
    st = SentenceTransformer(str(folder), device="cpu")
    out = {kind: (embed_texts(model, tokenizer, TEXTS, spec, kind=kind, batch_size=2),
                  torch.tensor(st.encode(TEXTS, prompt_name=kind, batch_size=3))) for kind in kinds}
    ours = out[kinds[0]][0]
    assert cosine(ours[:1].expand_as(ours[1:]), ours[1:]).max() < 0.99  # the texts are told apart
    return out


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(str(encoder_folder()))


def tiny_bert(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128,
                        initializer_range=0.5)  # large weights: texts get clearly different vectors
    return BertModel(config).eval()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_tiny_bert_round_trip(bert_tokenizer, tmp_path, pooling):
    model = tiny_bert(bert_tokenizer)
    spec = EmbeddingSpec(pooling=pooling, max_length=12, query_prefix="query: ", document_prefix="passage: ")
    for kind, (ours, theirs) in round_trip(model, bert_tokenizer, spec, tmp_path / "st").items():
        assert cosine(ours, theirs).min() >= 0.9999, kind
    # the prompts are the spec's prefixes: a query is not embedded like the same text as a document
    q, d = (embed_texts(model, bert_tokenizer, TEXTS, spec, kind=k) for k in ("query", "document"))
    assert cosine(q, d).min() < 0.999
    cfg = json.loads((tmp_path / "st" / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {"query": "query: ", "document": "passage: "}
    assert json.loads((tmp_path / "st" / "sentence_bert_config.json").read_text())["max_seq_length"] == 12


def projector(d: int, seed: int = 7) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 48), nn.ReLU(), nn.Linear(48, 16))


@pytest.mark.parametrize("pooling", ["last", "weighted_mean"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_tiny_llama_round_trip_with_projector(tokenizer, tmp_path, pooling, bidirectional):
    model = lively_model(tokenizer)
    model.tunesmith_projector = projector(model.config.hidden_size)
    spec = EmbeddingSpec(pooling=pooling, bidirectional=bidirectional, max_length=24, query_prefix="q: ")
    pairs = round_trip(model, tokenizer, spec, tmp_path / "st")
    for kind, (ours, theirs) in pairs.items():
        assert theirs.shape == (len(TEXTS), 16)
        assert cosine(ours, theirs).min() >= 0.9999, kind
    modules = json.loads((tmp_path / "st" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    # the attention direction is carried, not assumed: the other direction gives other vectors
    other = EmbeddingSpec(pooling=pooling, bidirectional=not bidirectional, max_length=24, query_prefix="q: ")
    assert cosine(embed_texts(model, tokenizer, TEXTS, other), pairs["document"][1]).min() < 0.99


def test_bidirectional_export_needs_new_transformers_and_drops_the_lm_head(tokenizer, tmp_path):
    model = lively_model(tokenizer)
    export_sentence_transformers(model, tokenizer, EmbeddingSpec(bidirectional=True), tmp_path / "st")
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    assert config["is_causal"] is False and config["architectures"] == ["LlamaModel"]
    req = json.loads((tmp_path / "st" / "config_sentence_transformers.json").read_text())["requirements"]
    assert req["transformers"]["specifier"] == ">=5.2"
    assert getattr(model.config, "is_causal", True) is True  # the caller's model keeps generating causally


def test_merged_lora_equals_the_adapter_on_its_base(tokenizer, tiny_model_dir, tmp_path):
    cfg = LoraConfig(rank=4, alpha=8, targets=["all-linear"])
    adapted = make_tiny_model(tokenizer)  # the weights of tiny_model_dir
    LoRA(cfg).apply(adapted)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = save_adapter(adapted, cfg, str(tiny_model_dir), tmp_path / "adapter")
    spec = EmbeddingSpec(pooling="last", bidirectional=True, max_length=32)
    spec.save(folder)

    model, tok, loaded_spec = load_embedder(adapter=str(folder))
    assert loaded_spec == spec
    export_sentence_transformers(model, tok, loaded_spec, tmp_path / "st")
    theirs = torch.tensor(SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(TEXTS))
    assert cosine(embed_texts(adapted.eval(), tokenizer, TEXTS, spec), theirs).min() >= 0.9999
    base = embed_texts(make_tiny_model(tokenizer), tokenizer, TEXTS, spec)
    assert cosine(base, theirs).min() < 0.999  # the adapter is in the export


def test_minilm_exported_and_reloaded(tmp_path):
    model, tokenizer, spec = load_embedder("all-minilm-l6-v2")
    export_sentence_transformers(model, tokenizer, spec, tmp_path / "st")
    ours = embed_texts(model, tokenizer, TEXTS, spec)
    theirs = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(TEXTS)
    shipped = SentenceTransformer(str(encoder_folder()), device="cpu").encode(TEXTS)
    assert cosine(ours, theirs).min() >= 0.9999 and cosine(shipped, theirs).min() >= 0.9999
    # tunesmith reads the exported folder back as the same embedder
    again, tok2, spec2 = load_embedder(str(tmp_path / "st"))
    assert (spec2.pooling, spec2.normalize, spec2.max_length) == ("mean", True, spec.max_length)
    assert cosine(embed_texts(again, tok2, TEXTS, spec2), ours).min() >= 0.9999


def test_projector_forms_and_refusals(tokenizer, tmp_path):
    pairs = projector_layers(projector(64))
    assert [type(a).__name__ for _, a in pairs] == ["ReLU", "Identity"]
    with pytest.raises(ExportError, match="LayerNorm"):
        projector_layers(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    model = make_tiny_model(tokenizer)
    LoRA(LoraConfig(rank=2, alpha=4, targets=["q_proj"])).apply(model)  # not merged
    with pytest.raises(ExportError, match="cannot be merged"):
        export_sentence_transformers(model, tokenizer, EmbeddingSpec(), tmp_path / "st")
    assert not (tmp_path / "st").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to replace"):
        export_sentence_transformers(make_tiny_model(tokenizer), tokenizer, EmbeddingSpec(), tmp_path / "other")


def test_cli_embed_writes_the_vectors_embed_texts_gives(tokenizer, tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)) + "\n")
    out = tmp_path / "out" / "vectors.npy"
    assert main(["embed", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(out),
                 "--kind", "query", "--batch-size", "2"]) == 0
    vectors = np.load(out)
    model, tok, spec = load_embedder(str(tiny_model_dir))
    expected = embed_texts(model, tok, TEXTS, spec, kind="query")
    assert vectors.dtype == np.float32 and vectors.shape == tuple(expected.shape)
    np.testing.assert_allclose(vectors, expected.numpy(), atol=1e-5)
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(TEXTS) + "\n\n")
    assert read_texts(txt) == TEXTS


@pytest.mark.parametrize("body, message", [
    ('{"text": "ok"}\n{"txt": "no"}\n', "texts.jsonl:2: expected a JSON object with `text`"),
    ('{"text": "ok"}\n\n{"text": 3}\n', "texts.jsonl:3: `text` must be a string, got int"),
    ('{"text": "ok"}\nnot json\n', "texts.jsonl:2: not valid JSON"),
])
def test_cli_embed_bad_input_names_file_and_line(tiny_model_dir, tmp_path, capsys, body, message):
    src = tmp_path / "texts.jsonl"
    src.write_text(body)
    assert main(["embed", "--model", str(tiny_model_dir), "--input", str(src), "--output",
                 str(tmp_path / "v.npy")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "v.npy").exists()
    with pytest.raises(InferError, match="input file not found"):
        read_texts(tmp_path / "missing.jsonl")


def test_cli_export_st(tokenizer, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "st"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "st", "--output", str(out)]) == 0
    model, tok, spec = load_embedder(str(tiny_model_dir))
    theirs = SentenceTransformer(str(out), device="cpu").encode(TEXTS)
    assert cosine(embed_texts(model, tok, TEXTS, spec), theirs).min() >= 0.9999
    assert main(["export", "--model", str(tiny_model_dir), "--format", "st", "--quant", "q8_0",
                 "--output", str(out)]) == 2
    assert "--quant is for" in capsys.readouterr().err


def test_sliding_window_longer_than_max_length_only(tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    model = MistralForCausalLM(config).eval()
    with pytest.raises(ExportError, match="sliding window"):
        export_sentence_transformers(model, tokenizer, EmbeddingSpec(bidirectional=True, max_length=16), tmp_path / "a")
    export_sentence_transformers(model, tokenizer, EmbeddingSpec(bidirectional=False, max_length=16), tmp_path / "b")
    export_sentence_transformers(model, tokenizer, EmbeddingSpec(bidirectional=True, max_length=8), tmp_path / "c")
    assert (tmp_path / "c" / "modules.json").is_file() and not (tmp_path / "a").exists()

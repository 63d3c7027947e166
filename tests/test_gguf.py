"""GGUF export: a tiny Llama written as GGUF and read back by transformers' GGUF loader gives the
same logits (f32 exactly, f16/bf16/q8_0 within their rounding), the same tokenizer and chat
template; a GGUF LoRA holds the adapter's factors; bad input is a one-line error. Every weight check
also shows the GGUF differs from the plain HF layout where it must (q/k rows permuted), so a
no-op export cannot pass."""
import gguf
import numpy as np
import peft  # a test dependency (the `test` extra)
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from conftest import make_tiny_model
from tunesmith.cli import main
from tunesmith.export import ExportError, save_adapter
from tunesmith.export.gguf import export_gguf, export_gguf_lora, export_merged_gguf, interleave_rows, rotate_half_rows
from tunesmith.export.gguf_vocab import chatml_system, modelfile_text
from tunesmith.methods.lora import LoRA
from tunesmith.models.load import embedded_gguf
from tunesmith.recipe import LoraConfig

IDS = torch.tensor([[1, 415, 2891, 314, 260, 1345, 30, 2, 9519, 47, 31, 1322]])
TEXTS = ["Hello world!", "  two  spaces\tand a tab\n", "3.14159 and 1234567", "naïve café — 東京 🚀",
         "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x ** 2\n", ""]
CHATS = [[{"role": "user", "content": "What is 2+2?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def greedy(model, n=16):
    with torch.no_grad():
        return model.generate(IDS[:, :6], max_new_tokens=n, do_sample=False, pad_token_id=2)[0, 6:].tolist()


def read_back(path):
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF as float32 in numpy order (out, in)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    """The tiny model (make_tiny_model seed 0, saved in tiny_model_dir) as GGUF at every quant."""
    folder = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(str(tiny_model_dir), folder / f"tiny-{q}.gguf", quant=q, progress=False).path
            for q in ("f32", "f16", "bf16", "q8_0")}


# ---- (a) weights and logits through transformers' GGUF reader

def test_f32_round_trip_is_exact(tokenizer, tiny_gguf):
    ours = make_tiny_model(tokenizer)
    back = read_back(tiny_gguf["f32"])
    assert back.config.tie_word_embeddings and back.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(back), logits(ours), atol=1e-5, rtol=0)
    assert greedy(back) == greedy(ours)


def test_untied_head_and_wide_heads_round_trip(tokenizer, tmp_path):
    """An untied head is written as output.weight; a head_dim other than hidden/heads as key_length."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=48, tie_word_embeddings=False,
                         rope_theta=50000.0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    path = export_gguf(model, tmp_path / "wide.gguf", tokenizer=tokenizer, quant="f32", progress=False).path
    f, t = fields(path), gguf_tensors(path)
    assert f["llama.attention.key_length"] == f["llama.rope.dimension_count"] == 48
    assert torch.equal(torch.from_numpy(t["output.weight"]), model.lm_head.weight.detach())
    back = read_back(path)
    assert not back.config.tie_word_embeddings
    torch.testing.assert_close(logits(back), logits(model), atol=1e-5, rtol=0)


def test_q_and_k_rows_are_interleaved_per_head(tokenizer, tiny_gguf):
    sd = make_tiny_model(tokenizer).state_dict()
    t = gguf_tensors(tiny_gguf["f32"])
    assert "output.weight" not in t, "tied embeddings: llama.cpp reuses token_embd as the head"
    for hf, ours, heads in [("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)]:
        w = sd[f"model.layers.1.self_attn.{hf}.weight"]
        stored = torch.from_numpy(t[f"blk.1.{ours}.weight"])
        assert torch.equal(stored, interleave_rows(w, heads))
        assert not torch.equal(stored, w), "the permutation must change the rows"
        assert torch.equal(rotate_half_rows(stored, heads), w)
    v = sd["model.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(torch.from_numpy(t["blk.1.attn_v.weight"]), v)  # v is not rotated: unchanged


# Measured on the tiny model (logits span -0.75..1.17): max |Δlogit| f16 3.9e-4, bf16 3.4e-3, q8_0 8.5e-3;
# each bound is about 3-5x its measurement.
TOLERANCE = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_reduced_precision_is_close(tokenizer, tiny_gguf, quant):
    ours, back = make_tiny_model(tokenizer), read_back(tiny_gguf[quant])
    diff = (logits(back) - logits(ours)).abs().max().item()
    assert 0 < diff < TOLERANCE[quant], f"{quant}: max |Δlogit| {diff}"
    if quant == "f16":
        assert greedy(back) == greedy(ours)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tiny_gguf[quant]).tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["blk.0.ffn_down.weight"] == kinds["token_embd.weight"] == quant.upper()


def test_metadata(tokenizer, tiny_gguf):
    f = fields(tiny_gguf["q8_0"])
    expect = {"general.architecture": "llama", "general.type": "model", "llama.block_count": 2,
              "llama.context_length": 2048, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.vocab_size": 49152,
              "llama.rope.dimension_count": 16, "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
              "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.bos_token_id": 1,
              "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False}
    assert {k: f.get(k) for k in expect} == expect
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)


# ---- (b), (c) tokenizer and chat template

def test_tokenizer_matches_the_reference_converter(tiny_gguf):
    """The embedded SmolLM2 GGUF was written by llama.cpp's converter: our vocabulary, token types
    and merges for the same tokenizer are identical to its."""
    ref, ours = fields(embedded_gguf()), fields(tiny_gguf["f32"])
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.chat_template"):
        assert ours[key] == ref[key], key


def test_tokenizer_round_trip(tokenizer, tiny_gguf):
    path = tiny_gguf["f16"]
    back = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert back.encode(text) == tokenizer.encode(text), repr(text)
    for chat in CHATS:
        ours = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert back.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == ours
        assert back.encode(ours, add_special_tokens=False) == tokenizer.encode(ours, add_special_tokens=False)
    assert fields(path)["tokenizer.chat_template"] == tokenizer.chat_template


def test_modelfile(tokenizer, tiny_gguf):
    text = tiny_gguf["f16"].with_suffix(".Modelfile").read_text()
    assert text.startswith("FROM ./tiny-f16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "{{ .Content }}<|im_end|>" in text
    ok, system = chatml_system(tokenizer)
    assert ok and system and system in tokenizer.apply_chat_template(CHATS[0], tokenize=False)
    assert f'SYSTEM """{system}"""' in text


def test_modelfile_of_a_non_chatml_template(tokenizer):
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert chatml_system(other) == (False, None)
    text = modelfile_text("x.gguf", other)
    assert not [line for line in text.splitlines() if line.startswith(("TEMPLATE", "SYSTEM"))]
    assert "tokenizer.chat_template" in text and 'PARAMETER stop "<|im_end|>"' in text


# ---- (d) LoRA

def random_lora(tokenizer, tiny_model_dir, folder, rslora: bool = False, targets=("all-linear",), seed=3, std=0.1):
    """(adapter folder, adapted model): a rank-4 LoRA with random non-zero A and B."""
    cfg = LoraConfig(rank=4, alpha=8, targets=list(targets), rslora=rslora)
    model = make_tiny_model(tokenizer)
    LoRA(cfg).apply(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return save_adapter(model, cfg, str(tiny_model_dir), folder), model


@pytest.fixture
def lora_folder(tokenizer, tiny_model_dir, tmp_path):
    return random_lora(tokenizer, tiny_model_dir, tmp_path / "adapter")


@pytest.mark.parametrize("rslora", [False, True])
def test_gguf_lora_holds_the_adapter(tokenizer, tiny_model_dir, tmp_path, rslora):
    folder, model = random_lora(tokenizer, tiny_model_dir, tmp_path / "adapter", rslora,
                                targets=["q_proj", "k_proj", "down_proj"], seed=4, std=1.0)
    path = export_gguf_lora(folder, tmp_path / "lora.gguf", progress=False).path

    f, t = fields(path), gguf_tensors(path)
    assert (f["general.type"], f["adapter.type"], f["general.architecture"]) == ("adapter", "lora", "llama")
    scale = 8 / (2 if rslora else 4)  # llama.cpp scales by alpha / rank
    assert f["adapter.lora.alpha"] / 4 == pytest.approx(scale)
    assert len(t) == 2 * 3 * 2
    for layer in range(2):
        for hf, ours, heads in [("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                                ("mlp.down_proj", "ffn_down", None)]:
            mod = model.get_submodule(f"model.layers.{layer}.{hf}")
            a, b = (torch.from_numpy(t[f"blk.{layer}.{ours}.weight.lora_{x}"]) for x in "ab")
            assert torch.equal(a, mod.lora_a.detach())
            assert torch.equal(b if heads is None else rotate_half_rows(b, heads), mod.lora_b.detach())
            assert heads is None or not torch.equal(b, mod.lora_b.detach())


def test_merged_gguf_of_an_adapter(tokenizer, tiny_model_dir, tmp_path, lora_folder):
    folder, adapted = lora_folder
    written = export_merged_gguf(str(tiny_model_dir), folder, tmp_path / "merged.gguf", quant="f32", progress=False)
    back = read_back(written.path)
    torch.testing.assert_close(logits(back), logits(adapted), atol=1e-5, rtol=0)
    assert (logits(back) - logits(make_tiny_model(tokenizer))).abs().max() > 1e-3, "the adapter must matter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged.Modelfile", "merged.gguf"]


# ---- the real consumer: llama.cpp (llama-cpp-python, a test dependency: these fail, not skip, without it)

def llama(path, lora=None):
    from llama_cpp import Llama

    # f32 KV cache (llama.cpp's default is f16), so f32 weights can be compared at 1e-5
    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=128, logits_all=True,
                 n_threads=2, type_k=0, type_v=0, verbose=False)


def llama_logits(path, ids=IDS, lora=None) -> torch.Tensor:
    llm = llama(path, lora)
    llm.eval(ids[0].tolist())
    return torch.from_numpy(np.array(llm.scores[: ids.shape[1]]))


def llama_greedy(path, n=16) -> list[int]:
    llm = llama(path)
    llm.eval(IDS[0, :6].tolist())
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


# Measured on the tiny model: llama.cpp vs transformers max |Δlogit| f32 3.3e-7, f16 4.8e-4, q8_0 9.7e-3.
@pytest.mark.parametrize("quant, tol", [("f32", 1e-5), ("f16", 2e-3), ("q8_0", 3e-2)])
def test_llama_cpp_runs_our_gguf(tokenizer, tiny_gguf, quant, tol):
    ours = make_tiny_model(tokenizer)
    theirs = llama_logits(tiny_gguf[quant])
    torch.testing.assert_close(theirs, logits(ours)[0], atol=tol, rtol=0)
    if quant != "q8_0":
        assert llama_greedy(tiny_gguf[quant]) == greedy(ours)


def test_llama_cpp_reads_our_tokenizer_and_template(tokenizer, tiny_gguf):
    llm = llama(tiny_gguf["f16"])
    rendered = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CHATS]
    for text in TEXTS + rendered:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tokenizer.encode(text, add_special_tokens=False), repr(text)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert llm.token_eos() == tokenizer.eos_token_id and llm.token_bos() == tokenizer.bos_token_id


@pytest.mark.parametrize("rslora", [False, True])
def test_llama_cpp_applies_our_gguf_lora(tokenizer, tiny_model_dir, tiny_gguf, tmp_path, rslora):
    """Base GGUF + GGUF LoRA at load == the adapted model (transformers) == the merged GGUF (llama.cpp).
    Measured: 7.6e-7 and 3.0e-7."""
    folder, adapted = random_lora(tokenizer, tiny_model_dir, tmp_path / "adapter", rslora)
    lora = export_gguf_lora(folder, tmp_path / "lora.gguf", progress=False).path
    merged = export_merged_gguf(str(tiny_model_dir), folder, tmp_path / "merged.gguf", quant="f32", progress=False).path

    applied = llama_logits(tiny_gguf["f32"], lora=lora)
    torch.testing.assert_close(applied, logits(adapted)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(applied, llama_logits(merged), atol=1e-5, rtol=0)
    assert (applied - llama_logits(tiny_gguf["f32"])).abs().max() > 1e-2, "the LoRA must change the logits"


# ---- (e) bad input

def test_other_architecture_is_refused(tokenizer, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "qwen")
    with pytest.raises(ExportError, match=r"Llama architecture only; this model is `qwen2` \(Qwen2ForCausalLM\)"):
        export_gguf(str(tmp_path / "qwen"), tmp_path / "q.gguf", progress=False)
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("change, message", [
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope scaling `dynamic`"),
])
def test_unsupported_llama_options_are_refused(tokenizer, tmp_path, change, message):
    from transformers import LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, **change)
    with pytest.raises(ExportError, match=message):
        export_gguf(LlamaForCausalLM(config), tmp_path / "x.gguf", tokenizer=tokenizer, progress=False)


def test_bad_arguments(tokenizer, tiny_model_dir, tmp_path):
    with pytest.raises(ExportError, match="quant 'q4_k' is not one of"):
        export_gguf(str(tiny_model_dir), tmp_path / "x.gguf", quant="q4_k")
    with pytest.raises(ExportError, match="ending in .gguf"):
        export_gguf(str(tiny_model_dir), tmp_path / "x.bin")
    with pytest.raises(ExportError, match="needs its tokenizer"):
        export_gguf(make_tiny_model(tokenizer), tmp_path / "x.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ExportError, match="is a folder"):
        export_gguf(str(tiny_model_dir), tmp_path / "dir.gguf", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_unknown_pre_tokenizer_is_refused(tokenizer, tiny_model_dir, tmp_path):
    from tokenizers import pre_tokenizers

    other = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=True)])
    with pytest.raises(ExportError, match="does not know this tokenizer's pre-tokenizer"):
        export_gguf(make_tiny_model(tokenizer), tmp_path / "x.gguf", tokenizer=other, progress=False)


def test_lora_gguf_refuses_other_methods(tokenizer, tiny_model_dir, tmp_path):
    ia3 = peft.get_peft_model(make_tiny_model(tokenizer), peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(ExportError, match="`ia3` adapter has no GGUF LoRA form; export a merged GGUF"):
        export_gguf_lora(tmp_path / "ia3", tmp_path / "x.gguf", base=str(tiny_model_dir))
    cfg = LoraConfig(rank=2, alpha=4, targets=["q_proj"], dora=True)
    model = make_tiny_model(tokenizer)
    LoRA(cfg).apply(model)
    save_adapter(model, cfg, str(tiny_model_dir), tmp_path / "dora")
    with pytest.raises(ExportError, match="DoRA adapter has no GGUF LoRA form"):
        export_gguf_lora(tmp_path / "dora", tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="not one of f32, f16, bf16"):
        export_gguf_lora(tmp_path / "dora", tmp_path / "x.gguf", quant="q8_0")


# ---- the command line

def test_cli_export_gguf_and_lora(tiny_model_dir, tmp_path, lora_folder, capsys):
    folder, _ = lora_folder
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(tiny_model_dir), "--quant", "q8_0",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create m -f {out.with_suffix('.Modelfile')}" in printed and f"llama-server -m {out}" in printed
    assert fields(out)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    lora = tmp_path / "l.gguf"
    assert main(["export", "--format", "gguf-lora", "--adapter", str(folder), "--output", str(lora)]) == 0
    assert f"--lora {lora}" in capsys.readouterr().out
    assert fields(lora)["adapter.type"] == "lora"


@pytest.mark.parametrize("argv, message", [
    (["--format", "gguf", "--output", "{tmp}/x.txt"], "ending in .gguf"),
    (["--format", "gguf-lora", "--output", "{tmp}/x.gguf"], "needs --adapter"),
    (["--format", "hf", "--quant", "f16", "--output", "{tmp}/x"], "--quant is for"),
])
def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["export", "--model", str(tiny_model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err

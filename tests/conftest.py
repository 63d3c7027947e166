"""Shared fixtures: the embedded model's real tokenizer (cached once, never downloaded) and tiny
randomly initialised Llama models built on it, so unit tests run in seconds."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    from tunesmith.models.load import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def make_tiny_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128,
                    positions: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


# Prompts of different lengths and shapes (a system turn among them): batches with real padding.
PROMPTS = [
    "hi",
    "Tell me a long story about a dog who learned to fly over the mountains.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    "Why is the sky blue?",
    "x",
]


def lively_model(tokenizer, seed: int = 0, layers: int = 2):
    """A tiny model with larger random weights, so greedy outputs differ from prompt to prompt and
    from model to model (the default init gives near-uniform logits)."""
    model = make_tiny_model(tokenizer, seed=seed, layers=layers)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


def save_model_dir(model, tokenizer, path):
    """`model` and `tokenizer` saved as an HF folder (config, safetensors, tokenizer)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A tiny model saved as an HF folder (config, safetensors, tokenizer): loads like any user model."""
    return save_model_dir(make_tiny_model(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny-model"))


def trained_runs(sample, tokenizer) -> list[str]:
    """Decoded text of each maximal run of trained tokens."""
    runs, run = [], []
    for tok, w in zip(sample["input_ids"], sample["weights"]):
        if w:
            run.append(tok)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


# ---- shared by the training tests


def sample(rng, n, trained_from):
    ids = torch.randint(5, 1000, (n,), generator=rng).tolist()
    return {"input_ids": ids, "weights": [0.0] * trained_from + [1.0] * (n - trained_from)}


@pytest.fixture
def samples():
    rng = torch.Generator().manual_seed(0)
    return [sample(rng, 9, 3), sample(rng, 14, 5), sample(rng, 6, 1), sample(rng, 11, 4)]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def write_chats(path, n=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        q = f"What is {i} plus {i + 1}?"
        rows.append({"messages": [{"role": "user", "content": q},
                                  {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(tmp_path, model_dir, *extra):
    """A short LoRA run of a tiny model on arithmetic chats (extra: overrides)."""
    from tunesmith.recipe import load_recipe

    data = write_chats(tmp_path / "chats.jsonl")
    return load_recipe(None, [
        f"model.name={model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'runs'}", "name=t",
        "data.val_fraction=0.2", "train.batch_tokens=256", "train.steps=6", "train.precision=fp32",
        "train.lr=1e-2", "train.warmup=1", "train.save_every=2", "train.keep_last=5", "data.max_length=128",
        "method.lora.dropout=0.1", *extra])


def train_losses(run_dir):
    from tunesmith.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def perturb(model, seed=2, std=0.05):
    """Non-zero deltas everywhere the method trains (zero-initialised parts included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT on MiniLM's WordPiece tokenizer, saved as a transformers folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tunesmith.models.embedding import encoder_folder

    tok = AutoTokenizer.from_pretrained(str(encoder_folder()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=128))
    path = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

"""Shared fixtures: the embedded model's real tokenizer (cached once, never downloaded) and tiny
randomly initialised Llama models built on it, so unit tests run in seconds."""
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


def make_tiny_model(tokenizer, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A tiny model saved as an HF folder (config, safetensors, tokenizer): loads like any user model."""
    path = tmp_path_factory.mktemp("tiny-model")
    model = make_tiny_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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

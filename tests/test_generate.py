"""Generation: greedy equals a hand-written argmax loop, left-padded batches equal one-by-one,
sampling is reproducible, JSONL in/out, and the chat keeps (and resets) its history.

The tiny model's layer weights are scaled up: at the default init its residual stream just
repeats the last token, which would make every comparison here pass trivially."""
import importlib
import json

import pytest
import torch

from conftest import PROMPTS, lively_model

gen = importlib.import_module("tunesmith.infer.generate")  # the module (not the function of the same name)


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively_model(tokenizer)


def manual_greedy(model, tokenizer, prompt: str, n: int) -> str:
    """Argmax over full forward passes, no KV cache, no padding."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_matches_manual_loop_and_is_deterministic(model, tokenizer):
    prompts = ["hi", "Why is the sky blue?"]
    out = gen.generate(model, tokenizer, prompts, max_new_tokens=6)
    assert out == [manual_greedy(model, tokenizer, p, 6) for p in prompts]
    assert out == gen.generate(model, tokenizer, prompts, max_new_tokens=6)
    assert all(out) and out[0] != out[1]


def test_left_padded_batch_equals_one_by_one(model, tokenizer):
    batched = gen.generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=8)
    alone = [gen.generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert batched == alone
    assert len(set(batched)) >= 3, "completions should differ by prompt"
    # and in several batches (the order of outputs must follow the prompts)
    assert gen.generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2) == alone


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, tokenizer):
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = gen.generate(model, tokenizer, PROMPTS[:3], seed=7, **kw)
    assert torch.equal(torch.rand(3), expected_draw)
    assert a == gen.generate(model, tokenizer, PROMPTS[:3], seed=7, **kw)
    assert a != gen.generate(model, tokenizer, PROMPTS[:3], seed=8, **kw)
    assert a != gen.generate(model, tokenizer, PROMPTS[:3], max_new_tokens=10)


def test_system_prompt_is_rendered(model, tokenizer):
    text = gen.render_prompt(tokenizer, "hello", system_prompt="You are a pirate.")
    assert "You are a pirate." in text and text.endswith("<|im_start|>assistant\n")
    kept = gen.render_prompt(tokenizer, PROMPTS[2], system_prompt="You are a pirate.")
    assert "Be brief." in kept and "pirate" not in kept


def test_bf16_under_inference_mode(tokenizer):
    m = lively_model(tokenizer).to(torch.bfloat16)
    with torch.inference_mode():
        out = gen.generate(m, tokenizer, PROMPTS[:2], max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)


def test_bad_settings_are_clear(model, tokenizer):
    with pytest.raises(gen.InferError, match="temperature"):
        gen.generate(model, tokenizer, ["hi"], temperature=-1)
    with pytest.raises(gen.InferError, match="role, content"):
        gen.generate(model, tokenizer, [[{"role": "user"}]])
    with pytest.raises(gen.InferError, match="unknown generation option"):
        gen.generate_file(model, tokenizer, __file__, "unused.jsonl", max_tokens=3)


def test_generate_file_copies_fields(model, tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"id": 1, "prompt": "hi"}, {"id": 2, "messages": PROMPTS[2], "tag": ["a", "é"]}, {"id": 3, "prompt": "x"}]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    out = gen.generate_file(model, tokenizer, src, tmp_path / "sub" / "out.jsonl", max_new_tokens=6, batch_size=2)
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = gen.generate(model, tokenizer, ["hi", PROMPTS[2], "x"], max_new_tokens=6)
    assert got == [{**r, "completion": c} for r, c in zip(rows, expected)]


@pytest.mark.parametrize("lines, where", [
    (['{"prompt": "hi"}', '{"prompt": "ok"}', "not json"], ":3:"),
    (['{"prompt": "hi"}', '{"text": "no prompt"}'], ":2:"),
    (['{"messages": "nope"}'], ":1:"),
    (['[1, 2]'], ":1:"),
])
def test_generate_file_names_the_bad_line(model, tokenizer, tmp_path, lines, where):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(gen.InferError, match=f"in.jsonl{where}"):
        gen.generate_file(model, tokenizer, src, tmp_path / "out.jsonl", max_new_tokens=2)
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_keeps_history_and_reset_clears_it(model, tokenizer, monkeypatch):
    first_reply = gen.generate(model, tokenizer, ["hello there"], max_new_tokens=5)[0]
    assert first_reply
    rendered, printed = [], []
    original = gen.render_prompt
    monkeypatch.setattr(gen, "render_prompt", lambda *a, **k: rendered.append(original(*a, **k)) or rendered[-1])
    inputs = iter(["hello there", "  ", "second question", "/reset", "third", "/exit", "never read"])
    history = gen.chat(model, tokenizer, max_new_tokens=5, temperature=0.0, input_fn=lambda prompt: next(inputs),
                       output_fn=lambda *a, **k: printed.append(a[0] if a else ""))

    assert len(rendered) == 3
    assert rendered[0].count("hello there") == 1 and first_reply not in rendered[0]
    assert "hello there" in rendered[1] and first_reply in rendered[1] and "second question" in rendered[1]
    assert rendered[1].index("hello there") < rendered[1].index(first_reply) < rendered[1].index("second question")
    assert "hello there" not in rendered[2] and "second question" not in rendered[2] and "third" in rendered[2]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "third"
    assert first_reply in "".join(printed), "the reply is streamed through output_fn"
    assert next(inputs) == "never read", "/exit stops reading input"


def test_chat_ends_at_eof(model, tokenizer):
    def eof(prompt):
        raise EOFError

    assert gen.chat(model, tokenizer, input_fn=eof, output_fn=lambda *a, **k: None) == []

"""The tokenizer and chat template in a GGUF, as llama.cpp reads them, and the Ollama Modelfile beside it.

- tokenizer.ggml.model "gpt2" (byte-level BPE): tokens, token types, merges, special ids, and
  whether BOS/EOS are added; tokenizer.chat_template holds the model's own Jinja template.
- tokenizer.ggml.pre names llama.cpp's pre-tokenizer; llama.cpp's converter identifies it by the
  sha256 of the ids a fixed check text encodes to, and so do we (same text, same hashes).
- Ollama gets a Go template only when the model's template renders exactly ChatML.
"""
from __future__ import annotations

import json
from hashlib import sha256

import gguf

from .atomic import ExportError

# llama.cpp's check text for identifying a BPE pre-tokenizer, and the hashes of the token ids it
# encodes to for pre-tokenizers llama.cpp runs on the llama architecture (from its converter).
_CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
               "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
               "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
               "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}
# Tokens that close a chat turn; Ollama and llama.cpp stop there (and at eos).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# Ollama's Go template for ChatML; written only when the model's own template renders exactly ChatML.
_CHATML_GO = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
              "{{ end }}<|im_start|>assistant\n")


# ---- tokenizer

def _backend_json(tokenizer, where) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{where}: the tokenizer is not a fast (tokenizers) tokenizer; GGUF export reads "
                          "tokenizer.json")
    return json.loads(backend.to_str())


def check_tokenizer(tokenizer, where) -> dict:
    """The tokenizer's tokenizer.json, after refusing what GGUF's `gpt2` (byte-level BPE) model cannot hold."""
    data = _backend_json(tokenizer, where)
    model = data.get("model") or {}
    decoders = data.get("decoder") or {}
    kinds = {d.get("type") for d in decoders.get("decoders", [decoders])}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in kinds:
        raise ExportError(f"{where}: only byte-level BPE tokenizers are supported by the GGUF export (this one "
                          f"is {model.get('type')}, decoder {sorted(k for k in kinds if k)})")
    return data


def pre_tokenizer(tokenizer, where) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, identified as llama.cpp's converter does."""
    digest = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    if digest not in _PRE_TOKENIZERS:
        raise ExportError(f"{where}: llama.cpp does not know this tokenizer's pre-tokenizer (check hash "
                          f"{digest[:16]}…; known: {', '.join(sorted(set(_PRE_TOKENIZERS.values())))})")
    return _PRE_TOKENIZERS[digest]


def vocabulary(tokenizer, vocab_size: int, where) -> tuple[list[str], list[int]]:
    """Tokens by id (padded to the embedding's rows as [PADi]) and their GGUF token types."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"{where}: the tokenizer has id {max(by_id)} but the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _merges(data: dict) -> list[str]:
    """BPE merges as "left right" strings; a space inside a part is written as U+0120+256 (GGUF has no
    other way to keep it apart from the separator)."""
    merges = data["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m) for m in merges]


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether encoding adds `token_id` at the start (first) or end: observed, not read from a flag."""
    if token_id is None:
        return False
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    return len(full) > len(plain) and (full[0] if first else full[-1]) == token_id


def add_tokenizer(w: gguf.GGUFWriter, tokenizer, vocab_size: int, where) -> None:
    data = check_tokenizer(tokenizer, where)
    tokens, types = vocabulary(tokenizer, vocab_size, where)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tokenizer, where))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(data))
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(int(tid))
    w.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, first=True))
    w.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        w.add_chat_template(template)


# ---- Ollama

def _chatml(messages: list[dict], prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if prompt else "")


def chatml_system(tokenizer) -> tuple[bool, str | None]:
    """(whether the chat template renders exactly ChatML, the system prompt it adds when none is given).

    Checked by rendering probe conversations, so the Go template written for Ollama is only claimed
    where it reproduces the model's own template."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "<|im_start|>" not in template:
        return False, None
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    try:
        with_system = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        bare = tokenizer.apply_chat_template(probe[1:2], add_generation_prompt=True, tokenize=False)
    except Exception:  # a template that raises on a plain conversation is not ChatML
        return False, None
    if with_system != _chatml(probe, True):
        return False, None
    if bare == _chatml(probe[1:2], True):
        return True, None
    head, _, rest = bare.partition("<|im_start|>user\n")
    if rest == "U<|im_end|>\n<|im_start|>assistant\n" and head.startswith("<|im_start|>system\n") \
            and head.endswith("<|im_end|>\n"):
        return True, head[len("<|im_start|>system\n"):-len("<|im_end|>\n")]
    return False, None


def stop_tokens(tokenizer) -> list[str]:
    """Ollama's stop strings: the end-of-turn tokens this vocabulary has, and eos."""
    vocab = tokenizer.get_vocab()
    stops = [t for t in _END_OF_TURN if t in vocab]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    if "<|im_end|>" in stops and "<|im_start|>" in vocab:
        stops.append("<|im_start|>")  # a ChatML model that opens a new turn has finished its own
    return stops


def modelfile_text(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for the GGUF beside it."""
    lines = [f"FROM ./{gguf_name}", ""]
    is_chatml, system = chatml_system(tokenizer)
    if is_chatml:
        lines.append(f'TEMPLATE """{_CHATML_GO}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    elif getattr(tokenizer, "chat_template", None):
        lines.append("# The chat template is not ChatML: Ollama reads tokenizer.chat_template from the GGUF;")
        lines.append("# check `ollama show --template` and add a TEMPLATE here if it picked the wrong one.")
    lines += [f'PARAMETER stop "{s}"' for s in stop_tokens(tokenizer)]
    return "\n".join(lines) + "\n"

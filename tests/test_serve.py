"""tunesmith serve through the real `openai` client: answers equal offline generation (greedy), per
adapter and in batches that mix adapters; sampling, stop strings, usage, streaming, completions;
limits and errors in OpenAI's shape.

The tiny base model's layer weights are scaled up (as in test_generate.py) and both LoRA adapters
have non-zero A and B, so the base and the two adapters answer differently: every parity check
below could fail, and the tests assert the outputs differ where they must."""
import json
import signal
import subprocess
import sys
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai  # a test dependency (the `test` extra), as are fastapi and uvicorn
import pytest
import torch
import uvicorn

from conftest import make_tiny_model
from tunesmith.export import save_adapter
from tunesmith.export.tuned import save_tuned
from tunesmith.infer.generate import _encode, _generate_batch, generate, load_for_inference
from tunesmith.methods import attach, build_method
from tunesmith.methods.lora import LoRA
from tunesmith.methods.options import method_from_dict
from tunesmith.recipe import LoraConfig
from tunesmith.serve import Limits, ModelPool, Scheduler, ServeError, build_app, parse_adapters
from tunesmith.serve.multilora import MultiLoRALinear

N = 12  # new tokens per reply
PROMPTS = ["hi", "Tell me a long story about a dog who learned to fly.", "Why is the sky blue?", "x"]


def noisy(model, pattern, seed, std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern(name, p):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory):
    """A lively tiny base model, a PEFT-layout LoRA adapter, one in tunesmith's layout, and an IA3 adapter."""
    root = tmp_path_factory.mktemp("serve")
    base = make_tiny_model(tokenizer)
    noisy(base, lambda n, p: p.ndim == 2 and "embed" not in n, 100, 0.2)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")

    model = make_tiny_model(tokenizer)
    model.load_state_dict(base.state_dict())
    cfg = LoraConfig(rank=4, alpha=8, targets=["all-linear"])
    LoRA(cfg).apply(model)
    noisy(model, lambda n, p: ".lora_" in n, 1, 0.3)
    save_adapter(model, cfg, str(root / "base"), root / "peft-lora")

    for name, options, seed in (("lora", {"rank": 8, "alpha": 8, "rslora": True, "targets": ["q_proj", "v_proj", "up_proj"]}, 2),
                                ("ia3", {}, 3)):
        model = make_tiny_model(tokenizer)
        model.load_state_dict(base.state_dict())
        method = build_method(method_from_dict(name, options, where="test"))
        attach(model, method)
        noisy(model, lambda n, p: p.requires_grad, seed, 0.3 if name == "lora" else 1.0)
        save_tuned(model, method, str(root / "base"), root / f"own-{name}")
    return root


class Server:
    """uvicorn in a thread on a free port, with a pool and scheduler of our own."""

    def __init__(self, folders, limits=None, api_key=None, max_batch=16, max_adapters=4, extra=None):
        self.pool = ModelPool(str(folders / "base"), {"a": str(folders / "peft-lora"), "b": str(folders / "own-lora"),
                                                      "ia3": str(folders / "own-ia3"), **(extra or {})},
                              max_adapters=max_adapters)
        limits = limits or Limits()
        self.scheduler = Scheduler(self.pool, max_batch=max_batch, max_queue=limits.max_queue)
        app = build_app(self.pool, self.scheduler, limits, api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def server(folders):
    s = Server(folders)
    yield s
    s.close()


@pytest.fixture(scope="module")
def offline(folders):
    """The same models loaded as `tunesmith generate` loads them (LoRA unmerged, IA3 merged)."""
    base = str(folders / "base")
    models = {base: load_for_inference(base)[0],
              "a": load_for_inference(base, str(folders / "peft-lora"), merge=False)[0],
              "b": load_for_inference(base, str(folders / "own-lora"), merge=False)[0],
              "ia3": load_for_inference(base, str(folders / "own-ia3"))[0]}
    return models


def chat(client, model, prompt, **kw):
    kw = {"temperature": 0, "max_tokens": N, **kw}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def test_models_lists_the_base_and_every_adapter(server, folders):
    names = [m.id for m in server.client().models.list()]
    assert names == [str(folders / "base"), "a", "b", "ia3"]


def test_each_model_answers_as_offline_generation_and_they_differ(server, offline, tokenizer):
    client = server.client()
    answers = {}
    for name, model in offline.items():
        expected = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=N)
        got = [chat(client, name, p).choices[0].message.content for p in PROMPTS[:2]]
        assert got == expected, name
        answers[name] = got
    assert len({tuple(v) for v in answers.values()}) == len(answers), "the adapters must change the answers"


def test_stream_equals_the_whole_answer(server, tokenizer):
    client = server.client()
    whole = chat(client, "a", PROMPTS[1])
    chunks = list(chat(client, "a", PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_batch_mixing_adapters_equals_one_by_one(server, folders):
    client = server.client()
    jobs = [(m, p) for p in PROMPTS for m in (str(folders / "base"), "a", "b", "ia3")]
    alone = [chat(client, m, p).choices[0].message.content for m, p in jobs]
    route, seen = server.pool.route, []
    original = route.set

    def spy(adapters, device):  # what each forward of the base model carried
        seen.append(set(adapters))
        original(adapters, device)

    route.set = spy
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: chat(client, *job).choices[0].message.content, jobs))
    finally:
        del route.set
    assert together == alone
    assert max(len(s) for s in seen) == 3, "some forward pass must hold the base rows and both LoRA adapters"


def test_usage_counts_tokens_and_length_finish(server, tokenizer):
    r = chat(server.client(), "b", PROMPTS[2], max_tokens=5)
    prompt = _encode(tokenizer, [{"role": "user", "content": PROMPTS[2]}], None)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 5, len(prompt) + 5)


def test_n_samples_with_a_seed(server):
    client = server.client()
    r = chat(client, "a", PROMPTS[0], n=2, temperature=1.0, seed=7)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1] and texts[0] != texts[1]
    assert texts == [c.message.content for c in chat(client, "a", PROMPTS[0], n=2, temperature=1.0, seed=7).choices]
    assert r.usage.completion_tokens == 2 * N


def test_stop_string_cuts_the_reply(server):
    client = server.client()
    full = chat(client, "b", PROMPTS[3]).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop and stop.strip()
    for stream in (False, True):
        r = chat(client, "b", PROMPTS[3], stop=[stop], stream=stream)
        if stream:
            chunks = [c for c in r if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert text == full[:full.index(stop)] and reason == "stop"


def test_completions_take_raw_text(server, offline, tokenizer):
    client = server.client()
    prompt = "The capital of France is"
    r = client.completions.create(model="a", prompt=prompt, max_tokens=N, temperature=0)
    ids = tokenizer(prompt)["input_ids"]
    expected = _generate_batch(offline["a"], tokenizer, [ids], max_new_tokens=N, temperature=0, top_p=1, top_k=0,
                               seed=None)[0]
    assert r.choices[0].text == expected and r.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a", prompt=prompt, max_tokens=N, temperature=0, stream=True))
    assert streamed == expected


def test_errors_in_openai_shape(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "nope", "hi")
    assert "a, b, ia3" in str(e.value) and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens past the context (2048)
        chat(client, "a", "word " * 1900, max_tokens=500)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # over the server's max_tokens cap
        chat(client, "a", "hi", max_tokens=5000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "a", "hi", temperature=7)
    assert e.value.body["param"] == "temperature"
    request = urllib.request.Request(server.url + "/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400 and "not valid JSON" in json.load(e.value)["error"]["message"]


def test_api_key_body_limit_and_full_queue(folders):
    s = Server(folders, limits=Limits(max_queue=1, max_body_bytes=2000), api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            chat(s.client("wrong"), "a", "hi")
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        client = s.client("sesame")
        with pytest.raises(openai.APIStatusError) as e:
            chat(client, "a", "x" * 3000)
        assert e.value.status_code == 413
        stream = chat(client, "a", PROMPTS[1], max_tokens=200, stream=True)
        next(iter(stream))  # the first request is in flight
        with pytest.raises(openai.RateLimitError):
            chat(client, "a", "hi")
        stream.close()
        deadline = time.monotonic() + 10
        while s.scheduler.in_flight and time.monotonic() < deadline:  # the closed stream frees its slot
            time.sleep(0.02)
        assert chat(client, "a", "hi").choices[0].message.content
    finally:
        s.close()


def test_a_non_streamed_request_whose_client_leaves_frees_its_slot(folders):
    """Nothing is written to a client waiting for a whole reply, so the server must ask the
    connection: a client that times out must not keep its rows decoding to max_tokens."""
    s = Server(folders, limits=Limits(max_queue=1))
    closed = []
    close = s.scheduler._close
    s.scheduler._close = lambda seq, n: (closed.append((seq.finish, n)), close(seq, n))
    try:
        impatient = openai.OpenAI(base_url=s.url, api_key="none", timeout=0.3, max_retries=0)
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            chat(impatient, "a", PROMPTS[1], max_tokens=1000, temperature=1.0, seed=0)
        while s.scheduler.in_flight and time.monotonic() < started + 30:
            time.sleep(0.02)
        assert not s.scheduler.in_flight, "the abandoned request still holds its slot"
        assert closed[0][0] == "cancelled" and closed[0][1] < 1000, closed
        assert chat(s.client(), "a", "hi").choices[0].message.content  # the queue of one is free again
    finally:
        s.close()


def test_lru_keeps_at_most_max_adapters(folders, tokenizer):
    # a model folder (as a full-tuning run leaves) is served as its own model
    s = Server(folders, max_adapters=1, extra={"full": str(folders / "base")})
    try:
        client = s.client()
        first = chat(client, "a", "hi").choices[0].message.content
        chat(client, "b", "hi")
        assert list(s.pool.loaded) == ["b"]
        assert chat(client, "a", "hi").choices[0].message.content == first  # reloaded, same answer
        assert chat(client, "full", "hi").choices[0].message.content == chat(client, str(folders / "base"), "hi").choices[0].message.content
        assert list(s.pool.loaded) == ["full"] and len(s.pool.engines()) == 2
        wrapped = [m for m in s.pool.base.model.modules() if isinstance(m, MultiLoRALinear)]
        assert wrapped and not any(m.factors for m in wrapped)  # the evicted adapter's factors are gone
    finally:
        s.close()


def test_bad_adapter_arguments_are_one_line_errors(folders, tmp_path):
    with pytest.raises(ServeError, match="name=path"):
        parse_adapters(["nonsense"])
    with pytest.raises(ServeError, match="given twice"):
        parse_adapters(["a=x", "a=y"])
    with pytest.raises(ServeError, match="no such file"):
        ModelPool(str(folders / "base"), {"a": str(tmp_path / "missing")})


def test_a_request_past_its_time_ends_with_length(folders):
    s = Server(folders, limits=Limits(request_timeout_s=0.2))
    try:
        r = chat(s.client(), "a", PROMPTS[1], max_tokens=1000)
        assert r.choices[0].finish_reason == "length" and 0 < r.usage.completion_tokens < 1000
    finally:
        s.close()


def test_cli_serves_and_sigterm_lets_the_stream_finish(folders):
    """The real command: its start line names the URL and models; SIGTERM during a stream ends the
    process only after that stream has sent everything, and no new request gets in."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--model", str(folders / "base"),
                             "--adapter", f"a={folders / 'peft-lora'}", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        while line and "[tunesmith] serving" not in line:
            line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line and ", a at" in line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(100):  # the start line comes just before uvicorn listens
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.05)
        stream = chat(client, "a", PROMPTS[1], max_tokens=300, stream=True, stream_options={"include_usage": True})
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].usage.completion_tokens == 300
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    finally:
        proc.kill()
        proc.wait()


def test_cli_bad_adapter_is_a_one_line_error(capsys):
    from tunesmith.cli import main

    assert main(["serve", "--adapter", "nonsense"]) == 2
    assert capsys.readouterr().err.strip() == "tunesmith: error: --adapter: expected name=path, got 'nonsense'"


def test_start_line_and_the_warning_off_localhost(folders, monkeypatch, capsys):
    from tunesmith.serve import serve

    ran, threads = {}, torch.get_num_threads()
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw))
    try:
        serve(str(folders / "base"), {"a": str(folders / "peft-lora")}, host="0.0.0.0", port=9999, threads=1)
        out = capsys.readouterr()
        assert "warning: listening on 0.0.0.0" in out.err and "set --api-key" in out.err
        assert f"serving {folders / 'base'}, a at http://0.0.0.0:9999/v1" in out.out
        assert (ran["host"], ran["port"]) == ("0.0.0.0", 9999)
        serve(str(folders / "base"), {}, port=9999, api_key="k", threads=1)
        assert "warning" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)  # serve sets the process's thread count; the next tests keep theirs


def test_a_sliding_window_model_is_refused(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    from tunesmith.serve.engine import Engine

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    with pytest.raises(ValueError, match="sliding-window attention"):
        Engine(MistralForCausalLM(config), pad_id=0)

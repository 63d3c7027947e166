"""Load test of `tunesmith serve` on the embedded SmolLM2-135M with two LoRA adapters.

    python benchmarks/serve/load.py --requests 32 --max-tokens 32 --clients 1,4,16

Two servers are started in turn through the real command line, with the same models: batched
(`--max-batch 16`, continuous batching, adapters mixed per row) and one request at a time
(`--max-batch 1`, the baseline). Against each, N concurrent clients (the `openai` client, streaming,
greedy) send a fixed list of requests cycling over the base model and both adapters; the script
reports requests/s, generated tokens/s, p50/p99 latency, p50 time to first token and the error
count, and checks that both servers gave the same text for every request (greedy must not depend
on batching). The adapters are random-init LoRA (rank 8, every linear, B non-zero), saved in PEFT's
layout; they change the answers without training.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain recursion to a child.",
    "List three prime numbers.",
    "Why do cats purr?",
    "Give me a tip for learning Python.",
    "What is 12 times 7?",
    "Describe a sunset in one sentence.",
]


def make_adapters(folder: Path) -> list[tuple[str, Path]]:
    """Two random-init LoRA adapters on the embedded model (seeded, so every run serves the same)."""
    import torch

    from tunesmith.export import save_adapter
    from tunesmith.methods.lora import LoRA
    from tunesmith.models.load import DEFAULT_MODEL, load_model
    from tunesmith.recipe import LoraConfig

    out = []
    for name, seed in (("a", 1), ("b", 2)):
        path = folder / name
        if not (path / "adapter_config.json").is_file():
            model, _ = load_model(DEFAULT_MODEL, "fp32")
            cfg = LoraConfig(rank=8, alpha=16, targets=["all-linear"])
            LoRA(cfg).apply(model)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if ".lora_" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            save_adapter(model, cfg, DEFAULT_MODEL, path)
        out.append((name, path))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapters, max_batch: int, threads: int):
    port = free_port()
    cmd = [sys.executable, "-m", "tunesmith", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--threads", str(threads)]
    for name, path in adapters:
        cmd += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    while line and "[tunesmith] serving" not in line:
        line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the server did not start: {' '.join(cmd)}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    for _ in range(200):
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            time.sleep(0.05)
    return proc, client


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, text, tokens = None, "", 0
    try:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # counted, not raised: the table reports errors
        return {"error": repr(e)}
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens, "text": text}


def run_load(client, jobs, clients: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda job: one_request(client, *job, max_tokens), jobs))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)

    def pct(q):
        return lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] if lat else float("nan")

    return {"clients": clients, "wall_s": wall, "req_s": len(ok) / wall, "tok_s": sum(r["tokens"] for r in ok) / wall,
            "p50_s": pct(0.5), "p99_s": pct(0.99),
            "ttft_p50_s": statistics.median(r["ttft"] for r in ok) if ok else float("nan"),
            "errors": len(results) - len(ok), "texts": [r.get("text") for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    ap.add_argument("--threads", type=int, default=0, help="the servers' --threads (0 = one per physical core)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tunesmith-serve-bench"))
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    adapters = make_adapters(Path(args.workdir))
    models = ["smollm2-135m-instruct", "a", "b"]
    jobs = [(models[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    rows = []
    for label, max_batch in ((f"batched (--max-batch {args.max_batch})", args.max_batch), ("one at a time (--max-batch 1)", 1)):
        proc, client = start_server(adapters, max_batch, args.threads)
        try:
            one_request(client, "a", "warm up", 4)
            for n in (int(c) for c in args.clients.split(",")):
                rows.append({"server": label, **run_load(client, jobs, n, args.max_tokens)})
                print(f"{label:32s} clients {n:3d}: {rows[-1]['req_s']:.2f} req/s, {rows[-1]['tok_s']:.1f} tok/s, "
                      f"errors {rows[-1]['errors']}", flush=True)
        finally:
            proc.terminate()
            proc.wait()
    reference = rows[-1]["texts"]
    print("\n| server | clients | req/s | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | errors | same text as one at a time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = sum(a == b for a, b in zip(r["texts"], reference))
        print(f"| {r['server']} | {r['clients']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['p50_s']:.2f} | "
              f"{r['p99_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['errors']} | {same}/{len(reference)} |")
    half = len(rows) // 2
    for b, s in zip(rows[:half], rows[half:]):
        print(f"clients {b['clients']}: batched / one-at-a-time = {b['tok_s'] / s['tok_s']:.2f}x tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "texts"} for r in rows], indent=1))


if __name__ == "__main__":
    main()

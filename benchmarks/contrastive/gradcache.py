"""GradCache against the plain batch: peak memory and time of one contrastive training step, and the
gradients' agreement, on the packaged MiniLM (full fine-tuning) with synthetic texts.

    python benchmarks/contrastive/gradcache.py --batches 64 256 --max-length 32 --chunk 32

Each configuration runs in a fresh process (peak RSS is per process): it loads the model, takes one
forward/backward of a batch of B queries, each with its positive and one hard negative (3B texts
of `max-length` tokens), and saves the gradients; the parent compares them with the plain run's.
Dropout is off (model.eval()) so that the two runs compute the same function; with dropout, GradCache
replays each chunk's own masks (tests/test_contrastive.py), but those differ from the plain run's.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(batch: int, max_length: int, chunk: int, out: str) -> dict:
    import torch

    from tunesmith.data import collate
    from tunesmith.data.pairs import PairRecord, tokenize_items
    from tunesmith.models.embedding import ENCODER_NAME, load_any
    from tunesmith.objectives.contrastive import Contrastive, ContrastiveConfig

    torch.manual_seed(0)
    model, tok = load_any(ENCODER_NAME)
    model.eval()  # no dropout: the plain and the cached run draw their masks in different orders
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    text = lambda i, k: " ".join(words[(i * 7 + k * 3 + j) % len(words)] + str(i % 97) for j in range(max_length))
    records = [PairRecord(f"#{i}", text(i, 0), text(i, 1), [text(i, 2)], None) for i in range(batch)]
    items = tokenize_items(records, tok, [], max_length=max_length)[0]
    obj = Contrastive(ContrastiveConfig(cache_chunk=chunk, max_length=max_length))
    obj.ready(model)
    b = obj.finish(items, collate(obj.rows(items), packing=False, pad_id=tok.pad_token_id))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss, n, _ = obj(model, b)
    (loss / n).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    torch.save({k: p.grad for k, p in model.named_parameters() if p.grad is not None}, out)
    return {"batch": batch, "texts": 3 * batch, "chunk": chunk, "loss": float(loss.detach()) / n,
            "step_s": seconds, "peak_rss_gb": peak / 2**20, "step_rss_gb": (peak - base) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        b, length, chunk, out = args.child
        print(json.dumps(one(int(b), int(length), int(chunk), out)))
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            grads = {}
            for chunk in (0, args.chunk):
                out = str(Path(tmp) / f"g{batch}-{chunk}.pt")
                r = subprocess.run([sys.executable, __file__, "--child", str(batch), str(args.max_length), str(chunk), out],
                                   capture_output=True, text=True, check=True)
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                grads[chunk] = torch.load(out)
            plain, cached = grads[0], grads[args.chunk]
            scale = max(float(g.abs().max()) for g in plain.values())
            rows[-1]["max_grad_diff_vs_plain"] = max(float((cached[k] - plain[k]).abs().max()) for k in plain) / scale
    print("| queries | texts | cache_chunk | loss | step s | step RSS GB | peak RSS GB | max grad diff / max grad |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = f"{r['max_grad_diff_vs_plain']:.1e}" if "max_grad_diff_vs_plain" in r else "(reference)"
        print(f"| {r['batch']} | {r['texts']} | {r['chunk'] or 'off'} | {r['loss']:.5f} | {r['step_s']:.1f} | "
              f"{r['step_rss_gb']:.2f} | {r['peak_rss_gb']:.2f} | {diff} |")


if __name__ == "__main__":
    main()

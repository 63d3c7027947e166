"""Which KV-cache layout continuous batching should use on CPU: one padded batch cache rebuilt only
when membership changes (what `tunesmith serve` does), or per-sequence caches left-pad-merged into
a batch before every step.

    python benchmarks/serve/cache.py --threads 1

On the embedded SmolLM2-135M, for B sequences of different prompt lengths, it times one decoding
step of the engine (padded batch cache) and the extra work the per-sequence layout adds to every
step: padding each sequence's keys/values to the longest and concatenating them (one copy of the
whole cache per step).
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--context", type=int, default=128, help="tokens already in the cache (longest row)")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tunesmith.models.load import DEFAULT_MODEL
    from tunesmith.serve import ModelPool
    from tunesmith.serve.engine import Sequence, _left_pad

    pool = ModelPool(DEFAULT_MODEL, {})
    engine = pool.base
    print(f"| sequences | context | step (padded batch cache) ms | per-step merge of per-sequence caches ms | "
          f"merge / step |\n|---|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        lengths = [args.context - 7 * i for i in range(b)]
        seqs = [Sequence(list(range(100, 100 + n)), 10_000) for n in lengths]
        for s, row in zip(seqs, engine.join(seqs)):
            s.ids.append(int(row.argmax()))
        engine.step()  # warm
        t0 = time.perf_counter()
        for _ in range(args.steps):
            for s, row in zip(engine.rows, engine.step()):
                s.ids.append(int(row.argmax()))
        step = (time.perf_counter() - t0) / args.steps

        # the per-sequence layout: each row's own keys/values (padding stripped), merged before every step
        real = engine.mask.sum(1).tolist()
        own = [[(k[i:i + 1, :, -n:].clone(), v[i:i + 1, :, -n:].clone()) for k, v in engine.layers]
               for i, n in enumerate(real)]
        width = max(real)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            merged = [(torch.cat([_left_pad(own[i][layer][0], width, 2) for i in range(b)]),
                       torch.cat([_left_pad(own[i][layer][1], width, 2) for i in range(b)]))
                      for layer in range(len(engine.layers))]
            mask = torch.cat([_left_pad(torch.ones(1, n, dtype=torch.long), width, 1) for n in real])
        merge = (time.perf_counter() - t0) / args.steps
        del merged, mask
        print(f"| {b} | {args.context} | {step * 1e3:.1f} | {merge * 1e3:.1f} | {merge / step:.2f} |", flush=True)
        for s in engine.rows:
            s.finish = "bench"
        engine.drop_finished()


if __name__ == "__main__":
    main()

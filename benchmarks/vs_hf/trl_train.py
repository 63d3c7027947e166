"""The TRL side of benchmarks/vs_hf: one timed run of TRL's `SFTTrainer` + PEFT LoRA, in this process.

    python benchmarks/vs_hf/trl_train.py --model FOLDER --data samples.jsonl --setup lora \
        --precision bf16 --max-length 4096 --steps 12 --warmup 2 --out run.json

`run.py` starts this once per measured run, as it starts hf_train.py (LD_PRELOAD, peak RSS from
`wait4`); it does not import tunesmith.

The configuration is TRL's own fastest one for this CPU, as a user reading TRL's docs would set it:

- `packing=True` with `packing_strategy="bfd"` (TRL's default strategy: best-fit decreasing, each
  sample whole in one row, never cut across rows) into rows of `--max-length` tokens (run.py passes
  the 4096 tokens of tunesmith's packed rows), one row per optimizer step
  (`per_device_train_batch_size=1`). TRL turns padding-free on by itself with "bfd": the row's
  samples are concatenated with position ids restarting per sample, no padding, and transformers
  builds a block-causal mask from those ids (SDPA on a CPU; the varlen flash kernels TRL's docs
  name need a GPU). "wrapped" packing would cut samples and let them attend across documents.
- `gradient_checkpointing=False` (TRL defaults it to True, which saves memory but recomputes every
  layer's forward; on a 135M model memory is plentiful). `--gradient-checkpointing` restores TRL's
  default (run.py's optional `trl-default` system).
- `--precision bf16` (`bf16=True`, TRL's default: autocast, fp32 master weights) or `fp32`, which is
  faster on CPUs without bf16 hardware; run.py measures both and takes the faster as "TRL best".
- LoRA as hf_train.py: r=16, alpha 32, dropout 0, `target_modules="all-linear"`, handed to the
  trainer as `peft_config` (as TRL's docs do).
- TRL's default loss (`loss_type="nll"`, its chunked fused-LM-head path) and its default per-step
  metrics (token accuracy, entropy), since a user gets them.

Data: the same pre-tokenized samples as the other systems (`hf_common.load_samples`: tunesmith's
rendering, labels -100 on masked prompts). SmolLM2's chat template has no `{% generation %}` block,
so TRL's own `assistant_only_loss` could not mask the prompts of a `messages` data set; a data set
with `input_ids` and `labels` columns is one TRL takes as already processed (it only packs it).
Tokenization is outside the timed steps on every side. TRL's dataloader draws its packed rows in
the Trainer's default random order (seeded).

Timing and counting: `hf_common` (the same step clock as hf_train.py; trained tokens are
`labels[..., 1:] != -100` of each collated batch, TRL's collator masking each sample's first token).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from hf_common import CountingCollator, load_samples, step_clock, step_figures


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local transformers folder")
    p.add_argument("--data", required=True, help='JSONL of {"input_ids", "labels"} or {"text": ...}')
    p.add_argument("--setup", choices=["lora", "full"], default="lora")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default (off here unless given)")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=4096, help="tokens per packed row (one row a step)")
    p.add_argument("--sample-length", type=int, default=None, help="cut samples to this many tokens first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write this run's figures (JSON)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import peft
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    t_start = time.perf_counter()
    total = args.warmup + args.steps
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    samples = load_samples(args.data, tokenizer, args.sample_length or args.max_length)
    dataset = datasets.Dataset.from_list(samples)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    peft_config = None
    if args.setup == "lora":
        peft_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                      bias="none", task_type="CAUSAL_LM")
    clock = step_clock()
    config = SFTConfig(
        output_dir=str(Path(args.out).parent / f"trl-{args.setup}-{args.precision}-trainer"),
        max_steps=total, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=args.lr, max_grad_norm=1.0, bf16=args.precision == "bf16", use_cpu=True,
        activation_checkpointing=args.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        packing=True, packing_strategy="bfd", padding_free=True, max_length=args.max_length,
        dataloader_num_workers=0, eval_strategy="no", save_strategy="no", logging_strategy="steps",
        logging_steps=10**6, report_to=[], disable_tqdm=True, seed=args.seed,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    rows = len(trainer.train_dataset)
    if rows < total:
        raise SystemExit(f"{args.data}: {rows} packed rows of {args.max_length} tokens, {total} steps asked for")
    # TRL refuses a custom collator with padding-free; wrap its own one to count the trained tokens.
    trainer.data_collator = collator = CountingCollator(trainer.data_collator)
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "setup": args.setup, "mode": "trl", **step_figures(clock, collator, args.warmup, args.steps),
        "wall_s_inside": time.perf_counter() - t_start, "threads": torch.get_num_threads(),
        "trainable": trainable, "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "bf16": args.precision == "bf16", "optim": str(config.optim), "packed_rows": rows,
        "padding_free": bool(getattr(trainer, "padding_free", False)),
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "precision": "bf16 autocast" if args.precision == "bf16" else "fp32",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__, "datasets": datasets.__version__},
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"[trl] {args.setup} {args.precision}: {result['trained_tokens_per_s']:.0f} trained tokens/s, "
          f"{result['s_per_step']:.2f} s/step, VmHWM {result['peak_rss_gb_inside']:.2f} GB, "
          f"{rows} packed rows, allocator {result['allocator']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

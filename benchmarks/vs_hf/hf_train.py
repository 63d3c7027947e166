"""The HF side of benchmarks/vs_hf: one timed HF `Trainer` + PEFT run, in this process.

    python benchmarks/vs_hf/hf_train.py --model FOLDER --data samples.jsonl --setup lora --mode default \
        --steps 12 --warmup 2 --out run.json
    python benchmarks/vs_hf/hf_train.py ... --mode best --precision fp32 --batches packed_batches.json

`run.py` starts this once per measured run (it sets the allocator through LD_PRELOAD and reads the
peak RSS of the process when it exits); it does not import tunesmith.

Modes:
  default  what a user gets by default: fp32, `per_device_train_batch_size=8` samples per step,
           padded to the longest in the batch (`DataCollatorForSeq2Seq`, labels padded with -100,
           so padding and masked prompts do not train), the Trainer's default AdamW.
  best     the Trainer at its best on a CPU: padding-free batches from `DataCollatorWithFlattening`
           (the samples of a step concatenated into one row, position ids restarting at 0 for every
           sample, which transformers turns into a block-causal mask), in `--precision bf16`
           (`bf16=True`: autocast, fp32 master weights) or fp32 (faster on CPUs without bf16
           hardware). The samples of each step are given by `--batches` (run.py passes tunesmith's
           packing plan of the same data, so both see exactly the same tokens in every step).

Samples: see `hf_common.load_samples` (pre-tokenized records with labels, or plain text). The data
is read in file order in both modes.

Timing: `hf_common.step_clock` (`time.perf_counter()` at `on_step_begin` / `on_step_end`); the
first `--warmup` steps are untimed. Trained tokens of a step are the label positions the loss
actually uses (`labels[..., 1:] != -100`, counted in the collator), so padding does not count.
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
    p.add_argument("--setup", choices=["lora", "full"], required=True)
    p.add_argument("--mode", choices=["default", "best"], required=True)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="mode best: bf16 autocast (the default) or fp32; mode default is always fp32")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (mode default)")
    p.add_argument("--batches", default=None, help="JSON list of sample-index lists, one per step (mode best)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write this run's figures (JSON)")
    args = p.parse_args()
    if args.mode == "best" and not args.batches:
        p.error("--mode best needs --batches")
    return args


def main() -> int:
    args = parse_args()
    precision = (args.precision or "bf16") if args.mode == "best" else "fp32"

    import torch

    torch.set_num_threads(args.threads)
    import peft
    import transformers
    from torch.utils.data import DataLoader
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              DataCollatorWithFlattening, Trainer, TrainingArguments)

    t_start = time.perf_counter()
    total = args.warmup + args.steps
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    samples = load_samples(args.data, tokenizer, args.max_length)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False  # without a cache, transformers turns restarting position ids into a block mask
    if args.setup == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 bias="none", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameters = sum(p.numel() for p in model.parameters())

    batches = None
    if args.mode == "default":
        collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        if len(samples) < total * args.batch_size:
            raise SystemExit(f"{args.data}: {len(samples)} samples, {total} steps of {args.batch_size} asked for")
    else:
        batches = json.loads(Path(args.batches).read_text())
        if len(batches) < total:
            raise SystemExit(f"{args.batches}: {len(batches)} batches, {total} steps asked for")
        collator = CountingCollator(DataCollatorWithFlattening())

    class PlannedBatchesTrainer(Trainer):
        """The Trainer with a given list of batches (variable sample counts, about equal tokens)."""

        def get_train_dataloader(self):
            if batches is None:
                return super().get_train_dataloader()
            loader = DataLoader(self.train_dataset, batch_sampler=batches[:total], collate_fn=self.data_collator,
                                num_workers=0)
            return self.accelerator.prepare(loader)

    clock = step_clock()
    targs = TrainingArguments(
        output_dir=str(Path(args.out).parent / f"hf-{args.setup}-{args.mode}-trainer"),
        max_steps=total, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.lr, max_grad_norm=1.0, bf16=precision == "bf16", use_cpu=True,
        train_sampling_strategy="sequential",  # the file order, as tunesmith with data.shuffle=false
        dataloader_num_workers=0, remove_unused_columns=False, eval_strategy="no", save_strategy="no",
        logging_strategy="steps", logging_steps=10**6, report_to=[], disable_tqdm=True, seed=args.seed,
    )
    trainer = PlannedBatchesTrainer(model=model, args=targs, train_dataset=samples, data_collator=collator,
                                    callbacks=[clock])
    trainer.train()
    result = {
        "setup": args.setup, "mode": args.mode, **step_figures(clock, collator, args.warmup, args.steps),
        "wall_s_inside": time.perf_counter() - t_start, "threads": torch.get_num_threads(),
        "trainable": trainable, "parameters": parameters, "bf16": precision == "bf16", "optim": str(targs.optim),
        "precision": "bf16 autocast" if precision == "bf16" else "fp32",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"[hf-{args.mode}] {args.setup} {precision}: {result['trained_tokens_per_s']:.0f} trained tokens/s, "
          f"{result['s_per_step']:.2f} s/step, VmHWM {result['peak_rss_gb_inside']:.2f} GB, "
          f"allocator {result['allocator']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

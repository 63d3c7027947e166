"""The ratio baseline of the GPU check: TRL's `SFTTrainer` (+ Liger's kernels when installed) on the
same model folder, data and GPU as `tunesmith bench`, configured as TRL's docs recommend for speed.

    python benchmarks/gpu/trl_baseline.py --model FOLDER --data text.jsonl --setup lora --json OUT.json

- packing into rows of `--max-length` tokens (tunesmith's `train.batch_tokens`), TRL's default
  best-fit-decreasing strategy, padding-free (position ids restart per document), one row per step;
- bf16 (autocast, fp32 master weights), no gradient checkpointing (memory is plentiful at 1B);
- `use_liger_kernel=True` when `liger-kernel` imports (Liger's RMSNorm, SwiGLU, RoPE and fused
  linear + cross-entropy patched into the Llama model); `--no-liger` measures TRL alone;
- attention: `--attn` (`sdpa` by default: transformers builds the packed rows' block-causal mask
  from the position ids; `flash_attention_2` needs the flash-attn package);
- LoRA as tunesmith's recipe: r=16, alpha 32, dropout 0, all linear layers (PEFT).

Timing: the optimizer steps after `--warmup` untimed ones, each closed by a CUDA synchronise;
tokens are the rows' non-padding tokens. Peak memory: torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help='JSONL of {"text": ...}')
    p.add_argument("--setup", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-length", type=int, default=16384, help="tokens per packed row")
    p.add_argument("--doc-length", type=int, default=2048, help="cut documents to this many tokens first")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--no-liger", action="store_true")
    p.add_argument("--cpu", action="store_true", help="the dry run: fp32 on the CPU")
    p.add_argument("--json")
    return p.parse_args()


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


class StepClock:
    """A TrainerCallback timing each optimizer step (synchronised) and counting its tokens."""

    def __init__(self, cuda: bool):
        self.cuda, self.times, self._t = cuda, [], None

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock._sync()
                clock._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock._sync()
                clock.times.append(time.perf_counter() - clock._t)

        return _Clock()

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def load_rows(path: str, tokenizer, doc_length: int):
    from datasets import Dataset

    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:doc_length] for t in texts]
    return Dataset.from_dict({"input_ids": ids}), sum(len(x) for x in ids)


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    liger = not args.no_liger and liger_available() and not args.cpu
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data, n_tokens = load_rows(args.data, tokenizer, args.doc_length)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    peft_config = None
    if args.setup == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir="/tmp/trl-baseline", max_steps=args.warmup + args.steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
        bf16=not args.cpu, use_cpu=args.cpu, gradient_checkpointing=False, packing=True, padding_free=True,
        max_length=args.max_length, use_liger_kernel=liger, logging_steps=1000, save_strategy="no",
        report_to="none", dataloader_num_workers=0, seed=0, dataset_num_proc=1)
    clock = StepClock(cuda=not args.cpu)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock.callback()])
    rows = trainer.get_train_dataloader()
    # the rows the trainer will draw (same seeded sampler): padding-free rows hold no padding
    row_tokens = [b["input_ids"].numel() if "position_ids" in b else int(b["attention_mask"].sum())
                  for _, b in zip(range(args.warmup + args.steps), rows)]
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = clock.times[args.warmup:]
    tokens = sum(row_tokens[args.warmup:args.warmup + len(timed)])
    figures = {"system": "trl" + ("+liger" if liger else ""), "setup": args.setup, "attn": args.attn,
               "steps": len(timed), "s_per_step": sum(timed) / max(len(timed), 1),
               "tokens_per_s": tokens / max(sum(timed), 1e-9),
               "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if not args.cpu else None,
               "row_tokens": row_tokens, "data_tokens": n_tokens, "step_s": clock.times,
               "versions": versions()}
    print(json.dumps({k: v for k, v in figures.items() if k not in ("row_tokens", "step_s")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "liger-kernel"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()

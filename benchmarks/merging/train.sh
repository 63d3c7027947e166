#!/usr/bin/env bash
# Every model of the "many models into one" benchmark, built on the CPU (run from the repository root,
# after `python benchmarks/merging/run.py data`):   nice -n 5 bash benchmarks/merging/train.sh
# A row whose output exists is skipped, so the script resumes. Sized for 2 shared CPU cores: the
# quickstart recipe (LoRA r16 on every linear layer, 1024-token packed steps, lr 1e-3 cosine) cut to
# 30 steps per specialist, 60 steps (the two specialists' total) for multi-task SFT on the mixed
# sql+json data (runs/merging/multitask.jsonl, each record with its `domain`), 30 for the other routes.
set -euo pipefail
W=runs/merging
export OMP_NUM_THREADS=1
Q="recipes/quickstart.yaml output_dir=$W train.eval_every=0 train.threads=1 train.save_every=1000"
MIX="data.train=$W/multitask.jsonl data.validation=$W/multitask-val.jsonl train.steps=60"
# The routes into one model other than multi-task SFT ran at 30 steps: on the shared CPU (load 5-11
# from other jobs) a 60-step run took 15-25 min, which the time available did not hold for five routes.
HALF="data.train=$W/multitask.jsonl data.validation=$W/multitask-val.jsonl train.steps=30"
mkdir -p $W/times

timed() {  # timed NAME CMD...: run CMD, write its wall seconds to $W/times/NAME.s
  local name=$1 t0; shift; t0=$(date +%s.%N)
  "$@"
  python -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$(date +%s.%N)" > $W/times/$name.s
}

# the two specialists and naive multi-task SFT
[ -d $W/sql/adapter ] || tunesmith train $Q name=sql train.steps=30
[ -d $W/json/adapter ] || tunesmith train $Q name=json train.steps=30 data.train=task:json/train \
  data.validation=task:json/validation eval.task=json
[ -d $W/multitask/adapter ] || tunesmith train $Q $MIX name=multitask

# merges of the two specialists' LoRA adapters (tunesmith merge)
for m in linear task-arithmetic ties dare slerp; do
  [ -f benchmarks/merging/merge-$m.yaml ] || continue
  [ -d $W/merge-$m ] || timed merge-$m tunesmith merge benchmarks/merging/merge-$m.yaml
done

# MoE upcycling, E = 2: every MLP becomes two experts (full copies) that train; learned top-2 router
# (load-balance 0.01, z 0.001) vs enforced routing by the record's domain. Experts train fully, so at
# the full-tuning learning rate 1e-4 rather than LoRA's 1e-3.
[ -d $W/moe-learned/adapter ] || tunesmith train $Q $HALF name=moe-learned method.name=moe method.moe.experts=2 \
  method.moe.routing=learned method.moe.top_k=2 train.lr=1e-4

[ -d $W/moe-enforced/adapter ] || tunesmith train $Q $HALF name=moe-enforced method.name=moe method.moe.experts=2 \
  method.moe.routing=enforced train.lr=1e-4

# MoE-LoRA: two LoRA experts (r16, alpha 32) on every frozen MLP, learned top-2 router
[ -d $W/moe-lora/adapter ] || tunesmith train $Q $HALF name=moe-lora method.name=moe_lora method.moe_lora.experts=2 \
  method.moe_lora.routing=learned method.moe_lora.top_k=2 method.moe_lora.rank=16 method.moe_lora.alpha=32

# multi-source knowledge fusion: the two specialists distilled into one LoRA student through the gate
[ -d $W/fusion/adapter ] || tunesmith train recipes/knowledge-fusion.yaml output_dir=$W name=fusion \
  train.eval_every=0 train.threads=1 train.save_every=1000 train.steps=30

# depth up-scaling: layers 12-17 repeated after themselves (30 -> 36 layers, Yi-style, no identity init),
# then the multi-task LoRA run on the grown model
[ -f $W/grown/config.json ] || timed grown tunesmith grow --model smollm2-135m-instruct --repeat 12:18 --output $W/grown
[ -d $W/grow/adapter ] || tunesmith train $Q $HALF name=grow model.name=$W/grown

#!/usr/bin/env bash
# The four models of the fusion benchmark, built on the CPU (run from the repository root):
#   nice -n 5 bash benchmarks/fusion/train.sh
# small-pruned: SmolLM2-135M-Instruct cut to 10 of its 30 decoder layers; heal: that model distilled
# from the full one (non-sql data); expert: the healed small model LoRA-tuned on the sql task with the
# quickstart recipe; large-tuned: the full model tuned with the same recipe and step count (upper bound).
set -euo pipefail
STEPS=${STEPS:-30}
python - <<'PY'  # heal data: generic chats + the json task's train split, never sql
import json, random
from pathlib import Path
from tunesmith.data.tasks import get_task
rows = [json.loads(l) for l in open("examples/chat.jsonl")]
rows += [{"messages": [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.reference}]}
         for e in get_task("json", seed=0).examples("train")]
random.Random(0).shuffle(rows)
Path("runs/fusion").mkdir(parents=True, exist_ok=True)
Path("runs/fusion/heal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
PY
[ -f runs/fusion/small-pruned/config.json ] || tunesmith prune --model smollm2-135m-instruct --keep 10 --output runs/fusion/small-pruned
# heal.yaml plans 40 steps; on the shared 2-core CPU (~50 s a step) the measured run was stopped with
# Ctrl-C after step 16 and its last checkpoint written out as the small base:
[ -d runs/fusion/heal/checkpoints ] || tunesmith train benchmarks/fusion/heal.yaml
[ -f runs/fusion/small-healed/config.json ] || python benchmarks/fusion/checkpoint_to_model.py \
    runs/fusion/small-pruned "$(ls -d runs/fusion/heal/checkpoints/step-* | sort -V | tail -1)" runs/fusion/small-healed
SQL="recipes/quickstart.yaml output_dir=runs/fusion train.steps=$STEPS train.save_every=$STEPS train.eval_every=0"
[ -d runs/fusion/expert/adapter ] || tunesmith train $SQL name=expert model.name=runs/fusion/small-healed
[ -d runs/fusion/large-tuned/adapter ] || tunesmith train $SQL name=large-tuned

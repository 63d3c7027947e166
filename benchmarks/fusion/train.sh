#!/usr/bin/env bash
# The four models of the fusion benchmark, built on the CPU (run from the repository root):
#   nice -n 5 bash benchmarks/fusion/train.sh
# small-pruned: SmolLM2-135M-Instruct cut to 10 of its 30 decoder layers; heal: that model distilled
# from the full one (non-sql data); expert: the healed small model LoRA-tuned on the sql task with the
# quickstart recipe; large-tuned: the full model tuned with the same recipe and step count (upper bound).
set -euo pipefail
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
[ -f runs/fusion/heal/model/config.json ] || tunesmith train benchmarks/fusion/heal.yaml  # -> runs/fusion/heal/model
# the quickstart recipe as it is (one epoch of the sql train split, 102 steps); no mid-run validation
SQL="recipes/quickstart.yaml output_dir=runs/fusion train.eval_every=0 train.threads=1"
[ -d runs/fusion/expert/adapter ] || tunesmith train $SQL name=expert model.name=runs/fusion/heal/model
[ -d runs/fusion/large-tuned/adapter ] || tunesmith train $SQL name=large-tuned

#!/usr/bin/env bash
# GPU check, one call of a lent GPU (< 9 minutes): the CUDA paths and the speed table.
#
#   bash benchmarks/gpu/check.sh [OUT_DIR] [CONFIG_AND_TOKENIZER_FOLDER]
#   DRY=1 bash benchmarks/gpu/check.sh /tmp/dry      # the same parts on the CPU, tiny sizes
#
# Parts, in order of priority; each is time-boxed (`timeout`), logged to its own file, and skipped
# when too little of the whole budget is left; a failure is recorded and the next part runs:
#   machine       GPU, versions, which variable-length attention kernels this torch has
#   models        random-weight models (make_model.py: the ~1.1B scale-up of the embedded model) and text
#   tests-varlen  tests/test_varlen.py on the GPU: each CUDA kernel against packed attention, fused losses
#   peak          the measured bf16 matmul peak (MFU's denominator)
#   bench-1b-lora, bench-1b-full   tunesmith bench: varlen attention + fused linear/CE (LOSS_KERNEL)
#   trl-1b-lora   TRL SFTTrainer + Liger on the same model/data/GPU (trl_baseline.py): the ratio baseline
#   llama8b-lora  an 8B Llama-architecture model, random bf16 weights, LoRA (llama8b.py)
#   qlora         benchmarks/gpu/qlora_check.py, when it exists
#   bench-1b-lora-packed   the old per-row gather (TUNESMITH_VARLEN=packed): the A/B of the kernel
#   bench-1b-lora-compile  regional compile (train.compile=true) on top
#   trl-1b-full   TRL full fine-tuning
#   tests-train   tests/test_train.py tests/test_method_invariants.py on the GPU
# FSDP2 (+ compile) needs two GPUs; with one it is skipped (its CPU path: tests/test_varlen.py, gloo).
#
# Results: OUT_DIR/summary.txt (one line per part: status, seconds), OUT_DIR/check.log (all output)
# and OUT_DIR/results.tgz (every part's log and JSON; rewritten after each part, so a run cut short
# still returns what it measured). OUT_DIR defaults to $OUT (the lent machine's return folder).
# Missing Python packages travel as wheels in .whl/ (benchmarks/gpu/wheels.sh fills it here); they
# are installed into /tmp/site first. Knobs (environment): BUDGET [510 s; DRY 3600], BOX_SCALE [1; DRY 4]
# (every part's time box times this), SIZES [1b],
# STEPS [6], WARMUP [2], BATCH_TOKENS [16384], MAX_LENGTH [2048], LOSS_KERNEL [auto], EXTRA [],
# ONLY [] (run only the parts named), SKIP [] (parts to leave out), WORK [a temporary folder].
set -u
OUTDIR=${1:-${OUT:-benchmarks/gpu/results/latest}}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ -n "${DRY:-}" ] && PY=.venv/bin/python
START=$(date +%s)
W=${WORK:-$(mktemp -d)}; RES="$W/results"
mkdir -p "$OUTDIR" "$RES"
exec > >(tee -a "$OUTDIR/check.log") 2>&1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SRC=${2:-$($PY -c 'from tunesmith.models.load import resolve; print(resolve("smollm2-135m-instruct"))')}
if [ -n "${DRY:-}" ]; then
  BUDGET=${BUDGET:-3600}; BOX_SCALE=${BOX_SCALE:-4}; SIZES=${SIZES:-tiny}; STEPS=${STEPS:-2}; WARMUP=${WARMUP:-1}; DOCS=${DOCS:-60}
  BATCH_TOKENS=${BATCH_TOKENS:-512}; MAX_LENGTH=${MAX_LENGTH:-128}; BIG=tiny; DEV=cpu
  EXTRA=${EXTRA:-train.device=cpu train.precision=fp32 model.frozen_dtype=same}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  BUDGET=${BUDGET:-510}; BOX_SCALE=${BOX_SCALE:-1}; SIZES=${SIZES:-1b}; STEPS=${STEPS:-6}; WARMUP=${WARMUP:-2}; DOCS=${DOCS:-1500}
  BATCH_TOKENS=${BATCH_TOKENS:-16384}; MAX_LENGTH=${MAX_LENGTH:-2048}; BIG=8b; DEV=cuda; EXTRA=${EXTRA:-}
fi
LOSS_KERNEL=${LOSS_KERNEL:-auto}; ONLY=${ONLY:-}; SKIP=${SKIP:-}
# The tests' tokenizer is the embedded model's: give them its files (no weights needed) in a fresh cache.
export TUNESMITH_CACHE="$W/cache"
mkdir -p "$TUNESMITH_CACHE/models/smollm2-135m-instruct"
cp "$SRC"/config.json "$SRC"/tokenizer* "$TUNESMITH_CACHE/models/smollm2-135m-instruct/"
cp "$SRC"/chat_template.jinja "$TUNESMITH_CACHE/models/smollm2-135m-instruct/" 2>/dev/null
: > "$OUTDIR/summary.txt"

# part NAME SECONDS COMMAND...: run COMMAND under `timeout`, its output in $RES/NAME.txt, unless the
# budget is spent (it gets at most what is left) or ONLY/SKIP leave it out; a line in summary.txt.
part() {
  local name=$1 box=$2; shift 2
  case " $SKIP " in *" $name "*) echo "$name skipped (SKIP)" >> "$OUTDIR/summary.txt"; return 0;; esac
  if [ -n "$ONLY" ]; then case " $ONLY " in *" $name "*) ;; *) return 0;; esac; fi
  local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  if [ "$left" -lt 30 ]; then echo "$name skipped (budget: ${left}s left)" >> "$OUTDIR/summary.txt"; return 0; fi
  box=$(( box * BOX_SCALE )); [ "$box" -gt "$left" ] && box=$left
  echo; echo "=== $name (box ${box}s, $(date +%T))"
  local t0=$(date +%s) rc
  timeout -k 10 "$box" bash -c '"$@"' _ "$@" > "$RES/$name.txt" 2>&1; rc=$?  # functions too (export -f)
  tr '\r' '\n' < "$RES/$name.txt" | grep -v "tokenizing\|^Loading\|Warning\|warn(" | tail -n 14
  local how=ok; [ $rc -ne 0 ] && how="FAILED rc=$rc"; [ $rc -eq 124 ] || [ $rc -eq 137 ] && how="TIMED OUT (${box}s)"
  echo "$name $how $(( $(date +%s) - t0 ))s" | tee -a "$OUTDIR/summary.txt"
  tar czf "$OUTDIR/results.tgz" -C "$RES" . 2>/dev/null
}

bench() {  # bench NAME SIZE METHOD [overrides...]: tunesmith bench on the text rows
  local name=$1 size=$2 method=$3; shift 3
  $PY -m tunesmith bench "recipes/$method-sft.yaml" "train.loss_kernel=$LOSS_KERNEL" \
    "steps=$STEPS" "warmup=$WARMUP" "model.name=$W/m$size" "data.train=$W/text.jsonl" data.format=text \
    data.val_fraction=0 "data.max_length=$MAX_LENGTH" "train.batch_tokens=$BATCH_TOKENS" $EXTRA "$@" \
    --json "$RES/$name.json"
}

machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY - <<'EOF'
import importlib.metadata as md, torch
from tunesmith.models import varlen
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "trl", "liger-kernel", "flash-attn", "bitsandbytes", "triton"):
    try: print(name, md.version(name))
    except md.PackageNotFoundError: print(name, "-")
print("varlen kernels installed:", [b for b in varlen.BACKENDS if varlen.backend_available(b)])
EOF
}

models() {
  [ -f "$W/text.jsonl" ] || $PY benchmarks/gpu/make_model.py --text "$W/text.jsonl" --docs "$DOCS" || return 1
  for size in $SIZES; do
    [ -f "$W/m$size/config.json" ] || $PY benchmarks/gpu/make_model.py --src "$SRC" --out "$W/m$size" --size "$size" || return 1
  done
}

trl() {  # trl SETUP: TRL on the first size's model
  local cpu=; [ "$DEV" = cpu ] && cpu=--cpu
  $PY benchmarks/gpu/trl_baseline.py --model "$W/m${SIZES%% *}" --data "$W/text.jsonl" --setup "$1" \
    --steps "$STEPS" --warmup "$WARMUP" --max-length "$BATCH_TOKENS" --doc-length "$MAX_LENGTH" $cpu --json "$RES/trl-$1.json"
}

S=${SIZES%% *}
export -f bench machine models trl
export PY STEPS WARMUP W RES MAX_LENGTH BATCH_TOKENS EXTRA LOSS_KERNEL DEV SIZES SRC DOCS
part machine 60 machine
part models 150 models
part tests-varlen 150 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/test_varlen.py
[ "$DEV" = cuda ] && part peak 60 $PY -m tunesmith bench --peak
part "bench-$S-lora" 150 bench "bench-$S-lora" "$S" lora
part "bench-$S-full" 150 bench "bench-$S-full" "$S" full
part "trl-$S-lora" 180 trl lora
part "llama$BIG-lora" 180 $PY benchmarks/gpu/llama8b.py --size "$BIG" --device "$DEV" --tokenizer "$W/m$S" \
  --data "$W/text.jsonl" --steps "$((STEPS > 4 ? 4 : STEPS))" --warmup "$WARMUP" \
  --batch-tokens "$((BATCH_TOKENS / 2))" --max-length "$MAX_LENGTH" --json "$RES/llama$BIG-lora.json"
[ -f benchmarks/gpu/qlora_check.py ] && [ "$DEV" = cuda ] && part qlora 150 env OUT="$RES" $PY benchmarks/gpu/qlora_check.py
part "bench-$S-lora-packed" 150 env TUNESMITH_VARLEN=packed bash -c 'bench "$@"' _ "bench-$S-lora-packed" "$S" lora
part "bench-$S-lora-compile" 240 bench "bench-$S-lora-compile" "$S" lora train.compile=true
part "trl-$S-full" 180 trl full
part tests-train 240 $PY -m pytest -q -p no:cacheprovider -k "not embedded" tests/test_train.py tests/test_method_invariants.py
echo; echo "=== summary ($(( $(date +%s) - START ))s of ${BUDGET}s)"; cat "$OUTDIR/summary.txt"
tar czf "$OUTDIR/results.tgz" -C "$RES" . 2>/dev/null

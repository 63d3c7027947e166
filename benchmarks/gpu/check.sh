#!/usr/bin/env bash
# GPU check, one call: the CUDA training paths (bf16 autocast, packed attention, checkpoints and
# resume, every method's invariants) and the speed table (tokens/s, memory, MFU against the
# measured bf16 matmul peak) for LoRA and full fine-tuning on the embedded model's architecture
# and a ~1B scale-up of it, both with random weights (speed does not depend on their values).
#
#   bash benchmarks/gpu/check.sh OUT_DIR [CONFIG_AND_TOKENIZER_FOLDER]
#
# The folder defaults to the embedded model's cached copy. Environment knobs (defaults in brackets):
# SIZES [135m 1b], METHODS [lora full], STEPS [10], WARMUP [3], BATCH_TOKENS [16384],
# MAX_LENGTH [2048], EXTRA [] (more overrides for every bench), TAG [] (added to the file names),
# WORK [a temporary folder] (models and data, reused when present), TESTS [tests/test_train.py tests/test_method_invariants.py], TEST_TIMEOUT [240].
set -u
OUT=${1:?usage: check.sh OUT_DIR [FOLDER]}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SRC=${2:-$($PY -c 'from tunesmith.models.load import resolve; print(resolve("smollm2-135m-instruct"))')}
SIZES=${SIZES:-135m 1b}; METHODS=${METHODS:-lora full}; STEPS=${STEPS:-10}; WARMUP=${WARMUP:-3}
BATCH_TOKENS=${BATCH_TOKENS:-16384}; MAX_LENGTH=${MAX_LENGTH:-2048}
TESTS=${TESTS-tests/test_train.py tests/test_method_invariants.py}; TEST_TIMEOUT=${TEST_TIMEOUT:-240}
EXTRA=${EXTRA:-}; TAG=${TAG:-}
W=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
# The tests' tokenizer is the embedded model's: give them its files (no weights needed) in a fresh cache.
export TUNESMITH_CACHE="$W/cache"
mkdir -p "$TUNESMITH_CACHE/models/smollm2-135m-instruct"
cp "$SRC"/config.json "$SRC"/tokenizer* "$TUNESMITH_CACHE/models/smollm2-135m-instruct/"
cp "$SRC"/chat_template.jinja "$TUNESMITH_CACHE/models/smollm2-135m-instruct/" 2>/dev/null

section() { echo; echo "=== $* ($(date +%T))"; }
section machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'

section models and data
[ -f "$W/text.jsonl" ] || $PY benchmarks/gpu/make_model.py --text "$W/text.jsonl" --docs 1500
for size in $SIZES; do
  [ -f "$W/m$size/config.json" ] || $PY benchmarks/gpu/make_model.py --src "$SRC" --out "$W/m$size" --size "$size"
done

if [ -z "${SKIP_PEAK:-}" ]; then section matmul peak; $PY -m tunesmith bench --peak 2>&1 | tee "$OUT/peak.txt"; fi

for size in $SIZES; do
  for method in $METHODS; do
    name="bench-$size-$method$TAG"
    section "$name $EXTRA"
    $PY -m tunesmith bench "recipes/$method-sft.yaml" "steps=$STEPS" "warmup=$WARMUP" \
      "model.name=$W/m$size" "data.train=$W/text.jsonl" data.format=text data.val_fraction=0 \
      "data.max_length=$MAX_LENGTH" "train.batch_tokens=$BATCH_TOKENS" $EXTRA --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
    tr '\r' '\n' < "$OUT/$name.txt" | grep -v "tokenizing\|^Loading\|^\[tunesmith\]" | tail -n 12
  done
done

if [ -n "$TESTS" ]; then
  section "tests on this device: $TESTS"
  # (the tests that need the embedded model's real weights are left out: the weights do not travel)
  timeout "$TEST_TIMEOUT" $PY -m pytest -q -p no:cacheprovider -k "not embedded" $TESTS > "$OUT/tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.txt" | tail -n 25
fi
section done

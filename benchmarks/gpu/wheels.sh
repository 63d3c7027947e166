#!/usr/bin/env bash
# Fill .whl/ (ignored by git through .git/info/exclude) with the wheels the GPU check needs that the
# lent machine's image lacks (it has torch, triton, peft, accelerate, pyarrow, ... but no trl, Liger,
# pydantic or gguf, and an older transformers); check.sh installs them into /tmp/site there.
# Run here, where PyPI is reachable, before the device call; the wheels travel with the working tree
# (`carry: [".whl"]`, 64 MiB in all). The lent machine's Python is 3.12 (x86-64, manylinux).
#
#   bash benchmarks/gpu/wheels.sh
set -eu
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
TRANSFORMERS=${TRANSFORMERS:-$($PY -c 'import transformers; print(transformers.__version__)')}
# pure-Python wheels first (any platform), then the compiled ones for CPython 3.12 on manylinux
PURE="transformers==$TRANSFORMERS trl liger-kernel datasets dill multiprocess gguf rank-bm25 datasketch
      annotated-types typing-inspection"
BINARY="pydantic-core pydantic"
for spec in $PURE; do
  $PY -m pip download -q --no-deps --only-binary=:all: -d .whl "$spec"
done
for spec in $BINARY; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
# one version of each (pydantic pins pydantic-core: keep the pair pip resolved last)
ls -la .whl; du -sh .whl

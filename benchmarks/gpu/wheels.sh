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
# the versions this project's environment runs (they agree with each other), as CPython 3.12 wheels
NAMES="transformers trl liger-kernel datasets dill multiprocess gguf rank-bm25 datasketch pydantic pydantic-core
       annotated-types typing-inspection typing-extensions"
rm -f .whl/*.whl
for name in $NAMES; do
  version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || version=
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name${version:+==$version}"
done
ls -la .whl; du -sh .whl

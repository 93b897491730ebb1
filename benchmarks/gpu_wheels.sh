#!/usr/bin/env bash
# The wheels a lent GPU machine needs for gpu_check.sh (megatron-core for its megatron part), into DIR (default .whl; ignore it in
# git: echo /.whl/ >> .git/info/exclude). The machine's image has torch, transformers,
# Triton and most of their needs, but not DeepSpeed, and it cannot reach a package registry,
# so these travel with the call (carry [".whl"]). Run here, where pip reaches the registry:
#
#   bash benchmarks/gpu_wheels.sh [DIR]
#
# then, on the machine (Python 3.12 there):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
#   bash benchmarks/gpu_check.sh /tmp/x && tar czf $OUT/gpu.tgz -C /tmp/x --exclude='work*' .
#
# Versions are this project's (the .venv's) so the machine runs what the tests ran here.
set -eu
DIR=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for name in hjson pydantic pydantic_core annotated_types typing_inspection datasets dill multiprocess megatron_core; do
    pins+=("$name==$(version "$name")")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DIR" "${pins[@]}"
# DeepSpeed is published as a source distribution: build a pure-Python wheel of it (its ops
# are JIT-built on the machine when a part needs one, e.g. FusedLamb)
"$PY" -m pip wheel -q --no-deps "deepspeed==$(version deepspeed)" -w "$DIR"
ls -l "$DIR"
du -sh "$DIR"

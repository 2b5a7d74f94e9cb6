#!/usr/bin/env bash
# Wheels of what the GPU machine's image lacks, for benchmarks/gpu_check.sh, into .whl/ (git
# ignores it; carry it to the device). Its image has Python 3.12 with torch, transformers,
# tokenizers, safetensors, tensorboard, numpy, pyarrow, psutil, py-cpuinfo, msgpack, einops
# and ninja, but not DeepSpeed, Hydra/OmegaConf (with the antlr runtime), hjson or pydantic.
# The versions are this machine's, so both sides run the same code. Needs the network.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pure=()
for name in deepspeed hydra-core omegaconf antlr4-python3-runtime hjson pydantic \
            annotated-types typing-inspection; do
    pure+=("$name==$(version "$name")")
done
mkdir -p .whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "${pure[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "pydantic_core==$(version pydantic_core)"
ls .whl

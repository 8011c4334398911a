#!/usr/bin/env bash
# On the GPU host (no network): install the vLLM 0.26 bundle staged in /tmp/stage, build
# the 7B-shaped model dirs, and run the TTFT benchmark for one of them.
# usage: benchmarks/gpu/run.sh {stage PART...|install|lmcache|MODEL [ttft.py args]}
#   MODEL: llava7b, gqa7b, qwen35_9b, gemma3_12b, dsv2lite (each built on first use)
# Parts are made here with: benchmarks/gpu/build-bundle.sh .gpu-bundle
set -u
STAGE=/tmp/stage SITE=/tmp/site MODELS=/tmp/models OUT=${OUT:-/tmp/out}
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH=$SITE VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 \
       VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$STAGE" "$OUT"
declare -A KV_BYTES=([llava7b]=524288 [gqa7b]=57344 [qwen35_9b]=32768 [gemma3_12b]=393216
                     [dsv2lite]=31104)  # KV bytes per token (a recurrent state is per request)
case ${1:?usage: run.sh stage PART...|install|lmcache|MODEL} in
  stage) shift; cp "$@" "$STAGE"/ && ls -la "$STAGE" ;;
  install)
    bash "$here/install-bundle.sh" "$STAGE" "$SITE" || exit 1
    # kvshelf as a user installs it (wheel made here: pip wheel --no-deps -w .gpu-bundle .):
    # vLLM then finds "KVShelfConnector" by name through kvshelf's plugin entry point.
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STAGE"/kvshelf-*.whl || exit 1
    python3 -c 'import kvshelf, vllm.plugins as p; p.load_general_plugins()
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F
print("kvshelf from", kvshelf.__file__, "registered:", "KVShelfConnector" in F._registry)'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h /tmp; free -g ;;
  lmcache)
    W=$(mktemp -d); cat "$STAGE"/lmcache.part.* | tar xf - -C "$W"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$W"/lmcache/*.whl
    python3 -c 'import lmcache; print("lmcache", lmcache.__version__)' ;;
  page)
    exec python3 "$here/reference.py" "$MODELS" "$OUT/page" "${@:2}" ;;
  llava7b|gqa7b|qwen35_9b|gemma3_12b|dsv2lite)
    [ -d "$MODELS/$1" ] || python3 "$here/models.py" "$MODELS/$1" "$1" || exit 1
    exec python3 "$here/ttft.py" "$MODELS/$1" --out "$OUT" --kv-bytes-per-token "${KV_BYTES[$1]}" "${@:2}" ;;
esac

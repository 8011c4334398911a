#!/bin/bash
# Build the offline kit that lower-tiers.sh needs on a GPU host with no network: the wheels
# of kvshelf's runtime dependencies and rich (its tables), the kvshelf wheel, a static fio
# (built from Debian's source: the Debian binary links ~80 MiB of optional engines such as
# librbd and glusterfs), and Debian's redis-server with every library it links beyond glibc.
# numpy and torch are not in it: the host has them. Nor is matplotlib (~25 MiB with its
# dependencies): the benchmarks then write no plot, only JSON and tables.
# usage: lower-tiers-kit.sh DEST [PYTHON_VERSION]     (default 3.12; run where PyPI and the
#        Debian archive are reachable, on Debian/Ubuntu x86-64 with gcc, make and zlib1g-dev)
# DEST: bin/{fio,redis-server}, lib/*.so*, wheels/*.whl, MANIFEST; must stay <= 55 MiB.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
DEST=${1:?usage: lower-tiers-kit.sh DEST [PYTHON_VERSION]}
PYVER=${2:-3.12}
abi=cp${PYVER/./}
LIMIT_MIB=55
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"  # apt downloads as the _apt user where it can
if [ -d "$DEST" ] && [ -n "$(ls -A "$DEST")" ] && [ ! -e "$DEST/MANIFEST" ]; then
  echo "$DEST holds files but no kit: give an empty or new folder" >&2; exit 1
fi
rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/lib" "$DEST/wheels"
DEST=$(cd "$DEST" && pwd)

pipdl() {
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null python3 -m pip download -q -d "$1" \
    --python-version "$PYVER" --implementation cp --abi "$abi" --abi abi3 --abi none \
    --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 \
    --platform manylinux1_x86_64 --platform any "${@:2}"
}

echo "== wheels (python $PYVER)"
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null python3 -m pip wheel -q --no-deps \
  -w "$WORK/kvshelf" "$root"
# One resolution for kvshelf's dependencies and rich's, so that pinned pairs such as
# pydantic / pydantic-core match; then numpy goes: the host's torch came with its own.
pipdl "$DEST/wheels" "$WORK"/kvshelf/kvshelf-*.whl rich
rm -f "$DEST"/wheels/numpy-*.whl

echo "== fio: static, from Debian's source"
apt_private=(-o Dir::Etc::SourceList="$WORK/sources.list" -o Dir::Etc::SourceParts=/nonexistent
  -o Dir::State::Lists="$WORK/lists" -o Dir::Cache="$WORK/cache")
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/src" "$WORK/deb"
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:?}")
source_line="deb-src http://deb.debian.org/debian $suite main"
if [ "$(. /etc/os-release && echo "$ID")" = ubuntu ]; then
  source_line="deb-src http://archive.ubuntu.com/ubuntu $suite main universe"
fi
echo "$source_line" > "$WORK/sources.list"
# A private source list: the system's apt configuration stays as it is.
apt-get -qq "${apt_private[@]}" update
(cd "$WORK/src" && apt-get -qq "${apt_private[@]}" source --download-only fio 2>/dev/null)
(cd "$WORK/deb" && apt-get -qq download libaio-dev redis-tools liblzf1 libjemalloc2 2>/dev/null)
for deb in "$WORK"/deb/*.deb; do dpkg-deb -x "$deb" "$WORK/root"; done
tar xf "$(ls "$WORK"/src/fio_*.orig.tar.* | grep -v '\.asc$')" -C "$WORK/src"
fio_src=$(find "$WORK/src" -maxdepth 1 -type d -name 'fio-*' | head -1)
libdir=$WORK/root/usr/lib/x86_64-linux-gnu
rm -f "$libdir"/libaio.so*  # link libaio.a: the binary then needs no libaio on the host
(cd "$fio_src" && ./configure --build-static --disable-native \
  --extra-cflags="-I$WORK/root/usr/include -L$libdir" > "$WORK/fio-configure.log" \
  && make -j"$(nproc)" fio EXTLIBS="-L$libdir" > "$WORK/fio-make.log" 2>&1) || {
  tail -20 "$WORK/fio-configure.log" "$WORK/fio-make.log"; exit 1; }
install -m 755 "$fio_src/fio" "$DEST/bin/fio"
strip "$DEST/bin/fio"
"$DEST/bin/fio" --enghelp | grep -w libaio > /dev/null

echo "== redis-server: Debian's, with the libraries it links beyond glibc"
# redis-server is a link to redis-check-rdb, which acts on the name it is run by.
install -m 755 "$WORK/root/usr/bin/redis-check-rdb" "$DEST/bin/redis-server"
glibc='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libresolv|libutil)\.so'
LD_LIBRARY_PATH=$libdir ldd "$DEST/bin/redis-server" | awk '$3 ~ /^\// {print $1, $3}' |
  while read -r soname path; do
    [[ $soname =~ $glibc ]] || cp -L "$path" "$DEST/lib/$soname"
  done
if LD_LIBRARY_PATH=$DEST/lib ldd "$DEST/bin/redis-server" | grep -q 'not found'; then
  echo "redis-server: a library is missing from the kit" >&2; exit 1
fi
"$DEST/bin/redis-server" --version

{
  echo "# kvshelf lower-tiers kit, built $(date -u +%FT%TZ) on $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "# kvshelf $(git -C "$root" describe --always --dirty 2>/dev/null || echo '?'); python $PYVER"
  "$DEST/bin/fio" --version
  "$DEST/bin/redis-server" --version
  (cd "$DEST" && find . -type f ! -name MANIFEST -printf '%s\t%p\n' | sort -k2)
} > "$DEST/MANIFEST"
cat "$DEST/MANIFEST"
size=$(du -sb "$DEST" | cut -f1)
echo "kit: $DEST, $((size / 1024 / 1024)) MiB ($size bytes)"
if ((size > LIMIT_MIB * 1024 * 1024)); then
  echo "the kit is over $LIMIT_MIB MiB" >&2; exit 1
fi

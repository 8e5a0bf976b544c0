#!/usr/bin/env bash
# Builds, on a machine with network, everything tests/gpu/run.sh needs on a GPU machine that reaches no package
# registry, into one directory (tests/gpu/bundle/, ignored by git, under 64 MiB):
#   wheels/   this package (release build), and the cloudpickle and uv wheels it depends on, at the versions this
#             checkout's .venv has (what its tests ran with): for pip --no-index and uv's --find-links
#   tools/    bubblewrap and setpriv with the libraries they link (beyond glibc), for a machine without them
# Usage: tests/gpu/prepare.sh   (from anywhere; uses .venv, making it if needed)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUNDLE="$ROOT/tests/gpu/bundle"
VENV="$ROOT/.venv"
LIMIT_MIB=60

cd "$ROOT"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q maturin 'cloudpickle>=3.0,<4' 'uv>=0.4'
cloudpickle_version=$("$VENV/bin/python" -c 'import cloudpickle; print(cloudpickle.__version__)')
uv_version=$("$VENV/bin/python" -m pip show uv | sed -n 's/^Version: //p')

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/tools/lib"

echo "== this package: a release wheel (maturin)"
"$VENV/bin/maturin" build --release --quiet --out "$BUNDLE/wheels"

echo "== cloudpickle $cloudpickle_version and uv $uv_version: wheels for x86-64 Linux, any CPython 3.8+"
"$VENV/bin/pip" download --quiet --no-deps --only-binary=:all: --dest "$BUNDLE/wheels" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --python-version 3.12 --implementation cp \
    "cloudpickle==$cloudpickle_version" "uv==$uv_version"

echo "== bubblewrap and setpriv, with the libraries they link beyond glibc"
for tool in bwrap setpriv; do
    path=$(command -v "$tool") || { echo "prepare.sh: $tool is not installed here (apt-get install bubblewrap util-linux)" >&2; exit 1; }
    cp "$path" "$BUNDLE/tools/$tool"
    # glibc itself (libc, the loader) stays the GPU machine's own; the rest travels.
    ldd "$path" | awk '/=> \// { print $3 }' | grep -vE '/(libc|libm|libdl|libpthread|ld-linux[^/]*)\.so' |
        while read -r lib; do cp -L "$lib" "$BUNDLE/tools/lib/"; done
done

size_kib=$(du -sk "$BUNDLE" | cut -f1)
echo "== bundle: $BUNDLE, $((size_kib / 1024)) MiB"
ls -l "$BUNDLE/wheels" "$BUNDLE/tools" "$BUNDLE/tools/lib"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "prepare.sh: the bundle is over $LIMIT_MIB MiB; a device run carries at most 64 MiB with the repository" >&2
    exit 1
fi

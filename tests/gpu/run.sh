#!/usr/bin/env bash
# On a host with NVIDIA GPUs and no network: installs what tests/gpu/prepare.sh bundled (no network used), then runs
# tests/gpu/run.py, which starts a server and checks its GPU workers, and prints its report.
# Exit: 0 every check passed; 1 a check failed; 2 skipped, with the reason (no NVIDIA GPU on this host, no bundle).
# Needs root for the jail (as the device machine's commands run); unprivileged, or where bubblewrap cannot make a jail,
# it still runs, unjailed, and says so. Arguments go to run.py (--unjailed: run the server's workers unjailed).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUNDLE=${FAL_GPU_BUNDLE:-$ROOT/tests/gpu/bundle}
WORK=$(mktemp -d /tmp/fal-gpu.XXXXXX)
# Under /usr, which every jail shows read-only: the environment builds (jailed) read their wheels from here, and a
# carried setpriv must be where a jail can run it.
SHARE=/usr/local/share/fal-serverless-gpu-test
INSTALLED_SETPRIV=""
cleanup() {
    # The device tool brings back what is under $OUT: the server's log, for a look after the run.
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ -f "$WORK/server.log" ]; then cp "$WORK/server.log" "$OUT/"; fi
    rm -rf "$WORK" "$SHARE"
    if [ -n "$INSTALLED_SETPRIV" ]; then rm -f "$INSTALLED_SETPRIV"; fi
}
trap cleanup EXIT

if [ ! -d "$BUNDLE/wheels" ]; then
    echo "SKIP: no bundle at $BUNDLE; run tests/gpu/prepare.sh on a machine with network first, and carry"
    echo "      tests/gpu/bundle with the run (see tests/gpu/README.md)"
    exit 2
fi
PYTHON=$(command -v python3) || { echo "SKIP: no python3 on this host"; exit 2; }
echo "== installing from $BUNDLE (no network): $(cd "$BUNDLE/wheels" && ls | tr '\n' ' ')"
mkdir -p "$WORK/bin" "$SHARE/wheels" "$SHARE/lib"
# uv from its wheel (a zip) makes the virtualenv: no pip or ensurepip needed on this host.
"$PYTHON" - "$BUNDLE"/wheels/uv-*.whl "$WORK/bin/uv" <<'PY' || { echo "FAIL: could not unpack uv"; exit 1; }
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".data/scripts/uv"))
    with open(sys.argv[2], "wb") as out:
        out.write(wheel.read(name))
PY
chmod 755 "$WORK/bin/uv"
export UV_OFFLINE=1 UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1 UV_CACHE_DIR="$WORK/uv-cache"
"$WORK/bin/uv" venv --quiet --python "$PYTHON" "$WORK/venv" || { echo "FAIL: uv venv --python $PYTHON failed"; exit 1; }
"$WORK/bin/uv" pip install --quiet --python "$WORK/venv/bin/python" --no-index --find-links "$BUNDLE/wheels" \
    fal-serverless || { echo "FAIL: installing fal-serverless from the bundle failed"; exit 1; }

cp "$BUNDLE"/wheels/cloudpickle-*.whl "$SHARE/wheels/"
LOADER=$(ls /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 2>/dev/null | head -1)
if command -v bwrap >/dev/null; then
    echo "== bubblewrap: $(command -v bwrap) ($(bwrap --version 2>&1))"
else
    # The carried one, run by this host's own loader and glibc with the libraries it was built with.
    cp "$BUNDLE/tools/bwrap" "$BUNDLE"/tools/lib/* "$SHARE/lib/"
    printf '#!/bin/sh\nexec %s --library-path %s %s/bwrap "$@"\n' "$LOADER" "$SHARE/lib" "$SHARE/lib" >"$WORK/bin/bwrap"
    chmod 755 "$WORK/bin/bwrap"
    echo "== bubblewrap: not installed here; using the bundle's ($("$WORK/bin/bwrap" --version 2>&1))"
fi
if command -v setpriv >/dev/null; then
    echo "== setpriv: $(command -v setpriv)"
else
    cp "$BUNDLE/tools/setpriv" "$BUNDLE"/tools/lib/* "$SHARE/lib/"
    INSTALLED_SETPRIV=/usr/local/bin/setpriv
    printf '#!/bin/sh\nexec %s --library-path %s %s/setpriv "$@"\n' "$LOADER" "$SHARE/lib" "$SHARE/lib" \
        >"$INSTALLED_SETPRIV" && chmod 755 "$INSTALLED_SETPRIV" || INSTALLED_SETPRIV=""
    echo "== setpriv: not installed here; using the bundle's as ${INSTALLED_SETPRIV:-(could not install it)}"
fi
echo "== cgroups: $(awk '$3 ~ /^cgroup/ {print $3":"$2}' /proc/mounts | tr '\n' ' ')"
if command -v nvidia-smi >/dev/null; then
    echo "== nvidia-smi -L:"; nvidia-smi -L 2>&1 | sed 's/^/   /'
fi
echo "== libcuda.so.1: $(ldconfig -p 2>/dev/null | grep -m1 'libcuda.so.1 ' || echo 'not in the loader cache')," \
    "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

export PATH="$WORK/bin:/usr/local/bin:$PATH"
timeout 300 "$WORK/venv/bin/python" "$ROOT/tests/gpu/run.py" --work "$WORK" --wheels "$SHARE/wheels" "$@"
rc=$?
[ $rc -eq 124 ] && echo "FAIL: run.py did not finish within 300 s"
exit $rc

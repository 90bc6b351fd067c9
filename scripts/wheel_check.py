"""Checks an installed overlay-fuse wheel (scripts/wheel_check.py).

Run with the interpreter of the environment the wheel was installed into,
from outside the source tree:

    python scripts/wheel_check.py [SOURCE_TREE]

It is cibuildwheel's ``test-command`` (see [tool.cibuildwheel] in
pyproject.toml) and step 6 of scripts/wheel_smoke.sh.  It needs no FUSE:

* the extension modules (``overlay_core._core``, the native engine's
  ``overlay.engine.wire`` and ``overlay.engine.bridge``) and the Python
  modules import, from site-packages and not from SOURCE_TREE;
* where pyfuse3 is installed (the ``pyfuse3`` extra), ``overlay.fs`` and
  ``overlay._fuseattr`` import too;
* the console scripts and the ``pytest11`` entry point are registered;
* ``overlay --version`` runs, and ``overlay diff`` / ``overlay commit`` work
  on a small hand-made upper dir (with a whiteout when mknod is allowed).

Exits 0 when everything is fine, 1 with the failures listed otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import importlib.metadata as md
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile

failures: list[str] = []


def check(cond: bool, what: str) -> None:
    print(("ok   " if cond else "FAIL ") + what, file=sys.stderr)
    if not cond:
        failures.append(what)


def main() -> int:
    source = os.path.realpath(sys.argv[1]) if len(sys.argv) > 1 else None
    mods = ["overlay", "overlay_core._core", "overlay.engine", "overlay.engine.wire",
            "overlay.engine.bridge", "overlay.engine.mount", "overlay.serve", "overlay.daemon", "overlay.cli",
            "overlay.api", "overlay.layertools", "overlay.options", "overlay.images.blob", "overlay.images.layer"]
    if importlib.util.find_spec("pyfuse3") is not None:
        mods += ["overlay._fuseattr", "overlay.fs"]
    for name in mods:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failure
            check(False, f"import {name}: {type(exc).__name__}: {exc}")
            continue
        where = os.path.realpath(mod.__file__ or "")
        good = "site-packages" in where and not (source and where.startswith(source + os.sep))
        check(good, f"import {name} from {where}")

    eps = md.entry_points()
    scripts = {e.name: e.value for e in eps.select(group="console_scripts")}
    check(scripts.get("overlay") == "overlay.cli:main", "console script overlay")
    check(scripts.get("overlay-mount") == "overlay.cli:mount_helper_main", "console script overlay-mount")
    plugins = {e.name: e.value for e in eps.select(group="pytest11")}
    check(plugins.get("overlay") == "overlay.pytest_plugin", "pytest11 entry point overlay")

    exe = shutil.which("overlay") or os.path.join(os.path.dirname(sys.executable), "overlay")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
    check(proc.returncode == 0 and proc.stdout.startswith("overlay "), f"overlay --version: {proc.stdout.strip()}")

    d = tempfile.mkdtemp(prefix="wheel-check-")
    try:
        upper = os.path.join(d, "upper")
        os.makedirs(os.path.join(upper, "dir"))
        with open(os.path.join(upper, "dir", "file"), "w") as fh:
            fh.write("x\n")
        expected = ["C /dir", "A /dir/file"]
        try:
            os.mknod(os.path.join(upper, "gone"), stat.S_IFCHR | 0o600, 0)
            expected.append("D /gone")
        except OSError:
            pass  # no CAP_MKNOD here: no whiteout in the test
        proc = subprocess.run([exe, "diff", upper], capture_output=True, text=True)
        check(proc.returncode == 0 and proc.stdout.splitlines() == expected,
              f"overlay diff: {proc.stdout.split()!r} {proc.stderr.strip()}")
        layer = os.path.join(d, "layer.tar.gz")
        proc = subprocess.run([exe, "commit", upper, "-o", layer], capture_output=True, text=True)
        ok = proc.returncode == 0 and os.path.exists(layer)
        names = []
        if ok:
            with tarfile.open(layer) as tar:
                names = tar.getnames()
        want = ["dir", "dir/file"] + ([".wh.gone"] if "D /gone" in expected else [])
        check(ok and sorted(names) == sorted(want), f"overlay commit: {names} {proc.stderr.strip()}")
    finally:
        shutil.rmtree(d, ignore_errors=True)

    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("wheel check: all good", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

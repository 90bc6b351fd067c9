"""``overlay demo``: a self-checking walkthrough of an overlay mount (src/overlay/demo.py).

In a scratch directory it builds the classic example::

    image1/a  "a from image1"      image2/c  "c from image2"
    image1/b  "b from image1"      container/  work/  merge/

mounts ``lowerdir=image2:image1,upperdir=container,workdir=work`` on
``merge`` with ``python -m overlay mount`` (the same background mount a user
gets), then shows step by step, as trees of the merged view and the layers:

1. the merged view of the two images;
2. ``rm merge/a`` leaves a whiteout (``c 0/0``) in ``container``;
3. editing ``image1/b`` in place shows through ``merge/b``;
4. writing to ``merge/b`` copies it up into ``container``;
5. editing ``image1/b`` again no longer shows in ``merge/b``.

Every step checks itself; the demo exits 1 if any check fails.  The mount is
always unmounted and the scratch directory removed (unless ``--keep``), also
after an error or Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from typing import TextIO

log = logging.getLogger(__name__)

# Step titles; tests look for these in the output.
STEP_TITLES = (
    "Step 1: the layers and the merged view",
    "Step 2: rm merge/a leaves a whiteout in container",
    "Step 3: an in-place edit of image1/b shows through merge/b",
    "Step 4: writing to merge/b copies it up into container",
    "Step 5: a later edit of image1/b no longer shows in merge/b",
    "Step 6: unmount",
)
PASSED_LINE = "demo: all checks passed"

A_TEXT = "a from image1\n"
B_TEXT = "b from image1\n"
C_TEXT = "c from image2\n"
B_EDIT_1 = "edited in image1\n"
B_WRITE = "written through merge\n"
B_EDIT_2 = "edited again in image1\n"

MOUNT_TIMEOUT = 120.0
_PREVIEW_CHARS = 60


# --------------------------------------------------------------------------
# tree printer


def _preview(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_PREVIEW_CHARS + 1)
    except OSError as exc:
        return f"<{exc.strerror}>"
    text = data[:_PREVIEW_CHARS].decode("utf-8", "replace")
    shown = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    more = "..." if len(data) > _PREVIEW_CHARS else ""
    return f'"{shown}{more}"'


def _is_opaque(path: str, xattr_prefix: str) -> bool:
    try:
        return os.getxattr(path, f"{xattr_prefix}overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def describe_entry(path: str, xattr_prefix: str = "trusted.") -> str:
    """Type (and a short content preview) of one directory entry."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"<{exc.strerror}>"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return _preview(path)
    if stat.S_ISDIR(mode):
        return "(dir, opaque)" if _is_opaque(path, xattr_prefix) else "(dir)"
    if stat.S_ISLNK(mode):
        try:
            return f"-> {os.readlink(path)}"
        except OSError as exc:
            return f"-> <{exc.strerror}>"
    if stat.S_ISCHR(mode):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if st.st_rdev == 0:
            return f"(whiteout c {major}/{minor})"
        return f"(char device {major}/{minor})"
    if stat.S_ISBLK(mode):
        return f"(block device {os.major(st.st_rdev)}/{os.minor(st.st_rdev)})"
    if stat.S_ISFIFO(mode):
        return "(fifo)"
    if stat.S_ISSOCK(mode):
        return "(socket)"
    return f"(mode {mode:o})"


def format_tree(path: str, label: str | None = None, xattr_prefix: str = "trusted.") -> list[str]:
    """Lines of an ASCII tree of ``path`` (names sorted, never following symlinks)."""
    lines = [f"{label or path}/"]

    def walk(directory: str, indent: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            lines.append(f"{indent}`-- <cannot list: {exc.strerror}>")
            return
        for index, name in enumerate(names):
            last = index == len(names) - 1
            full = os.path.join(directory, name)
            lines.append(f"{indent}{'`-- ' if last else '|-- '}{name}  {describe_entry(full, xattr_prefix)}")
            if os.path.isdir(full) and not os.path.islink(full):
                walk(full, indent + ("    " if last else "|   "))

    walk(path, "")
    if len(lines) == 1:
        lines.append("    (empty)")
    return lines


# --------------------------------------------------------------------------
# the walkthrough


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def _is_mounted(mountpoint: str) -> bool:
    from overlay.mounttable import find_mount  # noqa: PLC0415

    return find_mount(mountpoint) is not None


class Demo:
    """One run of the walkthrough in a scratch directory ``root``."""

    def __init__(self, root: str, out: TextIO) -> None:
        self.root = root
        self.out = out
        self.failures: list[str] = []
        self.mounted = False
        self.xattr_prefix = "trusted." if os.geteuid() == 0 else "user."
        self.paths = {
            name: os.path.join(root, name)
            for name in ("image1", "image2", "container", "work", "merge")
        }

    # output helpers -------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, title: str) -> None:
        self.say()
        self.say(f"=== {title} ===")

    def cmd(self, text: str) -> None:
        self.say(f"$ {text}")

    def trees(self, *names: str) -> None:
        for name in names:
            for line in format_tree(self.paths[name], name, self.xattr_prefix):
                self.say(f"    {line}")

    def check(self, ok: bool, what: str) -> bool:
        self.say(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failures.append(what)
        return ok

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # steps ------------------------------------------------------------------
    def build_layers(self) -> None:
        for name in self.paths.values():
            os.mkdir(name)
        for rel, text in (("image1/a", A_TEXT), ("image1/b", B_TEXT), ("image2/c", C_TEXT)):
            with open(self.p(rel), "w", encoding="utf-8") as fh:
                fh.write(text)

    def mount(self) -> bool:
        opts = "lowerdir=image2:image1,upperdir=container,workdir=work"
        if os.geteuid() != 0:
            opts += ",userxattr"  # trusted.* xattrs need CAP_SYS_ADMIN
        self.cmd(f"cd {self.root}")
        self.cmd(f"overlay mount -o {opts} merge")
        cmd = [sys.executable, "-m", "overlay", "mount", "-o", opts, "merge"]
        log.debug("running %s in %s", cmd, self.root)
        try:
            proc = subprocess.run(
                cmd,
                cwd=self.root,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=MOUNT_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            self.check(False, f"mount finished within {MOUNT_TIMEOUT:g} s")
            self.mounted = _is_mounted(self.paths["merge"])
            return False
        self.mounted = _is_mounted(self.paths["merge"])
        for line in (proc.stderr or "").splitlines():
            self.say(f"    {line}")
        ok = self.check(proc.returncode == 0, "overlay mount exited 0")
        return self.check(ok and self.mounted, "merge is a mount point now") and ok

    def step_merged_view(self) -> None:
        self.step(STEP_TITLES[0])
        self.say("The lower layers (read-only), the empty upper layer and the merged view:")
        self.trees("image1", "image2", "container", "merge")
        merge = self.paths["merge"]
        try:
            names = sorted(os.listdir(merge))
        except OSError as exc:
            names = [f"<{exc.strerror}>"]
        self.check(names == ["a", "b", "c"], f"merge lists a, b, c (got {', '.join(names)})")
        for name, want, layer in (("a", A_TEXT, "image1"), ("b", B_TEXT, "image1"), ("c", C_TEXT, "image2")):
            self.check(_read(self.p("merge", name)) == want, f"merge/{name} reads {want.strip()!r} from {layer}")
        self.check(os.listdir(self.paths["container"]) == [], "container is still empty")

    def step_whiteout(self) -> None:
        self.step(STEP_TITLES[1])
        self.cmd("rm merge/a")
        try:
            os.remove(self.p("merge", "a"))
            removed = True
        except OSError as exc:
            self.say(f"    rm failed: {exc.strerror}")
            removed = False
        self.check(removed, "rm merge/a succeeded")
        self.trees("merge", "container", "image1")
        self.check("a" not in os.listdir(self.paths["merge"]), "a is gone from the merged view")
        self.check(not os.path.lexists(self.p("merge", "a")), "merge/a does not exist any more")
        whiteout = self.p("container", "a")
        try:
            st = os.lstat(whiteout)
            is_whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        except OSError:
            is_whiteout = False
        self.check(is_whiteout, "container/a is a whiteout: a character device 0/0")
        self.check(_read(self.p("image1", "a")) == A_TEXT, "image1/a itself is untouched")

    def step_lower_edit_visible(self) -> None:
        self.step(STEP_TITLES[2])
        self.cmd(f"echo {B_EDIT_1.strip()!r} >> image1/b      # edits the file in place")
        with open(self.p("image1", "b"), "r+", encoding="utf-8") as fh:
            fh.seek(0, os.SEEK_END)
            fh.write(B_EDIT_1)
        self.trees("image1", "merge")
        self.check(_read(self.p("merge", "b")) == B_TEXT + B_EDIT_1, "merge/b shows the edit made in image1")
        self.check(not os.path.lexists(self.p("container", "b")), "b is not in container (not copied up)")

    def step_copy_up(self) -> None:
        self.step(STEP_TITLES[3])
        self.cmd(f"echo {B_WRITE.strip()!r} >> merge/b")
        try:
            with open(self.p("merge", "b"), "a", encoding="utf-8") as fh:
                fh.write(B_WRITE)
            wrote = True
        except OSError as exc:
            self.say(f"    write failed: {exc.strerror}")
            wrote = False
        self.check(wrote, "the write to merge/b succeeded")
        self.trees("merge", "container", "image1")
        want = B_TEXT + B_EDIT_1 + B_WRITE
        upper_b = self.p("container", "b")
        self.check(
            os.path.isfile(upper_b) and not os.path.islink(upper_b),
            "container/b exists now (copied up)",
        )
        self.check(_read(upper_b) == want, "container/b = image1/b as it was + the new line")
        self.check(_read(self.p("merge", "b")) == want, "merge/b reads the copied-up file")
        self.check(_read(self.p("image1", "b")) == B_TEXT + B_EDIT_1, "image1/b is unchanged")

    def step_lower_edit_hidden(self) -> None:
        self.step(STEP_TITLES[4])
        self.cmd(f"echo {B_EDIT_2.strip()!r} >> image1/b")
        with open(self.p("image1", "b"), "r+", encoding="utf-8") as fh:
            fh.seek(0, os.SEEK_END)
            fh.write(B_EDIT_2)
        self.trees("image1", "container", "merge")
        self.check(
            _read(self.p("image1", "b")) == B_TEXT + B_EDIT_1 + B_EDIT_2, "image1/b has the new edit"
        )
        self.check(
            _read(self.p("merge", "b")) == B_TEXT + B_EDIT_1 + B_WRITE,
            "merge/b still reads container/b: the lower edit is hidden",
        )

    def unmount(self, quiet: bool = False) -> bool:
        merge = self.paths["merge"]
        if not quiet:
            self.step(STEP_TITLES[5])
            self.cmd("overlay umount merge")
        proc = subprocess.run(
            [sys.executable, "-m", "overlay", "umount", merge],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        for line in (proc.stderr or "").splitlines():
            self.say(f"    {line}")
        deadline = time.monotonic() + 5
        while _is_mounted(merge) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.mounted = _is_mounted(merge)
        if quiet:
            return not self.mounted
        self.check(proc.returncode == 0, "overlay umount exited 0")
        self.check(not self.mounted, "merge is no longer a mount point")
        self.trees("merge", "container")
        return not self.mounted

    def force_unmount(self) -> None:
        """Last resort in cleanup: lazy unmount of our own mount."""
        from overlay.mounttable import unmount as _unmount  # noqa: PLC0415

        ok, error = _unmount(self.paths["merge"], lazy=True)
        if not ok:
            log.warning("lazy unmount of %s failed: %s", self.paths["merge"], error)
        self.mounted = _is_mounted(self.paths["merge"])

    def run(self) -> int:
        self.say(f"overlay demo in {self.root}")
        self.build_layers()
        if self.mount():
            self.step_merged_view()
            self.step_whiteout()
            self.step_lower_edit_visible()
            self.step_copy_up()
            self.step_lower_edit_hidden()
            self.unmount()
        return 0 if not self.failures else 1


def run_demo(keep: bool = False, base_dir: str | None = None, out: TextIO | None = None) -> int:
    """Run the walkthrough; 0 if every check passed, 1 otherwise."""
    out = out or sys.stdout
    if base_dir and not os.path.isdir(base_dir):
        print(f"overlay demo: --dir {base_dir}: no such directory", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="overlay-demo-", dir=base_dir)
    demo = Demo(root, out)
    code = 1
    try:
        code = demo.run()
    except KeyboardInterrupt:
        demo.say("demo: interrupted")
        code = 130
    except Exception as exc:  # report, clean up, fail
        log.debug("demo crashed", exc_info=True)
        demo.say(f"demo: unexpected error: {type(exc).__name__}: {exc}")
        demo.failures.append(f"unexpected error {exc!r}")
        code = 1
    finally:
        if demo.mounted or _is_mounted(demo.paths["merge"]):
            if not demo.unmount(quiet=True):
                demo.force_unmount()
        if demo.mounted:
            demo.say(f"demo: {demo.paths['merge']} is still mounted; leaving {root} in place")
            code = code or 1
        elif keep:
            demo.say(f"demo: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if code == 0:
        demo.say()
        demo.say(PASSED_LINE)
    elif demo.failures:
        demo.say()
        demo.say(f"demo: {len(demo.failures)} check(s) failed:")
        for what in demo.failures:
            demo.say(f"  - {what}")
    return code

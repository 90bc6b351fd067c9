"""podman with our filesystem as its overlay ``mount_program`` (tests/test_podman.py).

containers-storage.conf(5) lets the overlay driver mount layers with a FUSE
program instead of the kernel: ``[storage.options.overlay] mount_program``.
Here that is a small wrapper script which logs its argv (to ``argv.log``, so a
failure shows exactly what podman passed) and execs our ``overlay-containers-mount``.
Everything podman keeps (graphroot, runroot, tmpdir, a private
storage.conf) lives under /tmp/eco-podman-*; no network is needed: the image
is ``podman import``-ed from a tarball of a busybox root filesystem.

* ``test_mount_and_diff``: ``podman mount`` a container (through the helper),
  change files (write, append, delete a lower file, ``rm -rf`` a dir, rename a
  dir, mkdir, an opaque dir), ``podman diff`` == the expected changes ==
  ``overlay diff`` of the container's upper dir, ``podman umount``.
* ``test_commit_view``: ``podman commit``, then mount a container of the new
  image: the changes must be there (and the deleted files gone).
* ``test_twenty_stacked_commits``: twenty more commits on top of each
  other (create, write, delete a file of an earlier layer, rename a dir,
  commit), then the final view is checked.
* ``test_run_diff_commit_rm``: ``podman run`` of a command that writes,
  deletes and renames inside the container; its output, ``podman diff`` of
  it, ``podman commit``, a container of the committed image, ``podman rm``,
  and no daemon of ours left running afterwards.

Containers are started with runc where it is installed (crun 1.8 refuses
hybrid cgroup hierarchies, as this machine has), with rlimits no higher
than the hard limits podman runs under (a sandbox without CAP_SYS_RESOURCE
cannot raise them): a private containers.conf says so, podman is run
unmodified.

With ``mount_program`` set, containers/storage writes the whiteouts of
committed layers in the OCI/AUFS form (``.wh.NAME`` empty files,
``.wh..wh..opq`` for opaque dirs); ``overlay-containers-mount`` mounts with
the ``oci_whiteouts`` option that reads them.

Skipped with the reason when podman or a static busybox is not installed
(``apt-get install podman busybox-static``), when not root, or without FUSE.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import mountutil

from overlay import layertools
from overlay.api import fuse_unavailable_reason

# PODMAN_MOUNT_PROGRAM=/usr/bin/fuse-overlayfs runs the same tests with
# another mount program, for comparison
HELPER = Path(os.environ.get("PODMAN_MOUNT_PROGRAM") or Path(sys.executable).parent / "overlay-containers-mount")
OURS = "PODMAN_MOUNT_PROGRAM" not in os.environ
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
PODMAN_TIMEOUT = 180


def _skip_reason() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman)"
    if os.geteuid() != 0:
        return "the podman tests run podman as root (not uid 0)"
    reason = fuse_unavailable_reason()
    if reason:
        return f"FUSE not usable: {reason}"
    if not HELPER.exists():
        return f"{HELPER} is missing (install the package: pip install -e .)"
    if not os.path.exists(BUSYBOX):
        return "no busybox binary (apt-get install busybox-static)"
    ldd = subprocess.run(["ldd", BUSYBOX], capture_output=True, text=True)
    if "not a dynamic executable" not in (ldd.stdout + ldd.stderr):
        return f"{BUSYBOX} is not static (apt-get install busybox-static)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


# --------------------------------------------------------------------------
# the podman environment


class Podman:
    """podman with private storage under ``base`` and our mount_program."""

    def __init__(self, base: str, layer_store: str | None = None):
        self.base = base
        self.root = os.path.join(base, "root")
        self.runroot = os.path.join(base, "runroot")
        self.tmpdir = os.path.join(base, "tmp")
        self.argv_log = os.path.join(base, "argv.log")
        self.fs_log = os.path.join(base, "fs.log")
        self.wrapper = os.path.join(base, "overlay-mount-wrapper")
        for d in (self.root, self.runroot, self.tmpdir):
            os.makedirs(d)
        with open(self.wrapper, "w") as fh:
            fh.write(
                "#!/bin/sh\n"
                "# logs what podman passes, then runs our mount helper\n"
                f"printf '%s\\n' \"$*\" >> {shlex.quote(self.argv_log)}\n"
                f"exec {shlex.quote(str(HELPER))} \"$@\""
                + (f" --log {shlex.quote(self.fs_log)}" if OURS else "")
                + "\n"
            )
        os.chmod(self.wrapper, 0o755)
        self.storage_conf = os.path.join(base, "storage.conf")
        with open(self.storage_conf, "w") as fh:
            fh.write(
                "[storage]\n"
                'driver = "overlay"\n'
                f'graphroot = "{self.root}"\n'
                f'runroot = "{self.runroot}"\n'
                + ("[storage.options]\n"
                   f'additionallayerstores = ["{layer_store}:ref"]\n' if layer_store else "")
                + "[storage.options.overlay]\n"
                f'mount_program = "{self.wrapper}"\n'
            )
        self.containers_conf = os.path.join(base, "containers.conf")
        write_containers_conf(self.containers_conf)
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=self.storage_conf,
                        CONTAINERS_CONF=self.containers_conf)
        self.cmd = [
            "podman",
            "--tmpdir",
            self.tmpdir,
            "--events-backend",
            "file",
            "--cgroup-manager",
            "cgroupfs",
        ]

    def __call__(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            [*self.cmd, *args],
            capture_output=True,
            text=True,
            env=self.env,
            stdin=subprocess.DEVNULL,
            timeout=PODMAN_TIMEOUT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stderr.strip()}\n"
                f"mount_program argv log:\n{self.argv_text()}"
            )
        return proc.stdout if check else proc  # type: ignore[return-value]

    def containers_conf_text(self) -> str:
        with open(self.containers_conf) as fh:
            return fh.read()

    def argv_text(self) -> str:
        try:
            with open(self.argv_log) as fh:
                return fh.read()
        except FileNotFoundError:
            return "(the mount program was never run)"

    def mount(self, container: str) -> str:
        mp = self("mount", container).strip()
        assert mountutil.is_mounted(mp), f"podman mount said {mp} but it is not mounted"
        fstype = dict(mountutil.mountpoints()).get(mp, "")
        assert fstype.startswith("fuse"), (
            f"{mp} is {fstype!r}, not our FUSE mount; argv log:\n{self.argv_text()}"
        )
        return mp

    def umount(self, container: str, mp: str) -> None:
        self("umount", container)
        assert not mountutil.is_mounted(mp), f"{mp} still mounted after podman umount"

    def inspect(self, container: str) -> dict:
        return json.loads(self("container", "inspect", container))[0]

    def close(self) -> None:
        for args in (("umount", "--all", "--force"), ("rm", "--all", "--force")):
            try:
                self(*args, check=False)
            except Exception:  # noqa: BLE001 - best effort, mounts go below
                pass
        # everything mounted below base is ours (podman's FUSE mounts, its
        # private bind mount of the overlay dir): deepest first
        for mp in sorted(mountutil._mounts_below(self.base), key=len, reverse=True):
            mountutil.umount(mp)


def write_containers_conf(path: str) -> None:
    """containers.conf for this machine: runc where installed, rlimits
    within the hard limits, cgroupfs, events in a file."""
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 1024 if nofile == resource.RLIM_INFINITY else min(nofile, 1024)
    nproc = 1024 if nproc == resource.RLIM_INFINITY else min(nproc, 1024)
    with open(path, "w") as fh:
        fh.write(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            + ('runtime = "runc"\n' if shutil.which("runc") else "")
            + 'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )


def make_rootfs(base: str) -> str:
    """A busybox root filesystem tarball; returns its path."""
    root = os.path.join(base, "rootfs")
    for d in ("bin", "etc", "data/sub", "gone/deep", "opq/x", "tmp", "layers", "moving/d0"):
        os.makedirs(os.path.join(root, d))
    shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
    for applet in ("sh", "cat", "ls", "echo", "rm", "mkdir", "mv", "sleep"):
        os.symlink("busybox", os.path.join(root, "bin", applet))
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
        "etc/motd": "hello\n",
        "data/sub/f": "d\n",
        "gone/deep/g": "g\n",
        "opq/keep": "keep\n",
        "opq/x/y": "y\n",
        "moving/d0/payload": "payload\n",
        "log": "base\n",
    }
    for rel, text in files.items():
        with open(os.path.join(root, rel), "w") as fh:
            fh.write(text)
    tarball = os.path.join(base, "rootfs.tar")
    subprocess.run(["tar", "-C", root, "-cf", tarball, "."], check=True)
    return tarball


@pytest.fixture(scope="module")
def podman():
    base = tempfile.mkdtemp(prefix="eco-podman-", dir="/tmp")
    p = Podman(base)
    try:
        p("import", make_rootfs(base), "localhost/eco-bb:base")
        yield p
    finally:
        p.close()
        if not mountutil._mounts_below(base):
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------
def check_view(mp: str, expected: dict[str, str | None]) -> list[str]:
    """Problems with the view: path -> content (None: must not exist, "/": dir)."""
    problems = []
    for rel, want in expected.items():
        path = os.path.join(mp, rel.lstrip("/"))
        if want is None:
            if os.path.lexists(path):
                problems.append(f"{rel} exists but was deleted")
        elif want == "/":
            if not os.path.isdir(path):
                problems.append(f"{rel} is not a directory")
        else:
            try:
                with open(path) as fh:
                    got = fh.read()
            except OSError as exc:
                problems.append(f"{rel}: {exc.strerror}")
                continue
            if got != want:
                problems.append(f"{rel}: {got!r} != {want!r}")
    return problems


def fail_or_xfail(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{what}: " + "; ".join(problems))


# --------------------------------------------------------------------------
# the changes made in the first container


def rename_dir(src: str, dst: str) -> None:
    """rename(2); like mv(1), copy + delete on EXDEV, but only for another
    mount program (fuse-overlayfs gives EXDEV for lower dirs; ours must not)."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if OURS or exc.errno != errno.EXDEV:
            raise
        shutil.copytree(src, dst, symlinks=True)
        shutil.rmtree(src)


def change_first_container(mp: str) -> None:
    j = lambda *p: os.path.join(mp, *p)  # noqa: E731
    with open(j("newfile"), "w") as fh:
        fh.write("new\n")
    with open(j("etc/passwd"), "a") as fh:
        fh.write("eco:x:1000:1000::/:/bin/sh\n")
    os.remove(j("etc/motd"))
    shutil.rmtree(j("gone"))
    rename_dir(j("data"), j("data2"))
    os.mkdir(j("newdir"))
    with open(j("newdir/file"), "w") as fh:
        fh.write("nd\n")
    shutil.rmtree(j("opq"))
    os.mkdir(j("opq"))
    with open(j("opq/new"), "w") as fh:
        fh.write("o\n")


EXPECTED_DIFF = {
    "A /newfile",
    "C /etc",
    "C /etc/passwd",
    "D /etc/motd",
    "D /gone",
    "D /data",
    "A /data2",
    "A /data2/sub",
    "A /data2/sub/f",
    "A /newdir",
    "A /newdir/file",
    "C /opq",
    "D /opq/keep",
    "D /opq/x",
    "A /opq/new",
}

FIRST_VIEW = {
    "/newfile": "new\n",
    "/etc/passwd": "root:x:0:0:root:/root:/bin/sh\neco:x:1000:1000::/:/bin/sh\n",
    "/etc/motd": None,
    "/gone": None,
    "/data": None,
    "/data2/sub/f": "d\n",
    "/newdir/file": "nd\n",
    "/opq/new": "o\n",
    "/opq/keep": None,
    "/opq/x": None,
    "/log": "base\n",
}


def test_mount_and_diff(podman):
    podman("create", "--name", "eco-c1", "localhost/eco-bb:base", "/bin/sh")
    mp = podman.mount("eco-c1")
    argv = podman.argv_text().splitlines()[-1]
    # what podman hands the mount program: -o lowerdir=...,upperdir=...,workdir=..., MOUNTPOINT
    assert argv.startswith("-o lowerdir=") and argv.endswith(" " + mp), argv
    assert ",upperdir=" in argv and ",workdir=" in argv, argv
    assert sorted(os.listdir(mp)) == ["bin", "data", "etc", "gone", "layers", "log", "moving", "opq", "tmp"]
    change_first_container(mp)
    assert check_view(mp, FIRST_VIEW) == []

    diff = set(podman("diff", "eco-c1").splitlines())
    assert diff == EXPECTED_DIFF, f"podman diff: extra {diff - EXPECTED_DIFF}, missing {EXPECTED_DIFF - diff}"
    if OURS:  # (another mount program's upper dir may use another format)
        data = podman.inspect("eco-c1")["GraphDriver"]["Data"]
        ours = {str(c) for c in layertools.diff(data["UpperDir"], data["LowerDir"].split(":"))}
        assert ours == diff, f"overlay diff vs podman diff: extra {ours - diff}, missing {diff - ours}"
    podman.umount("eco-c1", mp)


def test_commit_view(podman):
    if "eco-c1" not in podman("ps", "-a", "--format", "{{.Names}}").split():
        pytest.skip("needs the container of test_mount_and_diff")
    podman("commit", "eco-c1", "localhost/eco-bb:c1")
    podman("create", "--name", "eco-c2", "localhost/eco-bb:c1", "/bin/sh")
    mp = podman.mount("eco-c2")
    try:
        assert podman("diff", "eco-c2").strip() == ""
        problems = check_view(mp, FIRST_VIEW)
    finally:
        podman.umount("eco-c2", mp)
    fail_or_xfail(problems, "view of the committed image")


STACKED = 20


def test_twenty_stacked_commits(podman):
    image = "localhost/eco-bb:base"
    for i in range(1, STACKED + 1):
        name = f"eco-s{i}"
        podman("create", "--name", name, image, "/bin/sh")
        mp = podman.mount(name)
        with open(os.path.join(mp, "layers", f"f{i}"), "w") as fh:
            fh.write(f"{i}\n")
        if i > 1 and (i - 1) % 2 == 0:
            os.remove(os.path.join(mp, "layers", f"f{i - 1}"))  # a file of the layer below
        rename_dir(os.path.join(mp, "moving", f"d{i - 1}"), os.path.join(mp, "moving", f"d{i}"))
        with open(os.path.join(mp, "log"), "a") as fh:
            fh.write(f"{i}\n")
        podman.umount(name, mp)
        image = f"localhost/eco-bb:s{i}"
        podman("commit", name, image)
        podman("rm", name)
    layers = json.loads(podman("image", "inspect", image))[0]["RootFS"]["Layers"]
    assert len(layers) == STACKED + 1

    podman("create", "--name", "eco-final", image, "/bin/sh")
    mp = podman.mount("eco-final")
    try:
        expected: dict[str, str | None] = {
            "/log": "base\n" + "".join(f"{i}\n" for i in range(1, STACKED + 1))}
        for i in range(1, STACKED + 1):
            expected[f"/layers/f{i}"] = None if (i % 2 == 0 and i < STACKED) else f"{i}\n"
            expected[f"/moving/d{i - 1}"] = None
        expected[f"/moving/d{STACKED}/payload"] = "payload\n"
        problems = check_view(mp, expected)
        names = sorted(os.listdir(os.path.join(mp, "layers")))
        want = sorted([f"f{i}" for i in range(1, STACKED, 2)] + [f"f{STACKED}"])
        if names != want:
            problems.append(f"/layers lists {names}, expected {want}")
    finally:
        podman.umount("eco-final", mp)
    fail_or_xfail(problems, "view after twenty stacked commits")


def our_daemons() -> list[str]:
    """Command lines of our mount daemons (overlay-containers-mount) running."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "overlay-containers-mount" in cmd or "overlay-mount-wrapper" in cmd:
            out.append(cmd)
    return out


def test_run_diff_commit_rm(podman):
    """podman run of a command that writes, deletes and renames inside the
    container; podman diff of it, commit, a container of the committed
    image, rm; no daemon of ours left once podman is done."""
    script = ("cat /etc/motd; echo written > /tmp/x; cat /tmp/x; rm /etc/motd; "
              "mv /data /data.moved; echo more >> /log; ls /data.moved/sub")
    proc = podman("run", "--name", "eco-run", "--network", "none", "localhost/eco-bb:base",
                  "/bin/sh", "-c", script, check=False)
    if proc.returncode != 0 and "runc" not in podman.containers_conf_text() and any(
            sign in proc.stderr for sign in ("setrlimit", "OCI permission denied", "cgroup")):
        pytest.skip(f"podman run cannot start containers here without runc: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello\nwritten\nf\n"
    diff = set(podman("diff", "eco-run").splitlines())
    want = {"C /etc", "D /etc/motd", "D /data", "A /data.moved", "A /data.moved/sub",
            "A /data.moved/sub/f", "C /log", "C /tmp", "A /tmp/x"}
    assert want <= diff, f"podman diff: missing {want - diff} (got {sorted(diff)})"
    podman("commit", "eco-run", "localhost/eco-bb:ran")
    proc = podman("run", "--rm", "--network", "none", "localhost/eco-bb:ran", "/bin/sh", "-c",
                  "cat /tmp/x /log; ls /etc; ls /data 2>&1 || true", check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("written\nbase\nmore\n"), proc.stdout
    assert "motd" not in proc.stdout
    podman("rm", "eco-run")
    for _ in range(100):        # (a daemon ends a moment after its unmount)
        left = [c for c in our_daemons() if podman.base in c]
        if not left:
            break
        time.sleep(0.05)
    assert not left, f"daemons left running after podman rm: {left}"


def test_image_mount_read_only(podman):
    """A read-only mount of an image (podman image mount, as CRI-O and
    containers/storage mount layers read-only): lowerdir= only, the layer
    and an empty dir below it; nothing can be written."""
    mp = podman("image", "mount", "localhost/eco-bb:base").strip()
    try:
        argv = podman.argv_text().splitlines()[-1]
        assert "upperdir=" not in argv and argv.startswith("-o lowerdir="), argv
        assert mountutil.is_mounted(mp)
        assert check_view(mp, {"/etc/motd": "hello\n", "/data/sub/f": "d\n"}) == []
        with pytest.raises(OSError) as exc:
            open(os.path.join(mp, "etc/motd"), "a").close()
        assert exc.value.errno == errno.EROFS
    finally:
        podman("image", "umount", "localhost/eco-bb:base")
    assert not mountutil.is_mounted(mp)


def test_additional_image_store(podman):
    """An image in an additional (read-only) image store: a container of
    it runs on our mount, its layers read from the other store."""
    other = Podman(os.path.join(podman.base, "store2"))
    try:
        other("import", make_rootfs(other.base), "localhost/eco-other:1")
        ro_root = other.root
        conf = podman.storage_conf + ".extra"
        with open(podman.storage_conf) as fh:
            text = fh.read()
        with open(conf, "w") as fh:
            fh.write(text.replace("[storage.options.overlay]",
                                  f'[storage.options]\nadditionalimagestores = ["{ro_root}"]\n'
                                  "[storage.options.overlay]"))
        env = dict(podman.env, CONTAINERS_STORAGE_CONF=conf)
        proc = subprocess.run([*podman.cmd, "run", "--rm", "--network", "none", "localhost/eco-other:1",
                               "/bin/sh", "-c", "cat /etc/motd; echo w > /tmp/w; cat /tmp/w"],
                              capture_output=True, text=True, env=env, timeout=PODMAN_TIMEOUT)
        assert proc.returncode == 0, proc.stderr + podman.argv_text()
        assert proc.stdout == "hello\nw\n"
        argv = podman.argv_text().splitlines()[-1]
        lowers = argv.split("lowerdir=", 1)[1].split(",", 1)[0].split(":")
        assert any(os.path.realpath(p).startswith(ro_root + "/") for p in lowers), (
            f"no lower layer from the additional store {ro_root}: "
            f"{[os.path.realpath(p) for p in lowers]}")
    finally:
        other.close()


def test_buildah_from_run_commit(podman):
    """buildah with the same storage: from, run (write, delete, rename),
    commit; podman runs the image it made."""
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (apt-get install buildah)")

    def buildah(*args):
        proc = subprocess.run(["buildah", *args], capture_output=True, text=True, env=podman.env,
                              stdin=subprocess.DEVNULL, timeout=PODMAN_TIMEOUT)
        assert proc.returncode == 0, f"buildah {' '.join(args)}: {proc.stderr}\n{podman.argv_text()}"
        return proc.stdout

    ctr = buildah("from", "localhost/eco-bb:base").strip().splitlines()[-1]
    try:
        out = buildah("run", ctr, "--", "/bin/sh", "-c",
                      "echo built > /built; rm /etc/motd; mv /opq /opq2; cat /built")
        assert out == "built\n"
        buildah("commit", ctr, "localhost/eco-bb:built")
    finally:
        buildah("rm", ctr)
    out = podman("run", "--rm", "--network", "none", "localhost/eco-bb:built", "/bin/sh", "-c",
                 "cat /built /opq2/keep; ls /etc")
    assert out.startswith("built\nkeep\n") and "motd" not in out, out


def test_id_mapped_container(podman):
    """A container with its own id map (podman create --uidmap/--gidmap):
    the mount program gets uidmapping=/gidmapping= with podman's leading
    colon (refused before: "expected CONTAINER:HOST:SIZE triples"), mounts,
    and the container's files read through it. (podman 4.3 also hands the
    mount program its lower layers through an id-mapped mount of its own,
    so their owners come out mapped twice, as the overflow id, with
    fuse-overlayfs too (checked by hand); the mapping itself is compared
    with fuse-overlayfs in tests/test_idmap_stats.py. Starting such a
    container as root fails here before the mount is used, with
    fuse-overlayfs too: runc in the container's namespace cannot reach the
    store's 0700 dirs.)"""
    podman("create", "--name", "eco-mapped", "--uidmap", "0:200000:65536",
           "--gidmap", "0:200000:65536", "localhost/eco-bb:base", "/bin/sh")
    mp = podman.mount("eco-mapped")
    try:
        argv = podman.argv_text().splitlines()[-1]
        assert "uidmapping=:0:200000:65536" in argv and "gidmapping=:0:200000:65536" in argv, argv
        assert check_view(mp, {"/etc/motd": "hello\n", "/data/sub/f": "d\n"}) == []
        with open(os.path.join(mp, "mapped"), "w") as fh:
            fh.write("m\n")
        upper = podman.inspect("eco-mapped")["GraphDriver"]["Data"]["UpperDir"]
        # written by host root (outside the map): stored as the overflow id
        assert os.lstat(os.path.join(upper, "mapped"))[4:6] == (65534, 65534)
    finally:
        podman.umount("eco-mapped", mp)
        podman("rm", "eco-mapped")

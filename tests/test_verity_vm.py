"""verity=on|require where the kernel has fs-verity: in a virtual machine.

The kernel of this machine has no CONFIG_FS_VERITY (`fsverity enable`
fails with EOPNOTSUPP), so the digest checks that must pass (a metacopy
file's stored digest matching its data's) cannot run here. This test boots
Debian's kernel (which has fs-verity) in qemu, with this machine's root
directory as its read-only root over 9p (so the same python3 and our
package run there), and runs tests/vm/verity_check.py: on a loop-mounted
ext4 made with the verity feature, through a real FUSE mount of ours with
metacopy=on:

* verity=on: a metadata copy-up of a file with fs-verity stores its digest
  in the metacopy xattr (the kernel's struct ovl_metacopy); reads are
  checked against it, after a remount too; another digest gives EIO; the
  same for that upper pushed down as a lower layer;
* verity=require: a file without fs-verity is copied up whole, one with it
  gets a metacopy with its digest.

(Debian 12's kernel is 6.1: its overlayfs has no verity= yet, so these are
checked against the kernel documentation's rules, not against the kernel;
the refusals are compared with this machine's kernel in
tests/test_diff_metacopy.py.)

Needs root, qemu-system-x86_64, busybox (static), cpio and apt-get
(the kernel package is downloaded once, into /var/tmp/overlay-fuse-vm);
about a minute under qemu's emulation.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import mountutil

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = "/var/tmp/overlay-fuse-vm"
SYSTEM_PYTHON = "/usr/bin/python3"
# what the VM needs (modules.dep gives what they need, loaded first)
MODULES = ["drivers/virtio/virtio_pci", "net/9p/9pnet_virtio", "fs/9p/9p", "crypto/crc32c_generic",
           "fs/ext4/ext4", "drivers/block/loop", "fs/fuse/fuse"]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("qemu-system-x86_64", "cpio", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install qemu-system-x86 cpio)"
    if not os.path.exists("/sbin/depmod"):
        return "depmod is missing (apt-get install kmod)"
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        return "busybox is missing (apt-get install busybox-static)"
    v = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                       capture_output=True, text=True).stdout.strip()
    if v != str(tuple(sys.version_info[:2])):
        return f"{SYSTEM_PYTHON} is {v}, the build is for {tuple(sys.version_info[:2])}"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _kernel() -> tuple[str, str]:
    """(vmlinuz, modules dir) of Debian's current generic kernel, fetched
    once with apt-get download and unpacked into CACHE."""
    os.makedirs(CACHE, exist_ok=True)
    deps = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                          text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in deps.splitlines()
             if line.strip().startswith("Depends:") and "linux-image-" in line]
    if not names:
        pytest.skip("no linux-image-amd64 package known to apt")
    pkg = names[0]
    root = os.path.join(CACHE, pkg)
    if not glob.glob(os.path.join(root, "boot", "vmlinuz-*")):
        debs = glob.glob(os.path.join(CACHE, f"{pkg}_*.deb"))
        if not debs:
            r = subprocess.run(["apt-get", "download", pkg], cwd=CACHE, capture_output=True, text=True,
                               timeout=900)
            if r.returncode:
                pytest.skip(f"apt-get download {pkg} failed: {r.stderr.strip()[-300:]}")
            debs = glob.glob(os.path.join(CACHE, f"{pkg}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", debs[0], root], check=True)
    vmlinuz = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))[0]
    moddir = glob.glob(os.path.join(root, "lib", "modules", "*"))[0]
    return vmlinuz, moddir


def _load_order(moddir: str) -> list:
    """MODULES and what they need, each after its dependencies (from the
    modules.dep that depmod makes for the unpacked kernel)."""
    dep = os.path.join(moddir, "modules.dep")
    if not os.path.exists(dep):
        root = os.path.dirname(os.path.dirname(os.path.dirname(moddir)))
        subprocess.run(["/sbin/depmod", "-b", root, os.path.basename(moddir)], check=True)
    deps = {}
    with open(dep) as fh:
        for line in fh:
            mod, _, rest = line.partition(":")
            deps[mod.strip()] = rest.split()
    order = []

    def add(path):
        for d in deps.get(path, []):
            add(d)
        if path not in order:
            order.append(path)

    for m in MODULES:
        path = f"kernel/{m}.ko"
        if path in deps:
            add(path)
    return order


def _initrd(tmp: str, moddir: str, repo: str) -> str:
    """busybox, the modules, and an /init that mounts this machine's root
    (9p, read-only) with a tmpfs to write in, runs the check, powers off."""
    d = os.path.join(tmp, "initrd")
    for sub in ("bin", "mods", "proc", "sys", "dev", "host"):
        os.makedirs(os.path.join(d, sub))
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", os.path.join(d, "bin", "busybox"))
    order = _load_order(moddir)
    for path in order:
        shutil.copy2(os.path.join(moddir, path), os.path.join(d, "mods"))
    names = " ".join(os.path.basename(p)[:-3] for p in order)
    scratch = "/host/mnt"
    with open(os.path.join(d, "init"), "w") as fh:
        fh.write(f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {names}; do insmod /mods/$m.ko || echo "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /host || echo "9p mount failed"
mount -t tmpfs tmpfs {scratch}
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mount -t tmpfs tmpfs /host/run
echo VM-START
chroot /host {SYSTEM_PYTHON} {repo}/tests/vm/verity_check.py {repo}/src /mnt 2>&1
echo VM-END
poweroff -f
""")
    os.chmod(os.path.join(d, "init"), 0o755)
    out = os.path.join(tmp, "initrd.gz")
    subprocess.run(f"cd {d} && find . | cpio -o -H newc 2>/dev/null | gzip > {out}", shell=True,
                   check=True)
    return out


def test_verity_in_a_vm(tmp_path):
    vmlinuz, moddir = _kernel()
    root = os.path.dirname(os.path.dirname(os.path.dirname(moddir)))     # (root/lib/modules/VER)
    with open(glob.glob(os.path.join(root, "boot", "config-*"))[0]) as fh:
        if "CONFIG_FS_VERITY=y" not in fh.read():
            pytest.skip("Debian's kernel has no fs-verity")
    repo = str(mountutil.REPO)
    initrd = _initrd(str(tmp_path), moddir, repo)
    cmd = ["qemu-system-x86_64", "-m", "1024", "-smp", "2", "-nographic", "-no-reboot",
           "-kernel", vmlinuz, "-initrd", initrd,
           "-append", "console=ttyS0 panic=-1 loglevel=3",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
           "-accel", "tcg,thread=multi", "-cpu", "max"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    lines = [line for line in r.stdout.splitlines() if line.startswith("VERITY-RESULT ")]
    assert lines, "the check did not finish in the VM:\n" + r.stdout[-3000:] + r.stderr[-1000:]
    res = json.loads(lines[-1].split(" ", 1)[1])
    assert res == {
        "digest_len": 32,
        "metacopy_has_digest": True,
        "read_verified": "verified data\n",
        "read_after_remount": "verified data\n",
        "read_bad_digest": "EIO",
        "pushed_down_read": "verified data\n",
        "pushed_down_bad_digest": "EIO",
        "require_plain_full_copy": True,
        "require_verity_metacopy": True,
        "require_read": "other\n",
    }, res

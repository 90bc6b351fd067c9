"""Run inside the VM of tests/test_verity_vm.py (a kernel with fs-verity):
our metacopy=on with verity=on and verity=require, on a loop-mounted ext4
made with the verity feature. argv: our package dir, a writable scratch
dir. Prints one line "VERITY-RESULT {json}"."""
import errno
import fcntl
import json
import os
import struct
import subprocess
import sys

FS_IOC_ENABLE_VERITY = 0x40806685
FS_IOC_MEASURE_VERITY = 0xc0046686
out = {}

def sh(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        dm = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()[-8:]
        raise SystemExit(f"{cmd}: {r.stderr} dmesg: {dm}")
    return r.stdout

def enable_verity(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        arg = bytearray(128)
        struct.pack_into("=IIIIQQQQQ", arg, 0, 1, 1, 4096, 0, 0, 0, 0, 0, 0)
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    finally:
        os.close(fd)

def measure(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(4 + 64)
        struct.pack_into("=HH", buf, 0, 0, 64)
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
        alg, size = struct.unpack_from("=HH", buf, 0)
        return bytes(buf[4:4 + size])
    finally:
        os.close(fd)

SCRATCH = sys.argv[2]
E = os.path.join(SCRATCH, "e")


def ours(opts, mp):
    env = dict(os.environ, PYTHONPATH=sys.argv[1])
    log = os.path.join(SCRATCH, "ov.log")
    r = subprocess.run([sys.executable, "-m", "overlay", "mount", "--log", log, "-o", opts, mp],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"mount {opts}: {r.stderr} {open(log).read()}")

def umount(mp):
    subprocess.run(["umount", mp], check=True)

def read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read().decode()
    except OSError as e:
        return errno.errorcode[e.errno]

IMG = os.path.join(SCRATCH, "img")
os.makedirs(E, exist_ok=True)
sh("dd", "if=/dev/zero", "of=" + IMG, "bs=1M", "count=64", "status=none")
sh("/sbin/mkfs.ext4", "-q", "-b", "4096", "-O", "verity", IMG)
dev = sh("losetup", "-f", "--show", IMG).strip()
sh("mount", "-t", "ext4", dev, E)
for d in ("l", "u", "w", "m", "u2", "w2"):
    os.makedirs(f"{E}/{d}")
for name, text in (("f", "verified data\n"), ("g", "plain data\n"), ("h", "other\n")):
    with open(f"{E}/l/{name}", "w") as fh:
        fh.write(text)
enable_verity(E + "/l/f")
enable_verity(E + "/l/h")
digest = measure(E + "/l/f")
out["digest_len"] = len(digest)
base = f"lowerdir={E}/l,upperdir={E}/u,workdir={E}/w,metacopy=on"
# verity=on: a metadata copy-up of a file with fs-verity stores its digest
ours(base + ",verity=on", E + "/m")
os.chmod(E + "/m/f", 0o600)
mc = os.getxattr(E + "/u/f", "trusted.overlay.metacopy")
out["metacopy_has_digest"] = digest in mc
out["read_verified"] = read(E + "/m/f")
umount(E + "/m")
# a remount checks the digest at open: right data, then wrong digest -> EIO
ours(base + ",verity=on", E + "/m")
out["read_after_remount"] = read(E + "/m/f")
umount(E + "/m")
bad = bytes(mc[:-1]) + bytes([mc[-1] ^ 0xFF])
os.setxattr(E + "/u/f", "trusted.overlay.metacopy", bad)
ours(base + ",verity=on", E + "/m")
out["read_bad_digest"] = read(E + "/m/f")
umount(E + "/m")
os.setxattr(E + "/u/f", "trusted.overlay.metacopy", mc)
# that upper pushed down (a lower metacopy file naming its data's digest):
# checked at open too
for d in ("u3", "w3"):
    os.makedirs(f"{E}/{d}")
base3 = f"lowerdir={E}/u:{E}/l,upperdir={E}/u3,workdir={E}/w3,metacopy=on,verity=on"
ours(base3, E + "/m")
out["pushed_down_read"] = read(E + "/m/f")
umount(E + "/m")
os.setxattr(E + "/u/f", "trusted.overlay.metacopy", bad)
ours(base3, E + "/m")
out["pushed_down_bad_digest"] = read(E + "/m/f")
umount(E + "/m")
os.setxattr(E + "/u/f", "trusted.overlay.metacopy", mc)
# verity=require: a file without fs-verity is copied up whole; one with it
# gets a metacopy with its digest
base2 = f"lowerdir={E}/l,upperdir={E}/u2,workdir={E}/w2,metacopy=on,verity=require"
ours(base2, E + "/m")
os.chmod(E + "/m/g", 0o600)
os.chmod(E + "/m/h", 0o600)
names_g = os.listxattr(E + "/u2/g")
out["require_plain_full_copy"] = "trusted.overlay.metacopy" not in names_g and os.stat(E + "/u2/g").st_size == 11
out["require_verity_metacopy"] = measure(E + "/l/h") in os.getxattr(E + "/u2/h", "trusted.overlay.metacopy")
out["require_read"] = read(E + "/m/h")
umount(E + "/m")
print("VERITY-RESULT " + json.dumps(out), flush=True)

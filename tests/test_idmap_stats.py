"""uid/gid mapping (uidmapping=, gidmapping=, squash_to_root) and the live
counters of `overlay stats`, on real mounts."""

import errno
import json
import os
import subprocess
import sys

import pytest

import mountutil
from overlay.idmap import IdMap, IdMapError, OVERFLOW_ID


def test_idmap_parse_and_map():
    """fuse-overlayfs's meaning: the layers' ids C.. show as H.. (as
    fuse-overlayfs 1.10 does: uidmapping=0:100:10 shows a file of uid 3 as
    103); ids given through the mount are stored the other way; outside
    every range, 65534 both ways. Empty fields are skipped, as podman
    writes them (uidmapping=:0:100000:65536)."""
    m = IdMap.parse("0:1000:100:500:5000:10")
    assert m.shown(5) == 1005 and m.shown(503) == 5003 and m.shown(499) == OVERFLOW_ID
    assert m.host(1007) == 7 and m.host(5009) == 509 and m.host(200) == OVERFLOW_ID
    assert IdMap.parse(":0:100000:65536").ranges == ((0, 100000, 65536),)
    for bad in ("", "0:1000", "a:b:c", "0:1000:0", "0:1000:10:5:2000:10"):
        with pytest.raises(IdMapError):
            IdMap.parse(bad)


@pytest.fixture
def layer(tmp_path):
    mountutil.require_root()
    mountutil.require_fuse()
    mountutil.require_ours()
    for d in ("l", "u", "w", "m"):
        (tmp_path / d).mkdir()
    f = tmp_path / "l" / "f"
    f.write_bytes(b"lower")
    os.chown(f, 1005, 2003)
    g = tmp_path / "l" / "g"
    g.write_bytes(b"unmapped owner")
    os.chown(g, 50000, 50000)
    return tmp_path


def mount(t, mounts, *opts):
    mounts.ours([str(t / "l")], str(t / "u"), str(t / "w"), str(t / "m"), opts)
    return t / "m"


def test_uid_gid_mapping(layer):
    """uidmapping=1000:0:100: the layers' ids 1000.. show as 0.. (a store
    of host ids seen with the container's), as fuse-overlayfs shows them."""
    t = layer
    with mountutil.MountTracker() as mounts:
        m = mount(t, mounts, "uidmapping=1000:0:100", "gidmapping=2000:0:100")
        assert (os.stat(m / "f").st_uid, os.stat(m / "f").st_gid) == (5, 3)
        assert (os.stat(m / "g").st_uid, os.stat(m / "g").st_gid) == (OVERFLOW_ID, OVERFLOW_ID)
        (m / "new").write_bytes(b"by root")             # root = shown 0
        os.chown(m / "f", 7, 8)                         # copies f up
        assert (os.stat(m / "new").st_uid, os.stat(m / "new").st_gid) == (0, 0)
        assert (os.stat(m / "f").st_uid, os.stat(m / "f").st_gid) == (7, 8)
        os.chown(m / "new", 500, -1)                    # not mapped: the overflow id
        assert os.stat(m / "new").st_uid == OVERFLOW_ID
    # on disk: the layers' ids
    assert (os.stat(t / "u" / "new").st_uid, os.stat(t / "u" / "new").st_gid) == (OVERFLOW_ID, 2000)
    assert (os.stat(t / "u" / "f").st_uid, os.stat(t / "u" / "f").st_gid) == (1007, 2008)
    assert os.stat(t / "l" / "f").st_uid == 1005        # the lower file is untouched


def test_mapping_as_fuse_overlayfs(layer):
    """The same map, the same owners as fuse-overlayfs shows."""
    import shutil
    fo = shutil.which("fuse-overlayfs")
    if fo is None:
        pytest.skip("fuse-overlayfs is not installed")
    t = layer
    (t / "u2").mkdir()
    (t / "w2").mkdir()
    (t / "m2").mkdir()
    opts = "uidmapping=1000:0:100:0:5000:10,gidmapping=2000:0:100"
    with mountutil.MountTracker() as mounts:
        m = mount(t, mounts, *opts.split(","))
        subprocess.run([fo, "-o", f"lowerdir={t}/l,upperdir={t}/u2,workdir={t}/w2,{opts}",
                        str(t / "m2")], check=True, capture_output=True)
        mounts.track(str(t / "m2"))
        for name in ("f", "g"):
            a, b = os.stat(m / name), os.stat(t / "m2" / name)
            assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), name


def test_squash_to_root(layer):
    t = layer
    with mountutil.MountTracker() as mounts:
        m = mount(t, mounts, "squash_to_root")
        for name in ("f", "g"):
            st = os.stat(m / name)
            assert (st.st_uid, st.st_gid) == (0, 0)


def test_bad_mapping_is_refused(layer):
    t = layer
    r = subprocess.run([sys.executable, "-m", "overlay", "mount", "-o",
                        f"lowerdir={t}/l,upperdir={t}/u,workdir={t}/w,uidmapping=0:1000",
                        str(t / "m")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith(
        "uidmapping=0:1000: expected CONTAINER:HOST:SIZE triples")
    assert not mountutil.is_mounted(str(t / "m"))


def test_overlay_stats(layer):
    t = layer
    data = os.urandom(300_000)
    (t / "l" / "big").write_bytes(data)
    with mountutil.MountTracker() as mounts:
        m = mount(t, mounts)
        before = json.loads(subprocess.run(
            [sys.executable, "-m", "overlay", "stats", "--json", str(m)],
            capture_output=True, text=True, check=True).stdout)
        os.listdir(m)
        with open(m / "big", "ab") as f:                # one copy-up
            f.write(b"!")
        for _ in range(3):
            os.stat(m / "f")
        out = subprocess.run([sys.executable, "-m", "overlay", "stats", "--json", str(m)],
                             capture_output=True, text=True, check=True).stdout
        after = json.loads(out)
        text = subprocess.run([sys.executable, "-m", "overlay", "stats", str(m)],
                              capture_output=True, text=True, check=True).stdout
        assert "overlay-fuse" not in " ".join(os.listxattr(m))
        with pytest.raises(OSError) as ei:
            os.setxattr(m, "user.overlay-fuse.stats", b"x")
        assert ei.value.errno == errno.EPERM
    assert after["core"]["copy_ups"] - before["core"]["copy_ups"] == 1
    assert after["core"]["bytes_copied"] - before["core"]["bytes_copied"] == len(data)
    req = after["requests"]
    assert req["open"] >= 1 and req.get("readdir", 0) + req.get("readdirplus", 0) >= 1
    if mountutil.passthrough():
        assert after["passthrough"] is True      # file data never reaches the daemon
    else:
        assert req["write"] >= 1
    assert "copy-ups        1, 300000 bytes copied" in text
    r = subprocess.run([sys.executable, "-m", "overlay", "stats", str(t / "l")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not an overlay mount of ours" in r.stderr

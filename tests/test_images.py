"""Lower layers given as OCI layer blobs (overlay.images, issue 23): a tar,
tar+gzip or tar+zstd file as a lowerdir entry. The merged tree must equal
the kernel overlay's over the same layer extracted with tar (OCI whiteouts
turned into the kernel's, as containers/storage does), metadata included;
data come from the blob only when a file is opened; the index is reused
by later mounts and rebuilt when it does not match; damaged data give EIO,
never wrong bytes. Mounts are unmounted in teardown."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile

import pytest

import mountutil
from difftest.snapshot import diff_snapshots, snapshot_mount
from relutil import mkdirs, relmounts, reltmp  # noqa: F401  (fixtures)

zstandard = pytest.importorskip("zstandard", reason="the images extra (zstandard) is not installed")
pytest.importorskip("indexed_gzip", reason="the images extra (indexed_gzip) is not installed")

MTIME = 1_600_000_000


def _member(tf, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, uid=0, gid=0, mtime=MTIME,
            xattrs=None, linkname="", major=0, minor=0):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    ti.linkname = linkname
    ti.devmajor, ti.devminor = major, minor
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                          for k, v in xattrs.items()}
    if kind == tarfile.REGTYPE:
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        tf.addfile(ti)


def layer_tar(path):
    """One layer: dirs, files of several sizes, owners and modes, xattrs,
    a hard link, symlinks, a fifo and a device, set-id bits, and OCI
    whiteouts over the layer below (a file, a dir, an opaque dir)."""
    big = hashlib.sha256(b"seed").digest() * (3 << 15)      # 3 MiB
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "etc", tarfile.DIRTYPE, mode=0o755)
        _member(tf, "etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")
        _member(tf, "etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42)
        _member(tf, "usr", tarfile.DIRTYPE, mode=0o755)
        _member(tf, "usr/bin", tarfile.DIRTYPE, mode=0o755)
        _member(tf, "usr/bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755)
        _member(tf, "usr/bin/tool2", tarfile.LNKTYPE, linkname="usr/bin/tool")
        _member(tf, "usr/bin/sh", tarfile.SYMTYPE, linkname="/bin/busybox", mode=0o777)
        _member(tf, "usr/lib", tarfile.DIRTYPE, mode=0o755, uid=1000, gid=1000)
        _member(tf, "usr/lib/big.bin", data=big, mode=0o600, uid=1000, gid=1000)
        _member(tf, "usr/lib/cap", data=b"\x7fELF", mode=0o755,
                xattrs={"user.note": b"hello", "security.capability": b"\x01\x00\x00\x02" + bytes(16)})
        _member(tf, "usr/lib/empty", data=b"")
        # (data zstd:chunked cuts in several chunks, each a frame of its own)
        rnd = __import__("random").Random(5)
        # (and more than the 1 MiB read ahead: what comes after it is not)
        _member(tf, "usr/lib/noise.bin", data=rnd.randbytes(1_500_000))
        _member(tf, "usr/lib/os.py", data=open(os.__file__, "rb").read())
        for i in range(50):
            _member(tf, f"usr/share/doc/f{i:02d}", data=b"doc %d\n" % i * (i + 1), mtime=MTIME + i)
        _member(tf, "dev", tarfile.DIRTYPE, mode=0o755)
        _member(tf, "dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3)
        _member(tf, "run", tarfile.DIRTYPE, mode=0o1777)
        _member(tf, "run/fifo", tarfile.FIFOTYPE, mode=0o600)
        _member(tf, "old/.wh.gone", data=b"")               # hides old/gone below
        _member(tf, ".wh.olddir", data=b"")                 # hides olddir below
        _member(tf, "opq", tarfile.DIRTYPE, mode=0o755)
        _member(tf, "opq/.wh..wh..opq", data=b"")           # opq's lower entries hidden
        _member(tf, "opq/new", data=b"new\n")
        _member(tf, "implicit/parent/file", data=b"made without its dirs\n")


def lower_dir(base):
    """The layer below the blob: what its whiteouts hide, and more."""
    low = os.path.join(base, "below")
    for p, data in [("old/gone", b"gone\n"), ("old/kept", b"kept\n"), ("olddir/x", b"x\n"),
                    ("opq/hidden", b"hidden\n"), ("etc/hostname", b"below\n"), ("etc/passwd", b"old\n")]:
        os.makedirs(os.path.dirname(os.path.join(low, p)), exist_ok=True)
        with open(os.path.join(low, p), "wb") as f:
            f.write(data)
    return low


def extract_as_kernel_layer(tar, dest):
    """tar -x, then the OCI whiteouts in the kernel's format (what
    containers/storage does before a kernel overlay mount)."""
    os.makedirs(dest)
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", tar, "-C", dest],
                   check=True)
    for root, dirs, files in os.walk(dest):
        for n in files:
            if n == ".wh..wh..opq":
                os.unlink(os.path.join(root, n))
                os.setxattr(root, "trusted.overlay.opaque", b"y")
            elif n.startswith(".wh."):
                os.unlink(os.path.join(root, n))
                os.mknod(os.path.join(root, n[4:]), stat.S_IFCHR, 0)
    # the swaps changed their dirs' times: back to the tar's
    with tarfile.open(tar) as tf:
        for ti in tf:
            if ti.isdir():
                p = os.path.join(dest, ti.name)
                os.utime(p, ns=(ti.mtime * 10**9, ti.mtime * 10**9), follow_symlinks=False)
    return dest


def compress(tar, fmt):
    if fmt == "tar":
        return tar
    if fmt == "gzip":
        out = tar + ".gz"
        with open(tar, "rb") as src, gzip.open(out, "wb", compresslevel=6) as dst:
            dst.write(src.read())
        return out
    out = tar + ".zst"
    with open(tar, "rb") as src, open(out, "wb") as dst:
        dst.write(zstandard.ZstdCompressor(level=3).compress(src.read()))
    return out


@pytest.fixture
def images(reltmp):
    base = os.path.join(reltmp, "img")
    os.makedirs(base)
    tar = os.path.join(base, "layer.tar")
    layer_tar(tar)
    return base, tar, lower_dir(base)


@pytest.mark.parametrize("fmt", ["tar", "gzip", "zstd"])
def test_blob_layer_equals_its_extraction(images, relmounts, fmt):
    mountutil.require_ours()
    if mountutil._probe_kernel_overlay() is not None:
        pytest.skip("needs the kernel overlay to compare with")
    base, tar, low = images
    blob = compress(tar, fmt)
    ext = extract_as_kernel_layer(tar, os.path.join(base, "extracted"))
    ku, kw, km = mkdirs(base, "ku", "kw", "km")
    relmounts.kernel([ext, low], ku, kw, km)
    ou, ow, om = mkdirs(base, "ou", "ow", "om")
    cache = os.path.join(base, "cache")
    relmounts.ours([blob, low], ou, ow, om, (f"blob_cache={cache}",))
    # nothing read yet: the skeleton holds no data
    tree = _tree_of(cache)
    assert os.stat(f"{tree}/usr/lib/big.bin").st_blocks == 0
    a, b = snapshot_mount(km), snapshot_mount(om)
    assert diff_snapshots(a, b, "kernel", "ours") == []
    assert os.stat(f"{tree}/usr/lib/big.bin").st_blocks > 0     # read by the snapshot
    with open(f"{om}/usr/bin/tool", "rb") as f:
        assert f.read() == b"#!/bin/sh\necho tool\n"
    # (the snapshot leaves security.* out: a file's capability survives its data)
    assert os.getxattr(f"{om}/usr/lib/cap", "security.capability") == \
        os.getxattr(f"{km}/usr/lib/cap", "security.capability")
    assert os.stat(f"{om}/usr/bin/tool").st_mode == os.stat(f"{km}/usr/bin/tool").st_mode


def _tree_of(cache):
    (hexd,) = os.listdir(os.path.join(cache, "sha256"))
    return os.path.join(cache, "sha256", hexd, "tree")


@pytest.fixture
def gzip_mounted(images, relmounts):
    """The layer as a gzip blob over the dir below it, mounted: (base, the
    blob, the dir below, upper, work, mount point, cache)."""
    mountutil.require_ours()
    base, tar, low = images
    blob = compress(tar, "gzip")
    u, w, m = mkdirs(base, "u", "w", "m")
    cache = os.path.join(base, "cache")
    relmounts.ours([blob, low], u, w, m, (f"blob_cache={cache}",))
    return base, blob, low, u, w, m, cache


def test_data_come_only_for_files_read_and_copy_up_works(gzip_mounted):
    base, blob, low, u, w, m, cache = gzip_mounted
    tree = _tree_of(cache)
    assert len(os.listdir(f"{m}/usr/share/doc")) == 50
    assert os.stat(f"{m}/usr/lib/big.bin").st_size == 3 << 20
    with open(f"{m}/usr/share/doc/f07", "rb") as f:
        assert f.read() == b"doc 7\n" * 8
    filled = {n for n in os.listdir(f"{tree}/usr/share/doc") if os.stat(f"{tree}/usr/share/doc/{n}").st_blocks}
    # f07, and the small files after it in the blob (read ahead, 1 MiB at
    # most), none before it
    assert "f07" in filled and not filled & {f"f{i:02d}" for i in range(7)}, filled
    assert os.stat(f"{tree}/usr/lib/big.bin").st_blocks == 0
    # which layer, which entry of the blob, taken out or not
    which = os.getxattr(f"{m}/usr/share/doc/f07", "user.overlay-fuse.layer").decode()
    assert which.startswith(f"lower 0: {blob} (layer blob sha256:") and "entry usr/share/doc/f07: 48 bytes" \
        in which and which.endswith("taken out)"), which
    assert os.getxattr(f"{m}/usr/share/doc/f06", "user.overlay-fuse.layer").decode().endswith("not read yet)")
    assert "lower 1: " + low in os.getxattr(f"{m}/etc", "user.overlay-fuse.layer").decode()
    st = json.loads(os.getxattr(m, "user.overlay-fuse.stats"))
    (img,) = st["images"]
    assert img["blob"] == blob and img["files_filled"] >= len(filled) and img["bytes_filled"] < 1 << 20, img
    # copy-up: a write to a blob file copies its data up first
    with open(f"{m}/usr/lib/big.bin", "r+b") as f:
        f.seek(10)
        f.write(b"XYZ")
    with open(f"{u}/usr/lib/big.bin", "rb") as f:
        data = f.read()
    want = bytearray(hashlib.sha256(b"seed").digest() * (3 << 15))
    want[10:13] = b"XYZ"
    assert data == bytes(want)
    st = os.stat(f"{u}/usr/lib/big.bin")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)
    # and the lower file stays as it was
    with open(f"{tree}/usr/lib/big.bin", "rb") as f:
        assert f.read(16) == hashlib.sha256(b"seed").digest()[:16]


def test_index_reused_and_rebuilt_when_it_does_not_match(gzip_mounted, relmounts):
    base, blob, low, u, w, m, cache = gzip_mounted
    tree = _tree_of(cache)
    marker = os.path.join(os.path.dirname(tree), "marker")
    open(marker, "w").close()       # gone only if the cache entry is rebuilt
    with open(f"{m}/etc/passwd", "rb") as f:
        assert f.read() == b"root:x:0:0::/root:/bin/sh\n"
    relmounts.umount(m)
    relmounts.ours([blob, low], u, w, m, (f"blob_cache={cache}",))
    assert os.path.exists(marker)                           # reused
    relmounts.umount(m)
    idx = os.path.join(os.path.dirname(tree), "index.json")
    doc = json.load(open(idx))
    doc["files"][0][2] += 1                                 # an offset changed: its checksum fails
    json.dump(doc, open(idx, "w"))
    relmounts.ours([blob, low], u, w, m, (f"blob_cache={cache}",))
    assert not os.path.exists(marker)                       # rebuilt
    with open(f"{m}/usr/lib/cap", "rb") as f:
        assert f.read() == b"\x7fELF"


def test_index_of_names_not_utf8_written_and_reused(reltmp, relmounts):
    """A layer whose names are not all UTF-8 (a byte of latin-1 in a GNU
    tar; msgspec refuses such a name, json writes it escaped) and one whose
    names are: each gets an index that a second prepare reuses as it is
    (not rebuilt), and the file's data come out right from it, and through
    a mount."""
    mountutil.require_ours()
    from overlay.images.layer import BlobLayer
    for kind, name in (("latin1", "caf\udce9/men\udcfa"), ("utf8", "caf\u00e9/men\u00fa")):
        base = os.path.join(reltmp, kind)
        os.makedirs(base)
        tar = os.path.join(base, "layer.tar")
        with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
            _member(tf, name, data=b"plat du jour\n")
        cache = os.path.join(base, "cache")
        layer = BlobLayer(tar, cache)
        try:
            tree = layer.prepare()
            layer._built.wait(30)
        finally:
            layer.close()
        idx = os.path.join(os.path.dirname(tree), "index.json")
        assert os.path.exists(idx)
        before = os.stat(idx).st_ino
        again = BlobLayer(tar, cache)
        try:
            assert again.prepare() == tree
            assert os.stat(idx).st_ino == before, "the index was written again"
            ino = os.lstat(os.path.join(tree, name)).st_ino
            assert again.files[ino][0] == name
            again.ensure(ino)
            with open(os.path.join(tree, name), "rb") as f:
                assert f.read() == b"plat du jour\n"
        finally:
            again.close()
        u, w, m = mkdirs(base, "u", "w", "m")
        relmounts.ours([tar], u, w, m, (f"blob_cache={cache}",))
        assert os.listdir(os.fsencode(m)) == [os.fsencode(name.split("/")[0])]
        with open(os.path.join(m, name), "rb") as f:
            assert f.read() == b"plat du jour\n"


def test_damaged_blob_data_give_eio_never_wrong_bytes(images, relmounts):
    mountutil.require_ours()
    base, tar, low = images
    u, w, m = mkdirs(base, "u", "w", "m")
    cache = os.path.join(base, "cache")
    relmounts.ours([tar, low], u, w, m, (f"blob_cache={cache}",))
    relmounts.umount(m)
    # the blob changes behind the cache's back (same size and times)
    st = os.stat(tar)
    with tarfile.open(tar) as tf:
        off = tf.getmember("usr/bin/tool").offset_data
    with open(tar, "r+b") as f:
        f.seek(off)
        f.write(b"#!/bin/XX")
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    relmounts.ours([tar, low], u, w, m, (f"blob_cache={cache}",))
    with pytest.raises(OSError) as e:
        with open(f"{m}/usr/bin/tool", "rb") as f:
            f.read()
    assert e.value.errno == 5
    with open(f"{m}/etc/passwd", "rb") as f:            # the rest is served
        assert f.read() == b"root:x:0:0::/root:/bin/sh\n"


def test_not_a_layer_blob_is_refused_in_one_line(reltmp):
    bad = os.path.join(reltmp, "notalayer")
    with open(bad, "wb") as f:
        f.write(b"hello, this is no tar\n" * 100)
    u, w, m = mkdirs(reltmp, "u", "w", "m")
    r = subprocess.run(mountutil_cmd(f"lowerdir={bad},upperdir={u},workdir={w}", m),
                       capture_output=True, text=True, env=mountutil_env(), timeout=60)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "neither a directory nor a layer blob" in lines[0], r.stderr
    assert not os.path.ismount(m)


def mountutil_cmd(opts, mp):
    from relutil import overlay_cmd
    return overlay_cmd("mount", "-o", opts, mp)


def mountutil_env():
    from relutil import overlay_env
    return overlay_env()


# ---------------------------------------------------------------------------
# image=: an OCI layout dir, and a registry on loopback (Debian's
# docker-registry, started here with a temporary store; skopeo pushes)


def oci_layout(base, layers, tag="v1", annotations=None):
    """An OCI layout dir holding an image of these layer blobs (bottom
    first), as skopeo copy ... oci:DIR:TAG writes one (annotations: each
    layer's descriptor's, or None)."""
    root = os.path.join(base, "layout")
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs)

    def put(data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(data)
        return "sha256:" + d

    descs, diffs = [], []
    for k, path in enumerate(layers):
        data = open(path, "rb").read()
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        diffs.append("sha256:" + hashlib.sha256(raw).hexdigest())
        mt = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if raw is not data else "")
        descs.append({"mediaType": mt, "digest": put(data), "size": len(data)})
        if annotations and annotations[k]:
            descs[-1]["annotations"] = annotations[k]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diffs},
                         "config": {}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": put(config), "size": len(config)},
                           "layers": descs}).encode()
    md = put(manifest)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": len(manifest),
             "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    return root


def push(layout, dest, fmt=None):
    """The image tagged v1 of an OCI layout pushed with skopeo to dest (a
    registry on loopback: plain HTTP), as it is or compressed as fmt."""
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                    *(["--dest-compress", "--dest-compress-format", fmt] if fmt else []),
                    f"oci:{layout}:v1", f"docker://{dest}"], check=True, capture_output=True, timeout=120)


def base_layer(path):
    """The layer below: what the top layer's whiteouts hide, and more."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [("old/gone", b"gone\n"), ("old/kept", b"kept\n"), ("olddir/x", b"x\n"),
                           ("opq/hidden", b"hidden\n"), ("etc/hostname", b"below\n"), ("etc/passwd", b"old\n")]:
            _member(tf, name, data=data)
    return compress(path, "gzip")


@pytest.fixture
def image_layout(images):
    base, tar, _low = images
    bottom = base_layer(os.path.join(base, "base.tar"))
    top = compress(tar, "gzip")
    return base, oci_layout(base, [bottom, top]), bottom, top


def test_image_from_an_oci_layout(image_layout, relmounts):
    """image=oci:PATH:TAG mounts the image's layers, in their order, as
    the same blobs given as lowerdir= show them."""
    mountutil.require_ours()
    base, layout, bottom, top = image_layout
    cache = os.path.join(base, "cache")
    u1, w1, m1, u2, w2, m2 = mkdirs(base, "u1", "w1", "m1", "u2", "w2", "m2")
    relmounts.ours([top, bottom], u1, w1, m1, (f"blob_cache={cache}",))
    relmounts.ours([], u2, w2, m2, (f"image=oci:{layout}:v1", f"blob_cache={cache}"))
    assert diff_snapshots(snapshot_mount(m1), snapshot_mount(m2), "lowerdir", "image") == []
    assert sorted(os.listdir(f"{m2}/old")) == ["kept"] and not os.path.exists(f"{m2}/olddir")


@pytest.fixture
def registry(reltmp):
    """docker-registry on 127.0.0.1 (a free port), its store in reltmp."""
    import shutil
    import socket
    exe = shutil.which("docker-registry")
    if exe is None or shutil.which("skopeo") is None:
        pytest.skip("docker-registry and skopeo are needed (apt-get install docker-registry skopeo)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = os.path.join(reltmp, "registry")
    os.makedirs(store)
    conf = os.path.join(reltmp, "registry.yml")
    with open(conf, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {store}\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = _start_registry(conf)
    try:
        yield f"127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def test_image_from_a_registry_on_loopback(image_layout, registry, relmounts):
    """An image pushed with skopeo to a registry on 127.0.0.1 mounts with
    image=HOST:PORT/REPO:TAG,tls_verify=false (plain HTTP), by tag and by
    digest, as the same layers from disk; its blobs are checked against
    their digests; with the registry gone the mount fails in one line."""
    mountutil.require_ours()
    base, layout, bottom, top = image_layout
    host, proc = registry
    push(layout, f"{host}/test/app:v1")
    cache = os.path.join(base, "cache")
    u1, w1, m1, u2, w2, m2, u3, w3, m3 = mkdirs(base, "u1", "w1", "m1", "u2", "w2", "m2", "u3", "w3", "m3")
    relmounts.ours([top, bottom], u1, w1, m1, (f"blob_cache={cache}",))
    relmounts.ours([], u2, w2, m2, (f"image={host}/test/app:v1", "tls_verify=false", f"blob_cache={cache}"))
    assert diff_snapshots(snapshot_mount(m1), snapshot_mount(m2), "disk", "registry") == []
    digest = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{host}/test/app:v1"],
                                       check=True, capture_output=True, text=True).stdout)["Digest"]
    relmounts.ours([], u3, w3, m3, (f"image={host}/test/app@{digest}", "tls_verify=false",
                                    f"blob_cache={os.path.join(base, 'cache2')}"))
    with open(f"{m3}/etc/passwd", "rb") as f:
        assert f.read() == b"root:x:0:0::/root:/bin/sh\n"
    proc.terminate()
    proc.wait(timeout=30)
    u4, w4, m4 = mkdirs(base, "u4", "w4", "m4")
    r = subprocess.run(mountutil_cmd(f"image={host}/test/app:v2,tls_verify=false,upperdir={u4},workdir={w4},"
                                     f"blob_cache={os.path.join(base, 'cache3')}", m4),
                       capture_output=True, text=True, env=mountutil_env(), timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and host in lines[0] and "Connection refused" in lines[0], r.stderr


def test_image_from_a_registry_over_tls(image_layout, reltmp, relmounts):
    """A registry serving HTTPS only, with a self-signed certificate:
    tls_verify=false mounts its image (HTTPS, the certificate not
    checked); without it (TLS verified, the default) the mount fails in one
    line that says why."""
    import shutil
    import socket
    mountutil.require_ours()
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None:
        pytest.skip("docker-registry and skopeo are needed (apt-get install docker-registry skopeo)")
    base, layout, bottom, top = image_layout
    key, cert = os.path.join(reltmp, "tls.key"), os.path.join(reltmp, "tls.crt")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store, conf = os.path.join(reltmp, "registry-tls"), os.path.join(reltmp, "registry-tls.yml")
    os.makedirs(store)
    with open(conf, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {store}\n"
                f"http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {cert}\n    key: {key}\n")
    proc = _start_registry(conf)
    try:
        host = f"127.0.0.1:{port}"
        push(layout, f"{host}/test/tls:v1")
        cache = os.path.join(base, "cache")
        u1, w1, m1, u2, w2, m2 = mkdirs(base, "u1", "w1", "m1", "u2", "w2", "m2")
        relmounts.ours([top, bottom], u1, w1, m1, (f"blob_cache={cache}",))
        relmounts.ours([], u2, w2, m2, (f"image={host}/test/tls:v1", "tls_verify=false", f"blob_cache={cache}"))
        assert diff_snapshots(snapshot_mount(m1), snapshot_mount(m2), "disk", "registry") == []
        u3, w3, m3 = mkdirs(base, "u3", "w3", "m3")
        r = subprocess.run(mountutil_cmd(f"image={host}/test/tls:v1,upperdir={u3},workdir={w3},"
                                         f"blob_cache={os.path.join(base, 'cache2')}", m3),
                           capture_output=True, text=True, env=mountutil_env(), timeout=120)
        assert r.returncode != 0 and not mountutil.is_mounted(m3)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and host in lines[0] and "CERTIFICATE_VERIFY_FAILED" in lines[0], r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _start_registry(conf, wrap=()):
    """docker-registry serving conf (run through the command wrap, such as
    ip netns exec NS, where given), once it answers at its http addr (over
    HTTPS, its certificate unchecked, where conf has tls)."""
    import shutil
    import ssl
    import time
    import urllib.request
    proc = subprocess.Popen([*wrap, shutil.which("docker-registry"), "serve", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    text = open(conf).read()
    addr = text.split("addr: ")[1].split()[0]
    unchecked = None
    if "tls:" in text:
        unchecked = ssl.create_default_context()
        unchecked.check_hostname, unchecked.verify_mode = False, ssl.CERT_NONE
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{'https' if unchecked else 'http'}://{addr}/v2/", timeout=1,
                                   context=unchecked).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("docker-registry did not start")


def test_zstd_chunked_image_fetches_only_what_is_read(images, registry, relmounts, reltmp):
    """A zstd:chunked image in a registry: the first mount fetches the
    table of contents only; a file's chunks come when it is opened, checked
    against the TOC's digest; the tree equals the same layers from disk.
    With the registry stopped, opening a file not fetched yet gives EIO
    (the rest goes on), and works again once the registry is back."""
    mountutil.require_ours()
    base, tar, low = images
    bottom = os.path.join(base, "base.tar")
    base_layer(bottom)
    layout = oci_layout(base, [bottom, tar])       # uncompressed: skopeo compresses
    host, proc = registry
    push(layout, f"{host}/test/chunked:v1", "zstd:chunked")
    u, w, m, u2, w2, m2 = mkdirs(base, "u", "w", "m", "u2", "w2", "m2")
    relmounts.ours([], u, w, m, (f"image={host}/test/chunked:v1", "tls_verify=false",
                                 f"blob_cache={os.path.join(base, 'cache')}"))
    st = json.loads(os.getxattr(m, "user.overlay-fuse.stats"))
    top = next(i for i in st["images"] if i["layer"] == "lower 0")
    assert top["format"] == "zstd:chunked" and top["files_filled"] == 0
    toc_bytes = top["bytes_fetched"]
    with open(f"{m}/etc/passwd", "rb") as f:
        assert f.read() == b"root:x:0:0::/root:/bin/sh\n"
    st = json.loads(os.getxattr(m, "user.overlay-fuse.stats"))
    top = next(i for i in st["images"] if i["layer"] == "lower 0")
    # the file and the small ones after it (read ahead), not the big ones
    assert top["files_filled"] >= 1 and top["bytes_fetched"] - toc_bytes < (1 << 20) + 4096, top
    assert top["bytes_fetched"] < 0.5 * os.path.getsize(tar), top
    assert "chunk(s) at" in os.getxattr(f"{m}/etc/passwd", "user.overlay-fuse.layer").decode()
    # the registry goes away: what was fetched is served, the rest is EIO
    proc.terminate()
    proc.wait(timeout=30)
    with open(f"{m}/etc/passwd", "rb") as f:
        assert f.read() == b"root:x:0:0::/root:/bin/sh\n"
    with pytest.raises(OSError) as e:       # (past noise.bin: not read ahead)
        open(f"{m}/usr/lib/os.py", "rb").close()
    assert e.value.errno == 5
    assert os.listdir(f"{m}/usr/share/doc")          # metadata need no network
    back = _start_registry(os.path.join(reltmp, "registry.yml"))
    try:
        with open(f"{m}/usr/lib/os.py", "rb") as f:
            assert f.read() == open(os.__file__, "rb").read()
        # the whole tree, as the same layers from disk
        relmounts.ours([compress(tar, "gzip"), compress(bottom, "gzip")], u2, w2, m2,
                       (f"blob_cache={os.path.join(base, 'cache2')}",))
        assert diff_snapshots(snapshot_mount(m2), snapshot_mount(m), "disk", "zstd:chunked") == []
        _umount_and_see_the_daemon_end(relmounts, m)
    finally:
        back.terminate()
        back.wait(timeout=30)


# ---------------------------------------------------------------------------
# podman through our additional layer store (overlay layer-store)


def test_podman_runs_an_image_through_the_layer_store(registry, reltmp):
    """podman with ``additionallayerstores`` on ``overlay layer-store`` and
    our mount program: pulling a zstd:chunked image from the loopback
    registry takes its layer from the store (made from the table of
    contents, not pulled), ``podman run`` reads a file fetched then, a big
    file not read stays unfetched, and reads whole and right when read."""
    import shutil
    import sys
    import time
    import test_podman
    if test_podman._skip_reason():
        pytest.skip(test_podman._skip_reason())
    host, _proc = registry
    base = os.path.join(reltmp, "als")
    root = os.path.join(base, "rootfs")
    for d in ("bin", "etc", "data"):
        os.makedirs(os.path.join(root, d))
    shutil.copy2(test_podman.BUSYBOX, os.path.join(root, "bin", "busybox"))
    for applet in ("sh", "cat", "sha256sum"):
        os.symlink("busybox", os.path.join(root, "bin", applet))
    with open(os.path.join(root, "etc", "hello"), "w") as f:
        f.write("hello from the registry\n")
    big = os.urandom(6 << 20)
    with open(os.path.join(root, "data", "big"), "wb") as f:
        f.write(big)
    tar = os.path.join(base, "rootfs.tar")
    subprocess.run(["tar", "-C", root, "-cf", tar, "."], check=True)
    layout = oci_layout(base, [tar])
    ref = f"{host}/test/als:v1"
    push(layout, ref, "zstd:chunked")
    store, cache = os.path.join(base, "store"), os.path.join(base, "cache")
    os.makedirs(store)
    log = open(os.path.join(base, "store.log"), "w")
    served = subprocess.Popen([sys.executable, "-m", "overlay", "layer-store", "-o",
                               f"tls_verify=false,blob_cache={cache}", store],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    pm = None
    try:
        for _ in range(100):
            if mountutil.is_mounted(store) or served.poll() is not None:
                break
            time.sleep(0.1)
        assert mountutil.is_mounted(store), open(log.name).read()
        pm = test_podman.Podman(os.path.join(base, "podman"), layer_store=store)
        out = pm("pull", "--tls-verify=false", ref, check=False)
        assert out.returncode == 0, out.stderr
        assert "GC doesn't seem to be supported" not in out.stderr, out.stderr
        layers = os.path.join(pm.root, "overlay")
        marked = [d for d in os.listdir(layers) if os.path.exists(os.path.join(layers, d, "additionallayer"))]
        assert len(marked) == 1, os.listdir(layers)
        assert os.path.islink(os.path.join(layers, marked[0], "diff"))
        (skeleton,) = [os.path.join(dp, "tree") for dp, dn, _ in os.walk(os.path.join(cache, "sha256"))
                       if "tree" in dn]
        assert os.stat(f"{skeleton}/data/big").st_blocks == 0          # not pulled
        assert pm("run", "--rm", ref, "cat", "/etc/hello") == "hello from the registry\n"
        assert os.stat(f"{skeleton}/data/big").st_blocks == 0          # not read: not fetched
        out = pm("run", "--rm", ref, "sha256sum", "/data/big")
        assert out.split()[0] == hashlib.sha256(big).hexdigest()
        assert test_podman.OURS and "lowerdir=" in pm.argv_text()
    finally:
        if pm is not None:
            pm("rmi", "--all", "--force", check=False)
            pm.close()
        served.terminate()
        served.wait(timeout=30)
        log.close()
        if mountutil.is_mounted(store):
            mountutil.umount(store)
    assert not mountutil.is_mounted(store)


def test_prefetch_all_fetches_every_file_and_serves_them_offline(images, registry, relmounts):
    """prefetch=all: a zstd:chunked image's files are fetched in the
    background after the mount; once done, the registry may go away and
    every file still reads as the same layers from disk."""
    import time
    mountutil.require_ours()
    base, tar, _low = images
    bottom = os.path.join(base, "base.tar")
    base_layer(bottom)
    layout = oci_layout(base, [bottom, tar])
    host, proc = registry
    push(layout, f"{host}/test/pf:v1", "zstd:chunked")
    u, w, m, u2, w2, m2 = mkdirs(base, "u", "w", "m", "u2", "w2", "m2")
    relmounts.ours([], u, w, m, (f"image={host}/test/pf:v1", "tls_verify=false", "prefetch=all",
                                 f"blob_cache={os.path.join(base, 'cache')}"))
    deadline = time.monotonic() + 60
    while True:
        st = json.loads(os.getxattr(m, "user.overlay-fuse.stats"))["images"]
        if all(i["tree_made"] and i["files_filled"] == i["files"] for i in st) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(i["files_filled"] == i["files"] > 0 for i in st), st
    proc.terminate()
    proc.wait(timeout=30)
    relmounts.ours([compress(tar, "gzip"), compress(bottom, "gzip")], u2, w2, m2,
                   (f"blob_cache={os.path.join(base, 'cache2')}",))
    assert diff_snapshots(snapshot_mount(m2), snapshot_mount(m), "disk", "prefetched") == []
    _umount_and_see_the_daemon_end(relmounts, m)


def _umount_and_see_the_daemon_end(relmounts, m):
    """The daemon of m (with its threads: a tree made lazily, a prefetch)
    ends once m is unmounted, and its watchdog with it."""
    import time
    from relutil import find_daemon_pid
    pid = find_daemon_pid(m)        # (one: the watchdog has renamed itself)
    relmounts.umount(m)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), f"the daemon {pid} of {m} still runs after the unmount"


def test_estargz_image_fetches_only_what_is_read(images, registry, relmounts):
    """An eStargz image in a registry (written by tests/estargz.py: no tool
    here writes the format; skopeo pushes it as it is): the mount fetches
    the footer and the table of contents only, a file's gzip members when
    it is opened (a big file's chunks, each a member, checked whole against
    the table's digest); the tree equals the same layers from disk, and a
    table that does not match the descriptor's digest is refused."""
    import estargz
    mountutil.require_ours()
    base, tar, _low = images
    bottom = os.path.join(base, "base.tar")
    base_layer(bottom)
    top = os.path.join(base, "layer.estargz")
    toc_digest = estargz.write(tar, top)
    layout = oci_layout(base, [compress(bottom, "gzip"), top],
                        annotations=[None, {"containerd.io/snapshot/stargz/toc.digest": toc_digest}])
    host, _proc = registry
    push(layout, f"{host}/test/estargz:v1")
    u, w, m, u2, w2, m2 = mkdirs(base, "u", "w", "m", "u2", "w2", "m2")
    relmounts.ours([], u, w, m, (f"image={host}/test/estargz:v1", "tls_verify=false",
                                 f"blob_cache={os.path.join(base, 'cache')}"))
    st = json.loads(os.getxattr(m, "user.overlay-fuse.stats"))
    layer = next(i for i in st["images"] if i["layer"] == "lower 0")
    assert layer["format"] == "estargz" and layer["files_filled"] == 0, layer
    toc_bytes = layer["bytes_fetched"]
    assert toc_bytes < os.path.getsize(top) / 4, layer
    with open(f"{m}/etc/passwd", "rb") as f:
        assert f.read() == b"root:x:0:0::/root:/bin/sh\n"
    with open(f"{m}/usr/lib/big.bin", "rb") as f:           # three chunks
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(
            hashlib.sha256(b"seed").digest() * (3 << 15)).digest()
    layer = next(i for i in json.loads(os.getxattr(m, "user.overlay-fuse.stats"))["images"]
                 if i["layer"] == "lower 0")
    assert 2 <= layer["files_filled"] < layer["files"], layer
    relmounts.ours([compress(tar, "gzip"), compress(bottom, "gzip")], u2, w2, m2,
                   (f"blob_cache={os.path.join(base, 'cache2')}",))
    assert diff_snapshots(snapshot_mount(m2), snapshot_mount(m), "disk", "estargz") == []
    # a table that is not the one the descriptor names: refused
    bad = oci_layout(os.path.join(base, "bad"), [top],
                     annotations=[{"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "0" * 64}])
    push(bad, f"{host}/test/estargz-bad:v1")
    u3, w3, m3 = mkdirs(base, "u3", "w3", "m3")
    r = subprocess.run(mountutil_cmd(f"image={host}/test/estargz-bad:v1,tls_verify=false,upperdir={u3},"
                                     f"workdir={w3},blob_cache={os.path.join(base, 'cache3')}", m3),
                       capture_output=True, text=True, env=mountutil_env(), timeout=120)
    assert r.returncode != 0 and "does not match its digest" in r.stderr, r.stderr


def _wait_unheld(lock, timeout=20.0):
    import fcntl
    import time
    fd = os.open(lock, os.O_RDWR)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{lock} still held"
                time.sleep(0.05)
    finally:
        os.close(fd)


def test_blob_cache_max_removes_unused_layers_only(images, relmounts):
    """blob_cache_max=: past the limit, layers no mount uses are removed
    (least recently used first); a layer in use never is, and a removed
    one is rebuilt by its next mount, its files right."""
    mountutil.require_ours()
    base, tar, low = images
    a = compress(tar, "gzip")
    b = base_layer(os.path.join(base, "base.tar"))
    cache = os.path.join(base, "cache")
    hex_a = hashlib.sha256(open(a, "rb").read()).hexdigest()
    hex_b = hashlib.sha256(open(b, "rb").read()).hexdigest()
    u, w, m, u2, w2, m2, u3, w3, m3 = mkdirs(base, "u", "w", "m", "u2", "w2", "m2", "u3", "w3", "m3")
    relmounts.ours([a, low], u, w, m, (f"blob_cache={cache}",))
    with open(f"{m}/usr/lib/big.bin", "rb") as f:
        big = f.read()
    relmounts.umount(m)
    assert os.path.isdir(f"{cache}/sha256/{hex_a}")
    _wait_unheld(f"{cache}/locks/{hex_a}")         # (the daemon ends just after the unmount)
    relmounts.ours([b, low], u2, w2, m2, (f"blob_cache={cache}", "blob_cache_max=1k"))
    assert not os.path.exists(f"{cache}/sha256/{hex_a}")          # unused: removed
    assert os.path.isdir(f"{cache}/sha256/{hex_b}")               # in use: kept
    relmounts.ours([a, low], u3, w3, m3, (f"blob_cache={cache}", "blob_cache_max=1k"))
    assert os.path.isdir(f"{cache}/sha256/{hex_b}")               # still in use by m2
    with open(f"{m3}/usr/lib/big.bin", "rb") as f:
        assert f.read() == big
    with open(f"{m2}/etc/passwd", "rb") as f:
        assert f.read() == b"old\n"


def _table_of(tar):
    """An uncompressed tar's members as a table of contents gives them
    (BlobLayer._members): (TarInfo, where its data lie, their sha256)."""
    out = []
    t = tarfile.open(tar)
    for ti in t:
        if ti.isreg() and ti.size:
            h = hashlib.sha256(t.extractfile(ti).read()).hexdigest()
            out.append((ti, ti.offset_data, lambda h=h: h))
        else:
            out.append((ti, None, None))
    return out


def _opaque_over(tf, base, mtime=MTIME):
    """opq/ made opaque (holding mine) in the layer tf writes, over a lower
    dir (base/low, returned) whose opq/hidden it hides."""
    _member(tf, "opq", tarfile.DIRTYPE, mode=0o750, mtime=mtime)
    _member(tf, "opq/.wh..wh..opq", data=b"")
    _member(tf, "opq/mine", data=b"mine\n")
    low = os.path.join(base, "low")
    os.makedirs(f"{low}/opq")
    with open(f"{low}/opq/hidden", "w") as f:
        f.write("hidden\n")
    return low


def test_lazy_tree_is_made_as_the_core_looks_into_it(reltmp):
    """A layer made lazily (image= from a registry: a table of contents at
    hand), with the core and no mount, its background builder held back:
    a dir's entries are made when the core first looks into it (ensure_dir),
    its subdirs' own subdirs with them (nlink right before they are),
    the dirs on a redirect's way when one is followed (ensure_path), a hard
    link's target dir first; dirs never looked into are not made; data come
    on open; once the builder runs, the index is written and reused."""
    import threading
    from overlay_core import Overlay
    from overlay.images.layer import BlobLayer
    base = os.path.join(reltmp, "lazy")
    os.makedirs(base)
    tar = os.path.join(base, "layer.tar")
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "a/b/c/deep.txt", data=b"deep\n", mtime=MTIME + 1)
        for i in range(20):
            _member(tf, f"other/x{i}/y.txt", data=b"y%d\n" % i)
        _member(tf, "links/hl", tarfile.LNKTYPE, linkname="a/b/c/deep.txt")
        low = _opaque_over(tf, base, mtime=MTIME + 2)
    gate = threading.Event()

    class HeldBack(BlobLayer):
        def _members(self):
            return _table_of(tar)

        def _build_rest(self, lock):
            gate.wait(30)
            super()._build_rest(lock)

    cache = os.path.join(base, "cache")
    layer = HeldBack(tar, cache)
    layer.lazy = True
    tree = layer.prepare()
    u, w = mkdirs(base, "u", "w")
    os.mkdir(f"{u}/moved")
    os.setxattr(f"{u}/moved", "trusted.overlay.redirect", b"/other/x7")
    umask = os.umask(0o022)
    o = Overlay([tree, low], u, w)
    try:
        o.providers = {0: layer}
        assert sorted(os.listdir(tree)) == ["a", "links", "opq", "other"]
        # other, not looked into yet: its subdirs only (its nlink right
        # for a listing of the root), none of their files
        assert len(os.listdir(f"{tree}/other")) == 20 and os.stat(f"{tree}/other").st_nlink == 22
        assert os.listdir(f"{tree}/other/x3") == []
        n = o.root
        for c in (b"a", b"b", b"c", b"deep.txt"):
            n = o.lookup(n, c)
        fd, _ = o.open(n, os.O_RDONLY)
        try:
            assert os.pread(fd, 100, 0) == b"deep\n"
        finally:
            os.close(fd)
        hl = o.lookup(o.lookup(o.root, b"links"), b"hl")
        assert o.getattr(hl).st_ino == o.getattr(n).st_ino
        y = o.lookup(o.lookup(o.root, b"moved"), b"y.txt")           # through the redirect
        fd, _ = o.open(y, os.O_RDONLY)
        try:
            assert os.pread(fd, 100, 0) == b"y7\n"
        finally:
            os.close(fd)
        assert sorted(os.listdir(f"{tree}/other")) == [f"x{i}" for i in sorted(range(20), key=str)]
        assert os.listdir(f"{tree}/other/x3") == []                   # never looked into
        opq = o.lookup(o.root, b"opq")
        assert sorted(name for name, _ in o.readdir(opq)) == [b"mine"]  # opaque: hidden stays hidden
        assert os.stat(f"{tree}/opq").st_mtime == MTIME + 2           # its time kept after its entries
        assert not os.path.exists(f"{cache}/sha256/{layer.digest[7:]}/index.json")
        gate.set()
        assert layer._built.wait(30)
        assert os.listdir(f"{tree}/other/x3") == ["y.txt"]
        again = HeldBack(tar, cache)
        again.lazy = True
        assert again.prepare() == tree and again._plan is None and len(again.files) == 22
        again.close()
    finally:
        gate.set()
        o.close()
        layer.close()
        os.umask(umask)


def test_lazy_tree_made_without_privilege(reltmp):
    """A lazily made tree built as an unprivileged mount builds it (the
    layer told so; the test itself is root): owners and modes in
    user.containers.override_stat (the root dir too, and a dir no member
    lists), the opaque mark in user.overlay.opaque, no device, only user.*
    xattrs; the core with userxattr shows the layer's owners and modes
    and hides what the opaque dir hides (test_rootless makes a tree so as
    a real unprivileged user, from disk)."""
    from overlay_core import Overlay
    from overlay.images.layer import BlobLayer
    base = os.path.join(reltmp, "lazy-unpriv")
    os.makedirs(base)
    tar = os.path.join(base, "layer.tar")
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "bin", tarfile.DIRTYPE, mode=0o711, uid=7, gid=8)
        _member(tf, "bin/tool", data=b"tool\n", mode=0o4755, uid=1234, gid=5678,
                xattrs={"user.note": b"hi", "security.capability": b"\x01\x00\x00\x02" + bytes(16)})
        _member(tf, "dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3)
        low = _opaque_over(tf, base)

    class FromTable(BlobLayer):
        def _members(self):
            return _table_of(tar)

    layer = FromTable(tar, os.path.join(base, "cache"))
    layer.lazy, layer.unprivileged, layer.userxattr = True, True, True
    tree = layer.prepare()
    u, w = mkdirs(base, "u", "w")
    o = Overlay([tree, low], u, w, userxattr=True)
    try:
        o.providers = {0: layer}
        assert os.getxattr(tree, "user.containers.override_stat") == b"0:0:40755"
        tool = o.lookup(o.lookup(o.root, b"bin"), b"tool")
        st = o.getattr(tool)
        assert (st.st_uid, st.st_gid, st.st_mode) == (1234, 5678, 0o104755)
        st = o.getattr(o.lookup(o.root, b"bin"))
        assert (st.st_uid, st.st_gid, st.st_mode) == (7, 8, 0o40711)
        st = o.getattr(o.lookup(o.root, b"dev"))                      # listed by no member
        assert (st.st_uid, st.st_gid, st.st_mode) == (0, 0, 0o40755)
        with pytest.raises(FileNotFoundError):
            o.lookup(o.lookup(o.root, b"dev"), b"null")
        assert sorted(name for name, _ in o.readdir(o.lookup(o.root, b"opq"))) == [b"mine"]
        assert os.getxattr(f"{tree}/opq", "user.overlay.opaque") == b"y"
        assert sorted(os.listxattr(f"{tree}/bin/tool")) == ["user.containers.override_stat", "user.note"]
        assert stat.S_IMODE(os.stat(f"{tree}/bin/tool").st_mode) == 0o600
    finally:
        o.close()
        layer.close()


def test_read_ahead_of_a_lazily_made_tree_reads_no_gap(registry, reltmp):
    """Read-ahead fetches the small files after the one opened in one
    range: where files between them belong to dirs not made yet (a tree
    made lazily), the range must not run over them (it stops at its
    budget, 1 MiB, not at the sum of the sizes of the files it fills)."""
    import threading
    from overlay.images.chunked import ChunkedLayer, RemoteBlob
    from overlay.images.registry import Ref, image_manifest
    base = os.path.join(reltmp, "gap")
    os.makedirs(base)
    tar = os.path.join(base, "layer.tar")
    rnd = __import__("random").Random(9)
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "a/f1", data=b"one\n")
        _member(tf, "b/big", data=rnd.randbytes(4 << 20))        # (incompressible)
        _member(tf, "c/f2", data=b"two\n")
    layout = oci_layout(base, [tar])
    host, _proc = registry
    push(layout, f"{host}/test/gap:v1", "zstd:chunked")
    gate = threading.Event()

    class HeldBack(ChunkedLayer):
        def _build_rest(self, lock):
            gate.wait(30)
            super()._build_rest(lock)

    reg, doc = image_manifest(Ref(f"{host}/test/gap:v1"), tls_verify=False)
    remote = RemoteBlob(reg, "test/gap", doc["layers"][0])
    layer = HeldBack(remote, os.path.join(base, "cache"))
    layer.lazy = True
    try:
        tree = layer.prepare()
        with layer.tree_lock:
            layer._materialize("a")
            layer._materialize("c")
        ino = {layer.files[i][0]: i for i in layer.files}
        before = remote.fetched
        layer.ensure(ino["a/f1"])
        assert remote.fetched - before < (1 << 20), remote.fetched - before
        with open(f"{tree}/a/f1", "rb") as f:
            assert f.read() == b"one\n"
    finally:
        gate.set()
        layer._built.wait(30)
        layer.close()


def _big_and_small_layer(registry, reltmp, name):
    """A zstd:chunked image pushed to the registry, its one layer holding
    a big file (24 MiB of random bytes: past the read-ahead, fetched in
    several ranges side by side) and small files in other dirs; (the
    layer's tar, the image's reference)."""
    base = os.path.join(reltmp, name)
    os.makedirs(base)
    tar = os.path.join(base, "layer.tar")
    rnd = __import__("random").Random(5)
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "a/small", data=b"small\n")
        _member(tf, "b/big", data=rnd.randbytes(24 << 20))
        _member(tf, "c/small", data=b"after\n")
    layout = oci_layout(base, [tar])
    host, _proc = registry
    push(layout, f"{host}/test/{name}:v1", "zstd:chunked")
    return base, tar, f"{host}/test/{name}:v1"


def _chunked_layer(ref, base, remote_class=None, host=None):
    """The image's one layer as a ChunkedLayer, prepared (through host
    where given: the same registry by another address): (the layer, its
    skeleton tree, inode numbers by path)."""
    from overlay.images.chunked import ChunkedLayer, RemoteBlob
    from overlay.images.registry import Ref, image_manifest
    ref = Ref(ref if host is None else host + ref[ref.index("/"):])
    reg, doc = image_manifest(ref, tls_verify=False)
    remote = (remote_class or RemoteBlob)(reg, ref.repo, doc["layers"][0])
    layer = ChunkedLayer(remote, os.path.join(base, "cache"))
    tree = layer.prepare()
    layer._built.wait(30)
    return layer, tree, {layer.files[i][0]: i for i in layer.files}


def _data_of(tar, name):
    with tarfile.open(tar) as tf:
        return tf.extractfile(name).read()


def test_a_big_file_being_fetched_holds_up_no_other_file_of_its_layer(registry, reltmp):
    """A layer's files are filled each by itself: while a big file's
    ranges are on their way (held back here), a small file of the same
    layer is fetched and read at once; a second open of the big file waits
    for the first's fill, and both see its data."""
    import threading
    from overlay.images.chunked import RemoteBlob
    base, tar, ref = _big_and_small_layer(registry, reltmp, "side")
    gate, entered = threading.Event(), threading.Event()

    class HeldBack(RemoteBlob):
        def read_parts(self, start, end, sizes):
            if end - start > (4 << 20):     # (the big file's ranges only)
                entered.set()
                gate.wait(30)
            yield from super().read_parts(start, end, sizes)

    layer, tree, ino = _chunked_layer(ref, base, HeldBack)
    errors = []

    def fill_big():
        try:
            layer.ensure(ino["b/big"])
        except Exception as e:     # noqa: BLE001 - seen by the test below
            errors.append(e)
    try:
        first, second = threading.Thread(target=fill_big), threading.Thread(target=fill_big)
        first.start()
        assert entered.wait(30)
        second.start()
        small = threading.Thread(target=layer.ensure, args=(ino["c/small"],))
        small.start()
        small.join(10)
        assert not small.is_alive(), "a small file waited for the big one's fetch"
        with open(os.path.join(tree, "c/small"), "rb") as f:
            assert f.read() == b"after\n"
        assert first.is_alive() and second.is_alive()
        gate.set()
        first.join(30)
        second.join(30)
        assert errors == []
        with open(os.path.join(tree, "b/big"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(_data_of(tar, "b/big")).digest()
    finally:
        gate.set()
        layer.close()


class _Link:
    """A TCP relay in front of a port of 127.0.0.1 that cuts each
    connection opened while cut_after is set once it has carried that
    many bytes back: the network failing in the middle of a response."""

    def __init__(self, port):
        import socket
        import threading
        self.port_to = port
        self.cut_after = None
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading
        while True:
            try:
                c, _ = self.srv.accept()
                u = socket.create_connection(("127.0.0.1", self.port_to))
            except OSError:
                return
            self.socks += [c, u]
            threading.Thread(target=self._pipe, args=(c, u, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, self.cut_after), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, limit):
        import socket
        n = 0
        try:
            while b := src.recv(1 << 16):
                if limit is not None and n + len(b) >= limit:
                    dst.sendall(b[:limit - n])
                    break
                dst.sendall(b)
                n += len(b)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.srv.close()
        for s in self.socks:
            s.close()


def test_a_range_cut_half_way_gives_eio_and_the_next_open_reads_it(registry, reltmp):
    """The connections carrying a big file's ranges cut after 1 MiB each:
    its fill fails with EIO, the file is not taken as there and its
    skeleton is holes again (nothing half written kept); once the network
    is whole, the next fill reads it right."""
    base, tar, ref = _big_and_small_layer(registry, reltmp, "cut")
    host, _proc = registry
    link = _Link(int(host.split(":")[1]))
    layer = None
    try:
        layer, tree, ino = _chunked_layer(ref, base, host=link.host)
        big = ino["b/big"]
        link.cut_after = 1 << 20
        layer.remote.reg.pool.clear()       # (new connections: through the cutting relay)
        with pytest.raises(OSError) as e:
            layer.ensure(big)
        assert e.value.errno == 5
        assert big not in layer.done
        st = os.stat(os.path.join(tree, "b/big"))
        assert st.st_blocks == 0 and st.st_size == 24 << 20
        link.cut_after = None
        layer.remote.reg.pool.clear()
        layer.ensure(big)
        with open(os.path.join(tree, "b/big"), "rb") as f:
            assert f.read() == _data_of(tar, "b/big")
    finally:
        if layer is not None:
            layer.close()
        link.close()


def test_damaged_chunks_in_the_registry_give_eio(images, registry, relmounts, reltmp):
    """A zstd:chunked blob damaged in the registry's store (the registry
    serves ranges unchecked): opening a big file whose chunks lie there
    fails with EIO (each chunk is checked against the table's digest,
    side by side), never wrong bytes; a small file elsewhere still reads."""
    mountutil.require_ours()
    base, tar, _low = images
    layout = oci_layout(base, [tar])
    host, _proc = registry
    push(layout, f"{host}/test/bad:v1", "zstd:chunked")
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{host}/test/bad:v1"],
                         check=True, capture_output=True, text=True).stdout
    digest = json.loads(raw)["layers"][0]["digest"][7:]
    data = os.path.join(reltmp, "registry", "docker", "registry", "v2", "blobs", "sha256", digest[:2], digest, "data")
    u, w, m = mkdirs(base, "u", "w", "m")
    relmounts.ours([], u, w, m, (f"image={host}/test/bad:v1", "tls_verify=false",
                                 f"blob_cache={os.path.join(base, 'cache')}"))
    # (noise.bin: 1.5 MB of random bytes, past the read-ahead: the path of
    # big files, chunks checked each by a worker)
    where = os.getxattr(f"{m}/usr/lib/noise.bin", "user.overlay-fuse.layer").decode()
    lo, hi = (int(x) for x in where.split("chunk(s) at ")[1].split(" ")[0].split("-"))
    assert hi - lo > (1 << 20), where
    with open(data, "r+b") as f:                # inside noise.bin's chunks
        f.seek(lo + (hi - lo) // 2)
        f.write(b"\xff" * 4096)
    with pytest.raises(OSError) as e:
        open(f"{m}/usr/lib/noise.bin", "rb").read()
    assert e.value.errno == 5
    with open(f"{m}/etc/passwd", "rb") as f:
        assert f.read() == b"root:x:0:0::/root:/bin/sh\n"


def test_layer_store_refuses_bad_input_in_one_line(reltmp):
    from relutil import run_overlay
    r = run_overlay("layer-store", "-o", "bogus=1", reltmp)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "overlay layer-store: error: unknown option 'bogus=1' (blob_cache=, blob_cache_max=, tls_verify=,"
        " authfile=, prefetch=)"], r.stderr
    r = run_overlay("layer-store", "-o", "blob_cache_max=12Q", reltmp)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "blob_cache_max" in r.stderr
    r = run_overlay("layer-store", os.path.join(reltmp, "missing"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"overlay layer-store: error: {os.path.join(reltmp, 'missing')} is not a directory"], r.stderr
    assert not mountutil.is_mounted(reltmp)

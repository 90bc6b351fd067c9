"""Image layers without extraction, measured (issue 23): an image pulled
and extracted then mounted, against the same image mounted from the
registry with image= (zstd:chunked: only what is read is fetched).

    python -m benchmarks.images [--mib 1024] [--layers 5] [--scratch DIR]

Builds an image of several layers (a Python tree copied from this machine,
many small files, one big data file), pushes it with skopeo to a
docker-registry started on 127.0.0.1 (gzip, and zstd:chunked), then times
side by side:

* pull + extract + kernel overlay: ``skopeo copy`` to an OCI layout, each
  layer extracted with ``tar``, then ``mount -t overlay``: until the first
  ``stat`` of a file succeeds, and until one small file is read;
* ours, ``image=`` (zstd:chunked from the registry): the same two, with the
  bytes fetched;
* reading every file afterwards (each side);
* the big file alone, read whole on fresh mounts, against its blob
  downloaded (read only, into a file, into a file with its digest checked),
  medians of several runs: from the registry on loopback, then from one in
  a network namespace across a veth pair shaped with ``tc`` to ``--link``
  (1gbit; ``none`` to skip), as a registry across a network is.

Prints tables; writes nothing else. Needs root, skopeo, docker-registry
(and ip, tc for --link).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from .systems import REPO


def _run(*cmd, **kw):
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kw)


def build_layers(base: str, mib: int, nlayers: int) -> list[str]:
    """nlayers uncompressed layer tars, bottom first: a Python tree, small
    files, and a big file of about half of mib."""
    import random
    rnd = random.Random(3)
    layers = []
    py = os.path.dirname(os.__file__)
    t = os.path.join(base, "layer0.tar")
    # (each layer gets a file of its own for this run: skopeo reuses a blob
    # of the same content pushed before, and drops the zstd:chunked table
    # annotations when it does: such a layer would be fetched whole)
    token = os.urandom(8).hex().encode()

    def mark(tf, k):
        ti = tarfile.TarInfo(f"etc/bench-run-{k}")
        ti.size = len(token)
        tf.addfile(ti, __import__("io").BytesIO(token))
    with tarfile.open(t, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(py, arcname="usr/lib/python3", filter=lambda ti: None if "__pycache__" in ti.name else ti)
        mark(tf, 0)
    layers.append(t)
    big = mib // 2
    small_layers = max(1, nlayers - 2)
    per = max(1, (mib - big) * 1024 // 8 // small_layers)      # files of 8 KiB
    for k in range(small_layers):
        t = os.path.join(base, f"layer{k + 1}.tar")
        with tarfile.open(t, "w", format=tarfile.PAX_FORMAT) as tf:
            import io
            for i in range(per):
                data = bytes(rnd.getrandbits(8) for _ in range(64)) * 128
                ti = tarfile.TarInfo(f"srv/set{k}/d{i // 500:03d}/f{i:06d}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            mark(tf, k + 1)
        layers.append(t)
    t = os.path.join(base, f"layer{len(layers)}.tar")
    src = os.path.join(base, "big.bin")
    with open(src, "wb") as f:
        for _ in range(big):
            f.write(os.urandom(1 << 19) * 2)
    with tarfile.open(t, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname="data/big.bin")
        mark(tf, len(layers))
    os.unlink(src)
    layers.append(t)
    return layers


def _dirs(base: str, *names: str) -> list[str]:
    out = [os.path.join(base, n) for n in names]
    for d in out:
        os.makedirs(d)
    return out


def _first_reads(mp: str, path: str, t0: float) -> tuple[float, float]:
    """Seconds from t0 until a stat of path in mp succeeds, and until the
    file is read."""
    os.stat(os.path.join(mp, path))
    t_stat = time.monotonic() - t0
    with open(os.path.join(mp, path), "rb") as f:
        f.read()
    return t_stat, time.monotonic() - t0


FIRSTS = 3      # mounts from nothing timed to the first file (the median shown)


def _download(url: str, into: str | None = None, digest: str | None = None) -> float:
    """Seconds to GET url whole (after a sync: writes before it not in its
    way): read only, or into a new file (removed after), its sha256
    checked against digest where given."""
    import hashlib
    import urllib.request
    _run("sync")
    t = time.monotonic()
    h = hashlib.sha256() if digest else None
    with urllib.request.urlopen(url) as r, open(into or os.devnull, "wb") as out:
        while b := r.read(1 << 20):
            if h is not None:
                h.update(b)
            if into:
                out.write(b)
    dt = time.monotonic() - t
    if into:
        os.unlink(into)
    assert h is None or "sha256:" + h.hexdigest() == digest
    return dt


BIG_RUNS = 5       # big-file runs from the registry on loopback (medians shown)
LINK_RUNS = 3      # ... across the shaped link


def big_file(host: str, base: str, env: dict, py: str, runs: int) -> dict:
    """The image's big file read whole on a fresh mount (a cache of its
    own, removed after), then its blob downloaded three ways, runs times
    in turn: {"file": its size, "blob": the blob's size, "runs": [(ours,
    download read, into a file, into a file checked)]}."""
    import urllib.request
    from relutil import find_daemon_pid  # noqa: PLC0415 - the tests' helper (tests/ on sys.path)
    man = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"http://{host}/v2/bench/img/manifests/v1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})).read())
    blob = man["layers"][-1]
    url = f"http://{host}/v2/bench/img/blobs/{blob['digest']}"
    blob_file = os.path.join(base, "big.blob")
    out = {"blob": blob["size"], "runs": []}
    for k in range(runs):
        u, w, m, cache = _dirs(base, f"bu{k}", f"bw{k}", f"bm{k}", f"bcache{k}")
        subprocess.run([py, "-m", "overlay", "mount", "-o",
                        f"image={host}/bench/img:v1,tls_verify=false,upperdir={u},workdir={w},blob_cache={cache}", m],
                       check=True, env=env)
        pid = find_daemon_pid(m)
        try:
            out["file"] = os.path.getsize(os.path.join(m, "data/big.bin"))
            _run("sync")        # (before each: the writes before it not in its way)
            t = time.monotonic()
            with open(os.path.join(m, "data/big.bin"), "rb") as f:
                while f.read(1 << 20):
                    pass
            t_ours = time.monotonic() - t
        finally:
            subprocess.run(["umount", m], check=True)
        # (its daemon gone before its cache is: the tree's builder may be
        # making entries still)
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        for d in (u, w, m, cache):
            shutil.rmtree(d)
        out["runs"].append((t_ours,
                            _download(url),                             # (read, nothing written)
                            _download(url, blob_file),                  # (as curl -o: into a file)
                            _download(url, blob_file, blob["digest"])))  # (as a pull: checked too)
    return out


@contextlib.contextmanager
def linked_registry(store: str, rate: str):
    """A docker-registry serving store (read only) from a network namespace
    of its own, reached over a veth pair shaped to rate each way (tc tbf):
    a registry across a link, not loopback; yields its host:port. The
    namespace (and with it the pair) is removed after."""
    from test_images import _start_registry  # noqa: PLC0415 - the tests' helper (tests/ on sys.path)
    tag = f"ovlb{os.getpid() % 10**7}"
    ns, here, there = tag, tag + "a", tag + "b"
    conf = os.path.join(os.path.dirname(store), "registry-link.yml")
    with open(conf, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {store}\nhttp:\n  addr: 10.231.0.2:5000\n")
    proc = None
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _run("ip", "link", "set", there, "netns", ns)
        _run("ip", "addr", "add", "10.231.0.1/30", "dev", here)
        _run("ip", "link", "set", here, "up")
        inside = ("ip", "netns", "exec", ns)
        _run(*inside, "ip", "addr", "add", "10.231.0.2/30", "dev", there)
        _run(*inside, "ip", "link", "set", there, "up")
        _run("tc", "qdisc", "add", "dev", here, "root", "tbf", "rate", rate, "burst", "2mb", "latency", "20ms")
        _run(*inside, "tc", "qdisc", "add", "dev", there, "root", "tbf", "rate", rate, "burst", "2mb",
             "latency", "20ms")
        proc = _start_registry(conf, inside)
        yield "10.231.0.2:5000"
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "link", "del", here], check=False, capture_output=True)


def print_big(big: dict) -> None:
    """The big-file table: medians of the runs, and the throughput of ours
    against a download of the blob into a file (its time over ours)."""
    import statistics
    print("The big file read whole on a fresh mount against its blob downloaded (s), medians:")
    print()
    print("| registry | runs | ours, image= | download, read only | into a file | into a file, checked "
          "| ours' throughput / into a file's | / checked's |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for where, b in big.items():
        o, r, f, c = (statistics.median(x) for x in zip(*b["runs"]))
        print(f"| {where} ({b['file'] >> 20} MiB file, {b['blob'] >> 20} MiB blob) | {len(b['runs'])} "
              f"| {o:.2f} | {r:.2f} | {f:.2f} | {c:.2f} | {f / o:.2f}x | {c / o:.2f}x |")
    print()


def cold() -> None:
    """Caches dropped, written data first (dirty pages, as a just extracted
    tree's or prefetch=all's, are not dropped: a tree read from them would
    be read from memory)."""
    _run("sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.images", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--scratch", default=None)
    p.add_argument("--link", default="1gbit",
                   help="the big file also read from a registry across a veth link shaped to this rate "
                        "(tc's units: 1gbit, 500mbit), or none")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    sys.path.insert(0, str(REPO / "tests"))
    from test_images import _start_registry, oci_layout  # noqa: PLC0415 - the tests' helpers
    base = tempfile.mkdtemp(prefix="bench-images-", dir=args.scratch)
    mounts, regs = [], []
    try:
        layers = build_layers(base, args.mib, args.layers)
        layout = oci_layout(base, layers)
        size = sum(os.path.getsize(x) for x in layers)
        # one registry per format: skopeo would otherwise reuse the blobs of
        # the first push (same uncompressed digest) for the second
        import socket
        hosts = {}
        for fmt in ("gzip", "zstd:chunked"):
            store = os.path.join(base, "registry-" + fmt.replace(":", "-"))
            os.makedirs(store)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            conf = store + ".yml"
            with open(conf, "w") as f:
                f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                        f"    rootdirectory: {store}\nhttp:\n  addr: 127.0.0.1:{port}\n")
            regs.append(_start_registry(conf))
            hosts[fmt] = f"127.0.0.1:{port}"
            _run("skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-compress", "--dest-compress-format", fmt,
                 f"oci:{layout}:v1", f"docker://{hosts[fmt]}/bench/img:v1")
        small = "usr/lib/python3/os.py"
        rows = []

        # pull + extract + kernel overlay
        _run("sync")
        t0 = time.monotonic()
        pulled = os.path.join(base, "pulled")
        _run("skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{hosts['gzip']}/bench/img:v1", f"oci:{pulled}:v1")
        with open(os.path.join(pulled, "index.json")) as f:
            mdig = json.load(f)["manifests"][0]["digest"][7:]
        with open(os.path.join(pulled, "blobs", "sha256", mdig)) as f:
            man = json.load(f)
        dirs = []
        for i, layer in enumerate(man["layers"]):
            d = os.path.join(base, f"x{i}")
            os.makedirs(d)
            _run("tar", "-xzf", os.path.join(pulled, "blobs", "sha256", layer["digest"][7:]), "-C", d)
            dirs.append(d)
        ku, kw, km = _dirs(base, "ku", "kw", "km")
        _run("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={':'.join(dirs[::-1])},upperdir={ku},workdir={kw}", km)
        mounts.append(km)
        t_stat_k, t_read_k = _first_reads(km, small, t0)
        pulled_bytes = sum(os.path.getsize(os.path.join(pulled, "blobs", "sha256", x))
                           for x in os.listdir(os.path.join(pulled, "blobs", "sha256")))

        # ours, lazily (the extraction's writes out of the way first, as
        # the pull's start had nothing being written)
        _run("sync")
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        py = str(REPO / ".venv" / "bin" / "python")
        # (three times from nothing, each with a cache of its own: a second
        # is noise on a shared VM; the median is reported, the last mount
        # is the one read through below, the others unmounted at once: a
        # mount's tree builder, in the background, would slow the next)
        firsts = []
        for k in range(FIRSTS):
            ou, ow, om = _dirs(base, f"ou{k}", f"ow{k}", f"om{k}")
            t0 = time.monotonic()
            subprocess.run([py, "-m", "overlay", "mount", "-o",
                            f"image={hosts['zstd:chunked']}/bench/img:v1,tls_verify=false,upperdir={ou},"
                            f"workdir={ow},blob_cache={os.path.join(base, f'cache{k}')}", om], check=True, env=env)
            mounts.append(om)
            firsts.append(_first_reads(om, small, t0))
            if k == FIRSTS - 1:
                st = json.loads(os.getxattr(om, "user.overlay-fuse.stats"))
                fetched = sum(i.get("bytes_fetched", 0) for i in st["images"])
            else:
                subprocess.run(["umount", om], check=True)
                mounts.remove(om)
        # (its tree's builder done before anything else is timed: its
        # writes would slow the others' reads)
        while not all(i["tree_made"] for i in json.loads(os.getxattr(om, "user.overlay-fuse.stats"))["images"]):
            time.sleep(0.2)
        t_stat_o = sorted(f[0] for f in firsts)[len(firsts) // 2]
        t_read_o = sorted(f[1] for f in firsts)[len(firsts) // 2]
        spread = f" ({min(f[1] for f in firsts):.2f}-{max(f[1] for f in firsts):.2f})"

        def read_all(root):
            t = time.monotonic()
            for dp, _dn, fn in os.walk(root):
                for n in fn:
                    pth = os.path.join(dp, n)
                    if os.path.isfile(pth) and not os.path.islink(pth):
                        with open(pth, "rb") as f:
                            while f.read(1 << 20):
                                pass
            return time.monotonic() - t
        # the extracted dirs under fuse-overlayfs and ours too: reading
        # every file through FUSE costs what it costs whatever the layers
        fu, fw, fm, du, dw, dm = _dirs(base, "fu", "fw", "fm", "du", "dw", "dm")
        _run("fuse-overlayfs", "-o", f"lowerdir={':'.join(dirs[::-1])},upperdir={fu},workdir={fw}", fm)
        mounts.append(fm)
        subprocess.run([py, "-m", "overlay", "mount", "-o",
                        f"lowerdir={':'.join(dirs[::-1])},upperdir={du},workdir={dw}", dm], check=True, env=env)
        mounts.append(dm)
        cold()
        t_all_k = read_all(km)
        cold()
        t_all_f = read_all(fm)
        cold()
        t_all_d = read_all(dm)
        cold()
        t_all_o = read_all(om)
        st = json.loads(os.getxattr(om, "user.overlay-fuse.stats"))
        fetched_all = sum(i.get("bytes_fetched", 0) for i in st["images"])

        # ours with prefetch=all: until every file is local, then read all
        pu, pw, pm = _dirs(base, "pu", "pw", "pm")
        t0 = time.monotonic()
        subprocess.run([py, "-m", "overlay", "mount", "-o",
                        f"image={hosts['zstd:chunked']}/bench/img:v1,tls_verify=false,prefetch=all,"
                        f"upperdir={pu},workdir={pw},blob_cache={os.path.join(base, 'cache-pf')}", pm],
                       check=True, env=env)
        mounts.append(pm)
        while True:
            st = json.loads(os.getxattr(pm, "user.overlay-fuse.stats"))["images"]
            if all(i["tree_made"] and i["files_filled"] == i["files"] for i in st):
                break
            time.sleep(0.05)
        t_local_p = time.monotonic() - t0
        cold()
        t_all_p = read_all(pm)

        # the big file alone, on fresh mounts, against plain downloads of
        # the blob that holds it: from the registry on loopback, then
        # across a link of a given speed
        big = {"loopback": big_file(hosts["zstd:chunked"], base, env, py, BIG_RUNS)}
        if args.link != "none":
            with linked_registry(os.path.join(base, "registry-zstd-chunked"), args.link) as lhost:
                big[f"a {args.link} link"] = big_file(lhost, base, env, py, LINK_RUNS)
        rows = [
            ("first stat (s)", f"{t_stat_k:.2f}", f"{t_stat_o:.2f}"),
            (f"first small file read (s){', median of %d' % FIRSTS if FIRSTS > 1 else ''}",
             f"{t_read_k:.2f}", f"{t_read_o:.2f}{spread if FIRSTS > 1 else ''}"),
            ("bytes fetched to there", f"{pulled_bytes / 1e6:.0f} MB", f"{fetched / 1e6:.2f} MB"),
            ("then every file read (s)", f"{t_all_k:.2f}", f"{t_all_o:.2f}"),
            ("from nothing to every file read (s)", f"{t_read_k + t_all_k:.2f}", f"{t_read_o + t_all_o:.2f}"),
            ("bytes fetched in all", f"{pulled_bytes / 1e6:.0f} MB", f"{fetched_all / 1e6:.0f} MB"),
            ("prefetch=all: every file local (s)", f"{t_read_k:.2f}", f"{t_local_p:.2f}"),
            ("prefetch=all: then every file read (s)", f"{t_all_k:.2f}", f"{t_all_p:.2f}"),
        ]
        print(f"image: {len(layers)} layers, {size / 1e6:.0f} MB uncompressed")
        print("| | pull + extract + kernel overlay | ours, image= (zstd:chunked) |")
        print("|---|---:|---:|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        print()
        print_big(big)
        print("Every file read once the first was (s), caches dropped before each:")
        print()
        print("| kernel overlay on the extracted dirs | fuse-overlayfs on them | ours on them "
              "| ours, image= (lazy) | ours, image= prefetch=all |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {t_all_k:.2f} | {t_all_f:.2f} | {t_all_d:.2f} | {t_all_o:.2f} | {t_all_p:.2f} |")
    finally:
        for m in mounts[::-1]:
            subprocess.run(["umount", m], capture_output=True)
        for r in regs:
            r.terminate()
            r.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

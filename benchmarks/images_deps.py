"""The libraries image layers could stand on, measured on this work
(issue 23): random access into a gzip layer (indexed_gzip, rapidgzip),
zstd decompression (zstandard, pyzstd).

    python -m benchmarks.images_deps [--scratch DIR] [--mib 256]

Builds one layer tarball (a tree of small files like a Python install and
one big file; ``--mib`` of data in all), compresses it as container tools
do (``gzip -6``; ``zstd -3``), then for each library times: reading the
whole layer once (what indexing a blob costs), building its random-access
index, the index's size, and 500 reads of 4 KiB at random offsets of the
uncompressed stream through the index (what serving one file costs). Prints
a table; nothing is written.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time


def build_layer(path: str, mib: int) -> int:
    """A tarball of small files (sizes like a Python tree) and one big file
    of half the data; returns the uncompressed size."""
    rnd = random.Random(7)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz_ ") for _ in range(rnd.randrange(3, 12)))
             for _ in range(2000)]
    small_total = mib * (1 << 20) // 2
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        done = 0
        i = 0
        while done < small_total:
            size = min(int(rnd.expovariate(1 / 6000)) + 10, 200_000)
            body = b" ".join(rnd.choice(words) for _ in range(size // 6))[:size]
            info = tarfile.TarInfo(f"usr/lib/python3/d{i // 200:04d}/m{i}.py")
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
            done += len(body)
            i += 1
        big = os.urandom(1 << 20) * (mib // 4) + bytes(mib // 4 << 20)   # half random, half zeros
        info = tarfile.TarInfo("data/big.bin")
        info.size = len(big)
        tf.addfile(info, io.BytesIO(big))
    return os.path.getsize(path)


def _timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def _random_reads(f, size: int, n: int = 500) -> float:
    rnd = random.Random(1)
    offs = [rnd.randrange(0, size - 4096) for _ in range(n)]
    t0 = time.perf_counter()
    for off in offs:
        f.seek(off)
        f.read(4096)
    return (time.perf_counter() - t0) / n * 1e6


def measure_gzip(gz: str, size: int, scratch: str) -> list[tuple]:
    rows = []
    import gzip
    import zlib
    t, _ = _timed(lambda: _drain(gzip.open(gz, "rb")))
    rows.append(("gzip (zlib), whole stream", f"{t:.2f} s", f"{size / t / 1e6:.0f} MB/s", "-", "-"))
    try:
        import indexed_gzip
    except ImportError:
        rows.append(("indexed_gzip", "not installed", "", "", ""))
    else:
        idx = os.path.join(scratch, "ig.idx")
        def build():
            with indexed_gzip.IndexedGzipFile(gz, spacing=1 << 20) as f:
                f.build_full_index()
                f.export_index(idx)
        t, _ = _timed(build)
        with indexed_gzip.IndexedGzipFile(gz, spacing=1 << 20) as f:
            f.import_index(idx)
            us = _random_reads(f, size)
        rows.append(("indexed_gzip (1 MiB spacing)", f"{t:.2f} s", f"{size / t / 1e6:.0f} MB/s",
                     f"{os.path.getsize(idx) / 1e6:.1f} MB", f"{us:.0f} µs"))
    try:
        import rapidgzip
    except ImportError:
        rows.append(("rapidgzip", "not installed", "", "", ""))
    else:
        for par in (1, os.cpu_count() or 1):
            idx = os.path.join(scratch, f"rg{par}.idx")
            def build(par=par, idx=idx):
                with rapidgzip.open(gz, parallelization=par) as f:
                    while f.read(1 << 20):
                        pass
                    f.export_index(idx)
            t, _ = _timed(build)
            with rapidgzip.open(gz, parallelization=par) as f:
                f.import_index(idx)
                us = _random_reads(f, size)
            rows.append((f"rapidgzip (parallelization={par})", f"{t:.2f} s",
                         f"{size / t / 1e6:.0f} MB/s", f"{os.path.getsize(idx) / 1e6:.1f} MB",
                         f"{us:.0f} µs"))
    del zlib
    return rows


def measure_zstd(zst: str, size: int) -> list[tuple]:
    rows = []
    try:
        import zstandard
    except ImportError:
        rows.append(("zstandard", "not installed", "", "", ""))
    else:
        def run():
            with open(zst, "rb") as fh:
                _drain(zstandard.ZstdDecompressor().stream_reader(fh))
        t, _ = _timed(run)
        rows.append(("zstandard, whole stream", f"{t:.2f} s", f"{size / t / 1e6:.0f} MB/s", "-", "-"))
    try:
        import pyzstd
    except ImportError:
        rows.append(("pyzstd", "not installed", "", "", ""))
    else:
        def run():
            with pyzstd.ZstdFile(zst, "rb") as fh:
                _drain(fh)
        t, _ = _timed(run)
        rows.append(("pyzstd, whole stream", f"{t:.2f} s", f"{size / t / 1e6:.0f} MB/s", "-", "-"))
    return rows


def _drain(f) -> int:
    n = 0
    with f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return n
            n += len(b)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.images_deps",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--scratch", default=None)
    p.add_argument("--mib", type=int, default=256)
    args = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="images-deps-", dir=args.scratch)
    try:
        tar = os.path.join(scratch, "layer.tar")
        size = build_layer(tar, args.mib)
        subprocess.run(["gzip", "-6", "-k", tar], check=True)
        have_zstd = shutil.which("zstd") is not None
        if have_zstd:
            subprocess.run(["zstd", "-q", "-3", "-k", tar], check=True)
        print(f"layer: {size / 1e6:.0f} MB uncompressed, gzip {os.path.getsize(tar + '.gz') / 1e6:.0f} MB"
              + (f", zstd {os.path.getsize(tar + '.zst') / 1e6:.0f} MB" if have_zstd else ""))
        rows = measure_gzip(tar + ".gz", size, scratch)
        if have_zstd:
            rows += measure_zstd(tar + ".zst", size)
        print("| library | read once (index) | throughput | index size | 4 KiB random read |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

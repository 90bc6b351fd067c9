"""Test data for the mounted benchmarks, built once and reused.

Every builder takes a base directory and the sizes, and returns a small
description; a stamp file holding the sizes (``.stamp.json``) makes a second
call with the same sizes a no-op, so data under ``/tmp/bench-data`` survives
between runs. All content is deterministic (seeded).

* ``tree``: ``n_files`` regular files in ``n_dirs`` directories (two levels),
  over ``n_layers`` lower layers: every directory exists in every layer, each
  file lives in one layer, every 10th file also has an older copy in a layer
  below (shadowed), and every 25th file index adds a name in the bottom layer
  that a whiteout in the top layer hides (root only: whiteouts are 0/0
  character devices).
* ``big_file``: one lower layer holding ``big.bin`` of ``size`` bytes.
* ``layer_stack``: ``n`` layers named ``0`` .. ``n-1`` (top first) under one
  directory (short names, for the kernel's one-page option limit); directory
  ``d`` exists in every layer (with one file of its own), and ``bottom``
  files ``d/fNNNNN`` exist in the bottom layer only.
* ``tarball``: a tar archive of ``n_files`` files in about ``n_files // 20``
  directories.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
from dataclasses import dataclass, field

BLOCK = 1 << 20


def _stamp_ok(base: str, spec: dict) -> bool:
    try:
        with open(os.path.join(base, ".stamp.json")) as fh:
            return json.load(fh) == spec
    except (OSError, ValueError):
        return False


def _write_stamp(base: str, spec: dict) -> None:
    with open(os.path.join(base, ".stamp.json"), "w") as fh:
        json.dump(spec, fh)


def _fresh_dir(base: str) -> None:
    if os.path.lexists(base):
        shutil.rmtree(base)
    os.makedirs(base)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


@dataclass
class Tree:
    layers: list[str]                 # top first
    files: list[str]                  # visible files, relative paths
    dirs: list[str]                   # relative paths
    whiteouts: int = 0


def tree(base: str, n_files: int, n_dirs: int, n_layers: int = 3, seed: int = 1) -> Tree:
    spec = {"kind": "tree", "files": n_files, "dirs": n_dirs, "layers": n_layers,
            "seed": seed, "v": 1}
    manifest = os.path.join(base, "manifest.json")
    if _stamp_ok(base, spec):
        with open(manifest) as fh:
            m = json.load(fh)
        return Tree(**m)
    _fresh_dir(base)
    rng = random.Random(seed)
    pool = rng.randbytes(8192)
    layers = [os.path.join(base, f"l{i}") for i in range(n_layers)]
    tops = max(1, n_dirs // 50)
    subs = max(0, (n_dirs - tops) // tops)
    dirs = []
    for t in range(tops):
        dirs.append(f"t{t:03d}")
        dirs.extend(f"t{t:03d}/s{s:03d}" for s in range(subs))
    for layer in layers:
        os.mkdir(layer)
        for d in dirs:
            os.mkdir(os.path.join(layer, d))
    can_whiteout = os.geteuid() == 0
    files = []
    whiteouts = 0
    for k in range(n_files):
        d = dirs[k % len(dirs)]
        rel = f"{d}/f{k:06d}"
        li = rng.randrange(n_layers)
        size = rng.randrange(0, 4097)
        _write(os.path.join(layers[li], rel), pool[:size])
        if k % 10 == 0 and li < n_layers - 1:
            _write(os.path.join(layers[li + 1], rel), pool[size:size + 100])
        if k % 25 == 0 and can_whiteout and n_layers > 1:
            gone = f"{d}/w{k:06d}"
            _write(os.path.join(layers[-1], gone), b"hidden")
            os.mknod(os.path.join(layers[0], gone), stat.S_IFCHR | 0o600, os.makedev(0, 0))
            whiteouts += 1
        files.append(rel)
    t = Tree(layers=layers, files=files, dirs=dirs, whiteouts=whiteouts)
    with open(manifest, "w") as fh:
        json.dump(t.__dict__, fh)
    _write_stamp(base, spec)
    return t


@dataclass
class BigFile:
    layer: str
    name: str
    size: int


def big_file(base: str, size: int, seed: int = 2) -> BigFile:
    spec = {"kind": "big", "size": size, "seed": seed, "v": 1}
    layer = os.path.join(base, "lower")
    if not _stamp_ok(base, spec):
        _fresh_dir(base)
        os.mkdir(layer)
        block = bytearray(random.Random(seed).randbytes(BLOCK))
        with open(os.path.join(layer, "big.bin"), "wb") as fh:
            left, i = size, 0
            while left > 0:
                block[:8] = i.to_bytes(8, "little")
                n = min(left, BLOCK)
                fh.write(block[:n] if n < BLOCK else block)
                left -= n
                i += 1
        _write_stamp(base, spec)
    return BigFile(layer=layer, name="big.bin", size=size)


@dataclass
class Stack:
    base: str                         # the layers' common parent (cwd for the kernel)
    layers: list[str] = field(default_factory=list)   # top first
    bottom_files: list[str] = field(default_factory=list)


def layer_stack(base: str, n: int, bottom: int) -> Stack:
    spec = {"kind": "stack", "n": n, "bottom": bottom, "v": 1}
    layers = [os.path.join(base, str(i)) for i in range(n)]
    names = [f"d/f{i:05d}" for i in range(bottom)]
    if not _stamp_ok(base, spec):
        _fresh_dir(base)
        for i, layer in enumerate(layers):
            os.makedirs(os.path.join(layer, "d"))
            _write(os.path.join(layer, "d", f"own{i}"), b"%d\n" % i)
        for rel in names:
            _write(os.path.join(layers[-1], rel), b"bottom\n")
        _write_stamp(base, spec)
    return Stack(base=base, layers=layers, bottom_files=names)


@dataclass
class Tarball:
    path: str
    files: int


def tarball(base: str, n_files: int, seed: int = 3) -> Tarball:
    spec = {"kind": "tar", "files": n_files, "seed": seed, "v": 1}
    path = os.path.join(base, "tree.tar")
    if not _stamp_ok(base, spec):
        _fresh_dir(base)
        rng = random.Random(seed)
        pool = rng.randbytes(16384)
        src = os.path.join(base, "src")
        n_dirs = max(1, n_files // 20)
        tops = max(1, int(n_dirs ** 0.5))
        dirs = [f"pkg{d % tops:03d}/m{d:05d}" for d in range(n_dirs)]
        for d in dirs:
            os.makedirs(os.path.join(src, d), exist_ok=True)
        for k in range(n_files):
            size = min(len(pool), int(rng.expovariate(1 / 6000)))
            _write(os.path.join(src, dirs[k % n_dirs], f"file{k:06d}.dat"), pool[:size])
        subprocess.run(["tar", "-cf", path, "-C", src, "."], check=True)
        shutil.rmtree(src)
        _write_stamp(base, spec)
    return Tarball(path=path, files=n_files)


@dataclass
class DeepStack:
    layers: list[str]                 # top first
    path: list[bytes]                 # components of the file at the bottom


def deep_stack(base: str, n: int, depth: int = 3) -> DeepStack:
    """``n`` layers where directories ``a/b/c`` (``depth`` levels) exist in
    every layer, each with a file of its own, and ``file`` only at the bottom
    (``a/b/c/file``): resolving it visits every layer at every level."""
    spec = {"kind": "deep", "n": n, "depth": depth, "v": 1}
    comps = [bytes([ord("a") + i]) for i in range(depth)]
    layers = [os.path.join(base, str(i)) for i in range(n)]
    if not _stamp_ok(base, spec):
        _fresh_dir(base)
        for i, layer in enumerate(layers):
            d = os.path.join(layer, *[c.decode() for c in comps])
            os.makedirs(d)
            _write(os.path.join(d, f"own{i}"), b"%d\n" % i)
        _write(os.path.join(layers[-1], *[c.decode() for c in comps], "file"), b"bottom\n")
        _write_stamp(base, spec)
    return DeepStack(layers=layers, path=comps + [b"file"])


@dataclass
class MergeDir:
    layers: list[str]                 # top first
    name: bytes                       # the merged directory, in every layer
    visible: int                      # entries a merged listing shows
    whiteouts: int                    # whiteouts (each hides one lower name)


def merge_dir(base: str, n_entries: int = 10_000, n_layers: int = 5,
              shared: int = 1_000, whiteouts_per_layer: int = 200) -> MergeDir:
    """Directory ``big`` in ``n_layers`` layers holding ``n_entries`` visible
    names: ``shared`` names present in every layer, the rest unique to one
    layer; each layer but the bottom also holds ``whiteouts_per_layer``
    whiteouts hiding names of the layer below (root only: 0/0 devices).
    Every 10th unique name is a directory, the others small files."""
    can_whiteout = os.geteuid() == 0
    wpl = whiteouts_per_layer if can_whiteout else 0
    spec = {"kind": "merge", "n": n_entries, "layers": n_layers, "shared": shared,
            "wh": wpl, "v": 1}
    layers = [os.path.join(base, str(i)) for i in range(n_layers)]
    unique = (n_entries - shared) // n_layers
    visible = shared + unique * n_layers
    if not _stamp_ok(base, spec):
        _fresh_dir(base)
        for i, layer in enumerate(layers):
            d = os.path.join(layer, "big")
            os.makedirs(d)
            for k in range(shared):
                _write(os.path.join(d, f"shared{k:05d}"), b"%d" % i)
            for k in range(unique):
                p = os.path.join(d, f"l{i}u{k:05d}")
                if k % 10 == 0:
                    os.mkdir(p)
                else:
                    _write(p, b"u")
        # whiteouts in layer i hide names that exist in layer i + 1
        for i in range(n_layers - 1):
            for k in range(wpl):
                name = f"gone{i}_{k:04d}"
                os.mknod(os.path.join(layers[i], "big", name), stat.S_IFCHR | 0o600,
                         os.makedev(0, 0))
                _write(os.path.join(layers[i + 1], "big", name), b"hidden")
        _write_stamp(base, spec)
    return MergeDir(layers=layers, name=b"big", visible=visible, whiteouts=wpl * (n_layers - 1))


@dataclass
class Image:
    layer: str                        # the one lower layer
    top: str                          # its dir holding the files
    files: int
    size: int                         # bytes in all


def image(base: str, n_files: int, total: int, seed: int = 4) -> Image:
    """An image layer: n_files files of total/n_files bytes each (random
    data) in dirs of 100 (the chown -R / chmod -R rows: metacopy)."""
    spec = {"kind": "image", "files": n_files, "total": total, "seed": seed, "v": 1}
    layer = os.path.join(base, "lower")
    each = max(1, total // max(1, n_files))
    if not _stamp_ok(base, spec):
        _fresh_dir(base)
        pool = random.Random(seed).randbytes(each + 4096)
        for k in range(n_files):
            d = os.path.join(layer, "img", f"d{k // 100:04d}")
            if k % 100 == 0:
                os.makedirs(d)
            _write(os.path.join(d, f"f{k:06d}"), pool[k % 4096:k % 4096 + each])
        _write_stamp(base, spec)
    return Image(layer=layer, top="img", files=n_files, size=each * n_files)


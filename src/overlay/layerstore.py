"""``overlay layer-store MOUNTPOINT``: an additional layer store for podman
and CRI-O (containers/storage's ``additionallayerstores = ["MOUNTPOINT:ref"]``),
served over FUSE (engine.plain) from overlay.images.store: a pulled image's
layers are found there, made from the registry's table of contents
(zstd:chunked) instead of pulled, and their files are fetched when read,
through our mount program (overlay-containers-mount). See README,
"podman: an additional layer store".

In the store: ROOT/BASE64(REF)/DIGEST/{diff -> skeleton, info, blob, use}
(``use``: containers/storage creates it to say it uses the layer, and
rmdirs DIGEST when it no longer does: both answered ENOENT, as the
protocol wants of a store that counts them).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat as S
import sys
import threading

from overlay.engine.plain import PlainFS, PNode

log = logging.getLogger("overlay.layerstore")


class LayerStoreFS(PlainFS):
    def __init__(self, store):
        super().__init__()
        self.store = store
        self.root.data = {"kids": {}}           # name -> node, in every dir
        self.lock = threading.Lock()

    def lookup(self, parent: PNode, name: str) -> PNode:
        from overlay.images.store import decode_ref
        with self.lock:
            known = parent.data["kids"].get(name) if parent.data else None
        if known is not None:
            return known
        if parent is self.root:
            ref = decode_ref(name)
            if ref is None:
                raise OSError(errno.ENOENT, name)
            return self._child(parent, name, PNode(S.S_IFDIR | 0o755, data={"ref": ref, "kids": {}}))
        if parent.data and "ref" in parent.data:
            layer = self.store.layer(parent.data["ref"], name)     # (ENOENT, EIO)
            node = PNode(S.S_IFDIR | 0o755, data={"layer": layer, "kids": {}})
            self._child(node, "diff", PNode(S.S_IFLNK | 0o777, len(layer.tree), os.fsencode(layer.tree)))
            self._child(node, "info", PNode(S.S_IFREG | 0o444, len(layer.info), data={"bytes": layer.info}))
            self._child(node, "blob", PNode(S.S_IFREG | 0o444, layer.blob_size, data={"blob": layer}))
            return self._child(parent, name, node)
        raise OSError(errno.ENOENT, name)

    def _child(self, parent: PNode, name: str, node: PNode) -> PNode:
        with self.lock:
            kids = parent.data["kids"]
            if name not in kids:
                kids[name] = self.add(node)
            return kids[name]

    def listdir(self, node: PNode) -> list[tuple[str, PNode]]:
        with self.lock:
            return sorted((node.data or {}).get("kids", {}).items())

    def read(self, node: PNode, offset: int, size: int) -> bytes:
        d = node.data or {}
        if "bytes" in d:
            return d["bytes"][offset:offset + size]
        if "blob" in d:
            return d["blob"].read_blob(offset, size)
        return b""

    # containers/storage says it uses a layer by creating DIGEST/use and
    # that it no longer does by rmdir of DIGEST; a store that counts them
    # answers ENOENT to both (else podman warns that it cannot)

    def create(self, parent: PNode, name: str, mode: int) -> PNode:
        if name != "use" or not (parent.data or {}).get("layer"):
            raise OSError(errno.EACCES, name)
        with self.lock:
            parent.data["uses"] = parent.data.get("uses", 0) + 1
        raise OSError(errno.ENOENT, name)

    def rmdir(self, parent: PNode, name: str) -> None:
        with self.lock:
            node = (parent.data or {}).get("kids", {}).get(name)
            if node is None or not node.data.get("layer"):
                raise OSError(errno.EACCES, name)
            node.data["uses"] = max(0, node.data.get("uses", 0) - 1)
        raise OSError(errno.ENOENT, name)

    def unlink(self, parent: PNode, name: str) -> None:
        raise OSError(errno.EACCES, name)


def add_command(sub) -> None:
    p = sub.add_parser(
        "layer-store",
        help="serve an additional layer store for podman (lazy image layers)",
        description="Serve an additional layer store on MOUNTPOINT (containers-storage.conf:"
        ' additionallayerstores = ["MOUNTPOINT:ref"]) until unmounted or signalled. Layers of'
        " images pulled are made from the registry's table of contents (zstd:chunked, eStargz), their"
        " files fetched when read through overlay-containers-mount.",
        epilog="example: overlay layer-store -o tls_verify=false /var/lib/overlay-layers",
    )
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="blob_cache=DIR, blob_cache_max=SIZE, tls_verify=true|false, authfile=FILE,"
                   " prefetch=all|none")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")


def _options(words: list[str]) -> dict:
    """The -o options: those of image layers that mount options have too,
    with their meaning and checks (options.image_option)."""
    from overlay.options import IMAGE_OPTIONS, image_option
    out = {"blob_cache": None, "tls_verify": True, "authfile": None, "prefetch": None, "blob_cache_max": None}
    for w in ",".join(words).split(","):
        if not w:
            continue
        k, eq, v = w.partition("=")
        if k not in IMAGE_OPTIONS or not eq:
            raise ValueError(f"unknown option {w!r} (blob_cache=, blob_cache_max=, tls_verify=, authfile=,"
                             " prefetch=)")
        out[k] = image_option(k, v, os.getcwd())
    return out


def run_command(args, prog: str = "overlay") -> int:
    from overlay.engine import mount as mnt
    from overlay.engine.wire import PlainSession
    from overlay.images.layer import default_cache
    from overlay.images.store import LayerStore

    def fail(message: str, status: int = 1) -> int:
        print(f"{prog} layer-store: error: {message}", file=sys.stderr)
        return status
    try:
        opts = _options(args.options)
    except ValueError as exc:
        return fail(str(exc), 2)
    if os.geteuid() != 0:
        return fail("needs root (the layers' skeletons hold trusted.* whiteouts)")
    if not os.path.isdir(args.mountpoint):
        return fail(f"{args.mountpoint} is not a directory")
    logging.getLogger("overlay").setLevel(logging.INFO)
    store = LayerStore(opts["blob_cache"] or default_cache(), opts["tls_verify"], opts["authfile"],
                       prefetch=opts["prefetch"] == "all", limit=opts["blob_cache_max"])
    fs = LayerStoreFS(store)
    session = PlainSession()
    session.on_request = fs.request
    try:
        m = mnt.mount(args.mountpoint, fsname="overlay-layer-store", subtype="overlay-layer-store",
                      flags=0, allow_other=True, root_mode=S.S_IFDIR)
    except OSError as exc:
        return fail(f"cannot mount on {args.mountpoint}: {exc.strerror or exc}")
    def on_signal(sig, frame):
        m.unmount(lazy=True)
        session.stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        m.start_watchdog()
        session.start(m.fd, 4)
        log.info("layer store on %s (blob cache %s)", args.mountpoint, store.cache)
        while not session.wait(1.0):
            pass
    finally:
        m.unmount(lazy=True)
        session.stop()
        session.close()
        m.finish()
    return 0


__all__ = ["LayerStoreFS", "add_command", "run_command"]


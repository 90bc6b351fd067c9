"""What an additional layer store serves (containers/storage's
``additionallayerstores``, the protocol stargz-store serves), apart from
FUSE (overlay.layerstore serves it):

    STORE/BASE64(IMAGE REF)/DIGEST/diff   the layer's tree (a symlink to
                                          its skeleton in the blob cache)
    STORE/BASE64(IMAGE REF)/DIGEST/info   the layer as containers/storage
                                          records it (JSON)
    STORE/BASE64(IMAGE REF)/DIGEST/blob   the layer blob, read by range

containers/image looks up every layer of an image it pulls there first
(DIGEST: the blob's digest in the manifest); a layer found is not pulled.
The skeleton has every file without its data: the mount program (ours,
overlay-containers-mount) finds the layer's source beside it (source.json,
written here) and fills a file from the registry when it is opened, as
image= does. Under any other overlay the files would read as zeros: the
store is for use with our mount program.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import os
import re
import threading

from .blob import GZIP, ZSTD, BlobError
from .chunked import ESTARGZ, FORMAT, ChunkedLayer, RemoteBlob
from .layer import BlobLayer

log = logging.getLogger("overlay.images")

SOURCE = "source.json"
_COMPRESSION = {GZIP: 2, ZSTD: 4, FORMAT: 4, ESTARGZ: 2}   # containers/storage's archive.Compression


def decode_ref(name: str) -> str | None:
    """The image reference a store dir's name stands for, or None."""
    try:
        text = base64.b64decode(name.encode(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return text if text and "/" in text and "\0" not in text else None


def write_source(layer_dir: str, doc: dict) -> None:
    """Where a skeleton's data come from, beside it (see provider_for)."""
    path = os.path.join(layer_dir, SOURCE)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def provider_for(lower: str):
    """The BlobLayer of a lower dir that is a skeleton made by a layer store
    (lowerdir= as podman passes it: links to the store's diff), or None
    for any other dir."""
    real = os.path.realpath(lower)
    if os.path.basename(real) != "tree":
        return None
    layer_dir = os.path.dirname(real)
    try:
        with open(os.path.join(layer_dir, SOURCE)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    cache = os.path.dirname(os.path.dirname(layer_dir))     # (the cache the store made it in: CACHE/sha256/HEX)
    if doc.get("kind") == "file":
        return BlobLayer(doc["path"], cache)
    if doc.get("kind") == "registry":
        from .registry import Registry
        reg = Registry(doc["host"], doc.get("tls_verify", True), doc.get("auth_file"))
        return ChunkedLayer(RemoteBlob(reg, doc["repo"], doc["descriptor"]), cache)
    return None


class StoreLayer:
    """One layer of an image, prepared for the store: its skeleton (tree),
    what containers/storage records of it (info), its blob by range."""

    def __init__(self, layer, desc: dict, diff_id: str, source: dict):
        self.layer = layer
        self.tree = layer.prepare()
        write_source(layer.dir, source)
        self.blob_size = int(desc.get("size") or layer.size)
        self.info = json.dumps({
            "compressed-diff-digest": desc["digest"],
            "compressed-size": self.blob_size,
            "diff-digest": diff_id,
            # (the files' bytes: the tar's own size is not known without it)
            "diff-size": sum(f[2] for f in layer.files.values()),
            "compression": _COMPRESSION.get(layer.fmt, 0),
        }).encode()

    def read_blob(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.blob_size)
        if offset >= end:
            return b""
        remote = getattr(self.layer, "remote", None)
        if remote is not None:
            return remote.read(offset, end)
        return os.pread(self.layer.fd, end - offset, offset)


class LayerStore:
    """The images and layers asked for, prepared once each."""

    def __init__(self, cache: str, tls_verify: bool = True, auth_file: str | None = None,
                 prefetch: bool = False, limit: int | None = None):
        self.cache = cache
        self.limit = limit          # blob_cache_max (cache.trim after each layer prepared)
        self.prefetch = prefetch    # each layer's data filled in the background once prepared
        self.tls_verify = tls_verify
        self.auth_file = auth_file
        self.lock = threading.Lock()
        self.images: dict[str, tuple] = {}      # ref -> (Registry, manifest, diff_ids)
        self.layers: dict[tuple[str, str], StoreLayer] = {}

    def _image(self, text: str):
        from .registry import Ref, image_manifest
        if text not in self.images:
            ref = Ref(text)
            if ref.layout is not None:
                raise OSError(errno.ENOENT, f"{text}: the store serves registry images")
            reg, doc = image_manifest(ref, self.tls_verify, self.auth_file)
            config = json.loads(reg.request(f"/v2/{ref.repo}/blobs/{doc['config']['digest']}").data)
            self.images[text] = (ref, reg, doc, config.get("rootfs", {}).get("diff_ids", []))
        return self.images[text]

    def layer(self, ref_text: str, digest: str) -> StoreLayer:
        """The layer with this blob digest of the image ref_text (ENOENT if
        it has none; EIO, with a log line, if the registry fails)."""
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise OSError(errno.ENOENT, digest)
        with self.lock:
            key = (ref_text, digest)
            if key in self.layers:
                return self.layers[key]
            try:
                ref, reg, doc, diff_ids = self._image(ref_text)
                descs = doc.get("layers", [])
                k = next((k for k, d in enumerate(descs) if d.get("digest") == digest), None)
                if k is None or k >= len(diff_ids):
                    raise OSError(errno.ENOENT, f"{ref_text}: no layer {digest}")
                self.layers[key] = self._prepare(ref, reg, descs[k], diff_ids[k])
                if self.limit is not None:
                    from .cache import trim
                    trim(self.cache, self.limit)
                if self.prefetch:
                    threading.Thread(target=self.layers[key].layer.prefetch, name="prefetch",
                                     daemon=True).start()
            except BlobError as exc:
                log.error("layer store: %s %s: %s", ref_text, digest, exc)
                raise OSError(errno.EIO, str(exc)) from None
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.error("layer store: %s %s: %s", ref_text, digest, exc)
                raise
            return self.layers[key]

    def _prepare(self, ref, reg, desc: dict, diff_id: str) -> StoreLayer:
        from .registry import layer_blob
        blob = layer_blob(reg, ref.repo, desc, self.cache, ref.text)
        if isinstance(blob, str):
            return StoreLayer(BlobLayer(blob, self.cache), desc, diff_id, {"kind": "file", "path": blob})
        source = {"kind": "registry", "host": reg.host, "repo": ref.repo, "descriptor": desc,
                  "tls_verify": self.tls_verify, "auth_file": self.auth_file}
        return StoreLayer(ChunkedLayer(blob, self.cache), desc, diff_id, source)

"""Images from a registry (the OCI distribution API) or from an OCI layout
dir: references, manifests, credentials, and blobs read whole or by range.

References: ``HOST[:PORT]/REPO[:TAG]``, ``HOST[:PORT]/REPO@sha256:HEX``
(``docker://`` before either is accepted), and ``oci:PATH[:TAG]`` (a layout
as ``skopeo copy ... oci:PATH:TAG`` writes it).

Credentials as containers find them: ``REGISTRY_AUTH_FILE``, then
``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.config/containers/auth.json``,
``~/.docker/config.json`` (``{"auths": {HOST: {"auth": base64(user:pass)}}}``);
a registry's Bearer challenge is answered with a token fetched with them.
TLS is verified unless ``tls_verify=False`` (podman's name), which also
lets a registry speak plain HTTP (as one on loopback does).

Network errors become OSError(EIO) with one line saying what failed; every
request has a timeout and is retried with backoff.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import platform
import re
import time

from .blob import BlobError, need

log = logging.getLogger("overlay.images")

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[1], MANIFEST_TYPES[3]
TIMEOUT = 30.0
RETRIES = 3


class Ref:
    """A parsed image reference."""

    def __init__(self, text: str):
        self.text = text
        self.layout = None
        self.host = self.repo = None
        self.tag = self.digest = None
        if text.startswith("oci:"):
            path, _, tag = text[4:].partition(":")
            if not path:
                raise BlobError(f"image {text!r}: no layout path")
            self.layout = path
            self.tag = tag or None
            return
        if text.startswith("docker://"):
            text = text[len("docker://"):]
        name, at, digest = text.partition("@")
        if at:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise BlobError(f"image {self.text!r}: bad digest")
            self.digest = digest
        host, slash, rest = name.partition("/")
        if not slash or not ("." in host or ":" in host or host == "localhost"):
            raise BlobError(f"image {self.text!r}: give the registry (HOST[:PORT]/REPO[:TAG])")
        repo, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
        if not colon:
            repo, tag = rest, ""
        if not repo or not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", repo):
            raise BlobError(f"image {self.text!r}: bad repository name")
        self.host, self.repo = host, repo
        self.tag = tag or (None if self.digest else "latest")


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}.get(m, m)


def _auth_files() -> list[str]:
    out = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        out.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    home = os.path.expanduser("~")
    out += [os.path.join(home, ".config", "containers", "auth.json"),
            os.path.join(home, ".docker", "config.json")]
    return out


def credentials(host: str, auth_file: str | None = None) -> tuple[str, str] | None:
    for path in ([auth_file] if auth_file else _auth_files()):
        try:
            with open(path) as f:
                auths = json.load(f).get("auths", {})
        except (OSError, ValueError):
            continue
        for key in (host, f"https://{host}", f"http://{host}"):
            entry = auths.get(key)
            if entry and entry.get("auth"):
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
                return user, pw
    return None


class Registry:
    """One registry host: a connection pool, its scheme, its token."""

    def __init__(self, host: str, tls_verify: bool = True, auth_file: str | None = None,
                 timeout: float = TIMEOUT, retries: int = RETRIES):
        urllib3 = need("urllib3", "an image from a registry")
        self.urllib3 = urllib3
        self.host = host
        self.tls_verify = tls_verify
        self.creds = credentials(host, auth_file)
        self.timeout = urllib3.Timeout(connect=min(timeout, 10.0), read=timeout)
        self.retries = urllib3.Retry(total=retries, backoff_factor=0.5, status_forcelist=(502, 503, 504),
                                     allowed_methods=("GET", "HEAD"), raise_on_status=False)
        tls = {"cert_reqs": "CERT_REQUIRED"}
        if not tls_verify:
            # (a context of our own: urllib3 would load the system's CA
            # certificates into its own, 40 ms, for nothing to check)
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            tls = {"cert_reqs": "CERT_NONE", "ssl_context": ctx}
        self.pool = urllib3.PoolManager(maxsize=8, timeout=self.timeout, retries=self.retries, **tls)
        self.token = None
        self.scheme = "https"
        if not tls_verify:
            # podman's tls_verify=false: HTTPS without checking, else HTTP
            try:
                self.pool.request("GET", f"https://{host}/v2/", retries=False, timeout=5.0)
            except urllib3.exceptions.HTTPError:
                self.scheme = "http"

    def _headers(self, extra=None) -> dict:
        h = dict(extra or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        elif self.creds:
            h["Authorization"] = "Basic " + base64.b64encode(":".join(self.creds).encode()).decode()
        return h

    def request(self, path: str, headers=None, stream: bool = False):
        """GET path (answering one auth challenge); the response, status 2xx."""
        url = f"{self.scheme}://{self.host}{path}"
        for attempt in range(2):
            try:
                r = self.pool.request("GET", url, headers=self._headers(headers), preload_content=not stream,
                                      redirect=True)
            except self.urllib3.exceptions.HTTPError as e:
                raise OSError(5, f"{self.host}: {type(e).__name__}: {e}") from None
            if r.status == 401 and attempt == 0 and self._authenticate(r.headers.get("WWW-Authenticate", "")):
                r.release_conn()
                continue
            if r.status >= 300:
                body = r.data[:200] if not stream else b""
                r.release_conn()
                raise OSError(5, f"{self.host}{path}: HTTP {r.status} {body.decode(errors='replace')}")
            return r
        raise OSError(13, f"{self.host}{path}: not authorized")

    def _authenticate(self, challenge: str) -> bool:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() != "bearer":     # (Basic: the credentials went with it)
            return False
        p = dict(re.findall(r'(\w+)="([^"]*)"', params))
        if "realm" not in p:
            return False
        q = "&".join(f"{k}={v}" for k, v in p.items() if k in ("service", "scope"))
        hdr = {}
        if self.creds:
            hdr["Authorization"] = "Basic " + base64.b64encode(":".join(self.creds).encode()).decode()
        try:
            r = self.pool.request("GET", p["realm"] + ("?" + q if q else ""), headers=hdr)
        except self.urllib3.exceptions.HTTPError as e:
            raise OSError(5, f"{p['realm']}: {e}") from None
        if r.status != 200:
            return False
        doc = json.loads(r.data)
        self.token = doc.get("token") or doc.get("access_token")
        return bool(self.token)

    def manifest(self, repo: str, ref: str) -> tuple[str, dict, str]:
        r = self.request(f"/v2/{repo}/manifests/{ref}", {"Accept": ", ".join(MANIFEST_TYPES)})
        data = r.data
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise OSError(5, f"{self.host}/{repo}: manifest {ref} arrived with digest {digest}")
        doc = json.loads(data)
        return doc.get("mediaType") or r.headers.get("Content-Type", ""), doc, digest

    def blob_range_parts(self, repo: str, digest: str, start: int, end: int, sizes):
        """Bytes [start, end) of a blob from one range request, given back
        as they arrive, in consecutive parts of these sizes (their sum:
        end - start): a long range needs no buffer of its length, and the
        registry no request per part. A generator; closing it early closes
        the connection."""
        r = self.request(f"/v2/{repo}/blobs/{digest}", {"Range": f"bytes={start}-{end - 1}"}, stream=True)
        done = False
        try:
            if r.status != 206:     # (a registry that ignores ranges: from the blob's start)
                skip = start
                while skip > 0:
                    skip -= len(self._part(r, min(skip, 1 << 20), repo, digest))
            for n in sizes:
                yield self._part(r, n, repo, digest)
            done = True
        finally:
            if done and r.status == 206:
                r.release_conn()
            else:
                r.close()       # (unread data left: the connection is not reused)

    def _part(self, r, n: int, repo: str, digest: str) -> bytes:
        try:
            data = r.read(n, decode_content=False)     # (blobs are sent as they are)
        except self.urllib3.exceptions.HTTPError as e:
            raise OSError(5, f"{self.host}/{repo}: blob {digest}: {type(e).__name__}: {e}") from None
        if len(data) != n:
            raise OSError(5, f"{self.host}/{repo}: blob {digest}: the range ended {n - len(data)} bytes early")
        return data

    def download(self, repo: str, digest: str, dest: str) -> None:
        """The whole blob into dest, checked against its digest."""
        tmp = f"{dest}.part-{os.getpid()}"
        h = hashlib.sha256()
        deadline = time.monotonic() + 3600
        r = self.request(f"/v2/{repo}/blobs/{digest}", stream=True)
        try:
            with open(tmp, "wb") as f:
                for chunk in r.stream(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                    if time.monotonic() > deadline:
                        raise OSError(5, f"{digest}: download took over an hour")
                f.flush()
                os.fsync(f.fileno())
        except self.urllib3.exceptions.HTTPError as e:
            os.unlink(tmp)
            raise OSError(5, f"{self.host}/{repo}: blob {digest}: {e}") from None
        finally:
            r.release_conn()
        if "sha256:" + h.hexdigest() != digest:
            os.unlink(tmp)
            raise OSError(5, f"{self.host}/{repo}: blob {digest} arrived with another digest")
        os.replace(tmp, dest)


def _pick(index: dict) -> str:
    arch = _arch()
    for m in index.get("manifests", []):
        p = m.get("platform", {})
        if p.get("os", "linux") == "linux" and p.get("architecture") == arch:
            return m["digest"]
    raise BlobError(f"no image for linux/{arch} in the index")


def image_manifest(ref: Ref, tls_verify: bool = True, auth_file: str | None = None):
    """(the Registry, the image's manifest for this platform) of a registry
    reference."""
    reg = Registry(ref.host, tls_verify, auth_file)
    mt, doc, _ = reg.manifest(ref.repo, ref.digest or ref.tag)
    if mt in INDEX_TYPES or "manifests" in doc:
        mt, doc, _ = reg.manifest(ref.repo, _pick(doc))
    return reg, doc


def layer_blob(reg: Registry, repo: str, desc: dict, cache: str, label: str):
    """One layer of a manifest: a zstd:chunked blob stays in the registry
    (chunked.RemoteBlob: read by range, only what is used); any other is
    fetched into cache/blobs, once, checked against its digest (its path)."""
    digest = desc["digest"]
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise BlobError(f"{label}: unsupported layer digest {digest!r}")
    from .chunked import RemoteBlob, is_chunked
    if is_chunked(desc):
        return RemoteBlob(reg, repo, desc)
    blobs = os.path.join(cache, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    path = os.path.join(blobs, digest[7:])
    if not os.path.exists(path):
        log.info("%s: fetching layer %s (%s bytes)", label, digest, desc.get("size"))
        reg.download(repo, digest, path)
    return path


def layers_of(ref: Ref, cache: str, tls_verify: bool = True, auth_file: str | None = None) -> list:
    """The image's layers, top first (see layer_blob); in an OCI layout,
    the blob files where they lie."""
    if ref.layout is not None:
        return _layout_layers(ref)
    reg, doc = image_manifest(ref, tls_verify, auth_file)
    return [layer_blob(reg, ref.repo, desc, cache, ref.text) for desc in doc.get("layers", [])][::-1]


def _layout_layers(ref: Ref) -> list[str]:
    root = ref.layout
    try:
        with open(os.path.join(root, "index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise BlobError(f"{ref.text}: not an OCI layout ({e})") from None
    want = None
    for m in index.get("manifests", []):
        name = m.get("annotations", {}).get("org.opencontainers.image.ref.name")
        if ref.tag is None or name == ref.tag:
            want = m
            break
    if want is None:
        raise BlobError(f"{ref.text}: no manifest tagged {ref.tag!r}")

    def blob(digest):
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise BlobError(f"{ref.text}: unsupported digest {digest!r}")
        return os.path.join(root, "blobs", "sha256", digest[7:])

    with open(blob(want["digest"])) as f:
        doc = json.load(f)
    if "manifests" in doc:
        with open(blob(_pick(doc))) as f:
            doc = json.load(f)
    return [blob(layer["digest"]) for layer in doc.get("layers", [])][::-1]

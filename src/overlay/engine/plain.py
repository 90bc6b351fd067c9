"""A small read-mostly FUSE filesystem answered in Python (wire.PlainSession):
for a filesystem of a few nodes where speed does not matter, such as the
additional layer store (overlay.layerstore). The overlay itself never
comes here: it is served by the bridge.

A subclass of PlainFS gives the tree: lookup(parent, name), listdir(node),
read(node, offset, size), and optionally create/unlink; nodes are PNode
objects, numbered as they are made and kept for the life of the mount
(the kernel's FORGETs are not counted: a few nodes stay).
"""

from __future__ import annotations

import errno
import itertools
import stat as S
import struct
import threading
import time

# opcodes (include/uapi/linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK = 1, 2, 3, 4, 5
UNLINK, RMDIR = 10, 11
OPEN, READ, STATFS, RELEASE, FLUSH = 14, 15, 17, 18, 25
OPENDIR, READDIR, RELEASEDIR, CREATE, INTERRUPT = 27, 28, 29, 35, 36
BATCH_FORGET, READDIRPLUS = 42, 44

_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")          # fuse_attr
_ENTRY = struct.Struct("<QQQQII")                    # fuse_entry_out, before its attr
_ATTR_OUT = struct.Struct("<QII")                    # fuse_attr_out, before its attr
_OPEN_OUT = struct.Struct("<QIi")
_READ_IN = struct.Struct("<QQI")
_DIRENT = struct.Struct("<QQII")
_STATFS = struct.Struct("<QQQQQIIII24x")
_CREATE_IN = struct.Struct("<IIII")

VALID = 1                # seconds the kernel may keep an entry or attributes


class PNode:
    """One node: its mode (type and permissions), size, link target."""

    __slots__ = ("id", "mode", "size", "target", "mtime", "data")

    def __init__(self, mode: int, size: int = 0, target: bytes = b"", data=None):
        self.id = 0
        self.mode = mode
        self.size = size
        self.target = target
        self.mtime = time.time()
        self.data = data


class PlainFS:
    """The request side of a PlainSession (see the module's docstring)."""

    def __init__(self):
        self.nodes: dict[int, PNode] = {}
        self._ids = itertools.count(2)
        self._lock = threading.Lock()
        self.root = self.add(PNode(S.S_IFDIR | 0o755), 1)

    def add(self, node: PNode, nodeid: int | None = None) -> PNode:
        with self._lock:
            if not node.id:
                node.id = nodeid or next(self._ids)
            self.nodes[node.id] = node
        return node

    # ------------------------------------------------ what a subclass gives

    def lookup(self, parent: PNode, name: str) -> PNode:
        raise OSError(errno.ENOENT, name)

    def listdir(self, node: PNode) -> list[tuple[str, PNode]]:
        return []

    def read(self, node: PNode, offset: int, size: int) -> bytes:
        return b""

    def create(self, parent: PNode, name: str, mode: int) -> PNode:
        raise OSError(errno.EROFS, name)

    def unlink(self, parent: PNode, name: str) -> None:
        raise OSError(errno.EROFS, name)

    def rmdir(self, parent: PNode, name: str) -> None:
        raise OSError(errno.EROFS, name)

    # ------------------------------------------------ the requests

    def _attr(self, n: PNode) -> bytes:
        sec = int(n.mtime)
        nsec = int((n.mtime - sec) * 1e9)
        nlink = 2 if S.S_ISDIR(n.mode) else 1
        return _ATTR.pack(n.id, n.size, (n.size + 511) // 512, sec, sec, sec, nsec, nsec, nsec,
                          n.mode, nlink, 0, 0, 0, 4096, 0)

    def _entry(self, n: PNode) -> bytes:
        return _ENTRY.pack(n.id, 0, VALID, VALID, 0, 0) + self._attr(n)

    def request(self, opcode: int, nodeid: int, uid: int, gid: int, pid: int, arg: bytes):
        """PlainSession.on_request: the reply (bytes), an errno or None."""
        if opcode in (FORGET, BATCH_FORGET, INTERRUPT):
            return None
        node = self.nodes.get(nodeid)
        if node is None:
            return errno.ESTALE
        try:
            return self._answer(opcode, node, arg)
        except OSError as exc:
            return exc.errno or errno.EIO

    def _answer(self, opcode: int, node: PNode, arg: bytes):
        if opcode == LOOKUP:
            return self._entry(self.lookup(node, _name(arg)))
        if opcode in (GETATTR, SETATTR):
            return _ATTR_OUT.pack(VALID, 0, 0) + self._attr(node)
        if opcode == READLINK:
            return node.target
        if opcode in (OPEN, OPENDIR):
            return _OPEN_OUT.pack(0, 0, 0)
        if opcode in (RELEASE, RELEASEDIR, FLUSH):
            return 0
        if opcode == READ:
            _fh, off, size = _READ_IN.unpack_from(arg)
            return self.read(node, off, size)
        if opcode in (READDIR, READDIRPLUS):
            _fh, off, size = _READ_IN.unpack_from(arg)
            return self._listing(node, off, size, opcode == READDIRPLUS)
        if opcode == STATFS:
            return _STATFS.pack(0, 0, 0, len(self.nodes), 0, 4096, 255, 4096, 0)
        if opcode == CREATE:
            _flags, mode, _umask, _oflags = _CREATE_IN.unpack_from(arg)
            new = self.create(node, _name(arg[_CREATE_IN.size:]), mode)
            return self._entry(new) + _OPEN_OUT.pack(0, 0, 0)
        if opcode == UNLINK:
            self.unlink(node, _name(arg))
            return 0
        if opcode == RMDIR:
            self.rmdir(node, _name(arg))
            return 0
        return errno.ENOSYS

    def _listing(self, node: PNode, off: int, size: int, plus: bool) -> bytes:
        if not S.S_ISDIR(node.mode):
            return errno.ENOTDIR
        out = bytearray()
        entries = self.listdir(node)
        for k, (name, child) in enumerate(entries[off:], start=off + 1):
            raw = name.encode("utf-8", "surrogateescape")
            dirent = _DIRENT.pack(child.id, k, len(raw), S.S_IFMT(child.mode) >> 12) + raw
            dirent += b"\0" * (-len(dirent) % 8)
            one = (self._entry(child) + dirent) if plus else dirent
            if len(out) + len(one) > size:
                break
            out += one
        return bytes(out)


def _name(arg: bytes) -> str:
    return arg.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

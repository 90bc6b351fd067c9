"""overlay.idmap: uid/gid mapping between the layers and the mount.

The options `uidmapping=` and `gidmapping=` take fuse-overlayfs's form: a
colon-separated list of triples CONTAINER:HOST:SIZE, so `0:100000:65536`
shows host ids 100000..165535 as 0..65535. Files keep their host ids on
disk; the mount shows container ids, and ids given through the mount
(file creation, chown) are container ids, stored as host ids. A host id
outside every range shows as the overflow id 65534, and a container id
outside every range cannot be stored (EINVAL, as for an unmapped id in a
user namespace). `squash_to_root` shows every file as owned by 0:0.
"""

from __future__ import annotations

OVERFLOW_ID = 65534


class IdMapError(ValueError):
    """A malformed mapping; str() is one line for the user."""


class IdMap:
    """One direction-agnostic set of (container, host, size) ranges."""

    __slots__ = ("ranges",)

    def __init__(self, ranges=()):
        self.ranges = tuple(ranges)

    @classmethod
    def parse(cls, text: str, what: str = "uidmapping") -> "IdMap":
        parts = text.split(":")
        if not text or len(parts) % 3:
            raise IdMapError(f"{what}={text}: expected CONTAINER:HOST:SIZE triples")
        ranges = []
        for i in range(0, len(parts), 3):
            try:
                c, h, n = (int(p) for p in parts[i:i + 3])
            except ValueError:
                raise IdMapError(f"{what}={text}: ids must be numbers") from None
            if c < 0 or h < 0 or n <= 0 or c + n > 2**32 or h + n > 2**32:
                raise IdMapError(f"{what}={text}: bad range {c}:{h}:{n}")
            ranges.append((c, h, n))
        for a in range(len(ranges)):
            for b in range(a + 1, len(ranges)):
                (c1, h1, n1), (c2, h2, n2) = ranges[a], ranges[b]
                if c1 < c2 + n2 and c2 < c1 + n1 or h1 < h2 + n2 and h2 < h1 + n1:
                    raise IdMapError(f"{what}={text}: ranges overlap")
        return cls(ranges)

    def __bool__(self):
        return bool(self.ranges)

    def shown(self, host: int) -> int:
        """The id the mount shows for a host id."""
        for c, h, n in self.ranges:
            if h <= host < h + n:
                return c + host - h
        return OVERFLOW_ID

    def host(self, shown: int) -> int:
        """The host id to store for an id given through the mount."""
        for c, h, n in self.ranges:
            if c <= shown < c + n:
                return h + shown - c
        raise OSError(22, f"id {shown} is not mapped")

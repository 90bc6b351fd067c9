"""overlay.idmap: uid/gid mapping between the layers and the mount.

The options `uidmapping=` and `gidmapping=` take fuse-overlayfs's form and
meaning: a colon-separated list of triples CONTAINER:HOST:SIZE (empty
fields skipped), where the layers hold CONTAINER ids and the mount shows
HOST ids: `0:100000:65536` shows ids 0..65535 of the files as
100000..165535. That is what containers/storage passes: the layers keep
the container's ids, the mount shows host ids, and the container's user
namespace maps them back to its own. Ids given through the mount (file
creation, chown) are host ids, stored as container ids. An id outside
every range shows, and is stored, as the overflow id 65534, as
fuse-overlayfs does. `squash_to_root` shows every file as owned by 0:0.
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
        # empty fields are skipped, as fuse-overlayfs's strtok does:
        # containers/storage writes "uidmapping=:0:100000:65536"
        parts = [p for p in text.split(":") if p]
        if not parts or len(parts) % 3:
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

    def shown(self, stored: int) -> int:
        """The id the mount shows for an id of the layers."""
        for c, h, n in self.ranges:
            if c <= stored < c + n:
                return h + stored - c
        return OVERFLOW_ID

    def host(self, shown: int) -> int:
        """The id to store in the layer for an id given through the mount
        (the name is the engines': the id on the disk's side)."""
        for c, h, n in self.ranges:
            if h <= shown < h + n:
                return c + shown - h
        return OVERFLOW_ID

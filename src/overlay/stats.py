"""overlay.stats: `overlay stats MOUNTPOINT`, live counters of a running mount.

The daemon answers a reserved xattr on the mount's root (overlay.fs
STATS_XATTR) with its counters as JSON: requests by type, how many lookups
found an object it already knew (the cache hit rate), name-index use,
copy-ups and bytes copied. Reading it needs no other channel and works for
every user who can see the mount.
"""

from __future__ import annotations

import json
import os
import sys
import time

STATS_XATTR = "user.overlay-fuse.stats"


def read_stats(mountpoint: str) -> dict:
    """The counters of the overlay mounted on mountpoint (OSError if none)."""
    return json.loads(os.getxattr(mountpoint, STATS_XATTR))


def format_stats(st: dict) -> str:
    core = st.get("core", {})
    req = st.get("requests", {})
    lookups = core.get("lookups", 0)
    known = core.get("lookups_known", 0)
    lines = [
        f"requests        {sum(req.values())}",
    ]
    for name, n in sorted(req.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<14}{n}")
    rate = f"{100.0 * known / lookups:.1f}%" if lookups else "-"
    lines += [
        f"lookups         {lookups} (of known objects: {known}, {rate})",
        f"name indexes    {core.get('name_indexes', 0)} built, {core.get('name_index_hits', 0)} lookups used one",
        f"copy-ups        {core.get('copy_ups', 0)}, {core.get('bytes_copied', 0)} bytes copied",
        f"inodes known    {st.get('inodes_known', 0)}, open files {st.get('open_files', 0)}",
    ]
    return "\n".join(lines)


def add_command(sub) -> None:
    p = sub.add_parser("stats", help="live counters of a running mount",
                       description="Show the counters of the overlay mounted on MOUNTPOINT: "
                       "requests by type, lookup cache hits, copy-ups and bytes copied.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the raw counters as JSON")
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="print again every SECONDS until interrupted")


def run_command(args, prog: str = "overlay") -> int:
    while True:
        try:
            st = read_stats(args.mountpoint)
        except OSError as exc:
            print(f"{prog}: {args.mountpoint}: not an overlay mount of ours "
                  f"({exc.strerror})", file=sys.stderr)
            return 1
        print(json.dumps(st, indent=2, sort_keys=True) if args.json else format_stats(st), flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
        print()

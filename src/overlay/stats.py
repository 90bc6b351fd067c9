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
import stat
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
    if "dirs_known" in st:
        lines.append(f"dirs known      {st['dirs_known']} (each holds its layers' fds); "
                     f"dropped for want of fds {st.get('fd_reliefs', 0)} times")
    quota = st.get("quota")
    if quota:
        def used(n, limit, unit=""):
            if limit is None:
                return f"{n}{unit} (no limit)"
            if n > limit:
                return f"{n}{unit} of {limit}{unit} (over the limit)"
            return f"{n}{unit} of {limit}{unit} ({100.0 * n / limit if limit else 100.0:.1f}%)"
        lines.append(f"quota bytes     {used(quota['bytes'], quota['bytes_limit'])}")
        lines.append(f"quota inodes    {used(quota['inodes'], quota['inodes_limit'])}")
    for img in st.get("images") or ():
        lines.append(f"image layer     {img['layer']}: {img['blob']}: {img['files_filled']} of "
                     f"{img['files']} files taken out, {img['bytes_filled']} bytes, "
                     f"{img['seconds_filling']} s")
    layers = st.get("layers", [])
    if layers:
        lines.append("lookups served by each layer")
        for lay in layers:
            lines.append(f"  {lay['layer']:<14}{lay['lookups']:<10}{lay['path']}")
    return "\n".join(lines)


LAYER_XATTR = "user.overlay-fuse.layer"


def which_layer(path: str) -> str:
    """The layer that serves path on an overlay mount of ours (OSError if
    path is not on one). The kernel itself answers user.* reads of
    symlinks, fifos, sockets and devices with ENODATA: those are asked of
    their dir, as user.overlay-fuse.layer/NAME."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return os.getxattr(path, LAYER_XATTR, follow_symlinks=False).decode()
    parent, name = os.path.split(os.path.normpath(path))
    return os.getxattr(parent or ".", f"{LAYER_XATTR}/{name}").decode()


def add_which_command(sub) -> None:
    p = sub.add_parser("which", help="which layer serves a file of a mount",
                       description="Print the layer that serves each PATH of an overlay mount of "
                       "ours (upper or lower, its index and dir; where a copied-up file came "
                       "from, where a metacopy's data are). The same as reading the xattr "
                       f"{LAYER_XATTR} of PATH.")
    p.add_argument("paths", nargs="+", metavar="PATH")


def run_which(args, prog: str = "overlay") -> int:
    rc = 0
    for path in args.paths:
        try:
            print(f"{path}: {which_layer(path)}", flush=True)
        except OSError as exc:
            reason = ("not on an overlay mount of ours" if exc.errno in (61, 95)
                      else exc.strerror)
            print(f"{prog}: {path}: {reason}", file=sys.stderr)
            rc = 1
    return rc


def add_command(sub) -> None:
    p = sub.add_parser("stats", help="live counters of a running mount",
                       description="Show the counters of the overlay mounted on MOUNTPOINT: "
                       "requests by type, lookup cache hits, copy-ups and bytes copied.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the raw counters as JSON")
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="print again every SECONDS until interrupted")


def mount_root_of(path: str) -> str:
    """The mount point of the overlay of ours that path is in (path itself,
    or the mount it lies in), or path when it is in none."""
    from overlay.mounttable import is_ours, iter_mounts  # noqa: PLC0415

    real = os.path.realpath(path)
    best = None
    for entry in iter_mounts():
        mp = entry.mountpoint
        if real == mp or real.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mountpoint):
                best = entry        # (the innermost; later lines are on top)
    return best.mountpoint if best is not None and is_ours(best) else path


def run_command(args, prog: str = "overlay") -> int:
    if args.watch is not None and not args.watch > 0:
        print(f"{prog}: --watch takes a positive number of seconds, not {args.watch:g}", file=sys.stderr)
        return 2
    where = mount_root_of(args.mountpoint)
    while True:
        try:
            st = read_stats(where)
        except OSError as exc:
            print(f"{prog}: {args.mountpoint}: not an overlay mount of ours or a path in one "
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

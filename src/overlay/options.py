"""Mount option parsing and validation (src/overlay/options.py).

Turns an overlayfs-style option string such as
``lowerdir=image2:image1,upperdir=container,workdir=work`` into a
:class:`MountConfig`, checking the layers the same way the kernel's overlayfs
does at mount time.  Every problem is reported as an :class:`OptionError`
whose message is a single line meant to be shown to the user as is.

Syntax notes:

* options are separated by ``,``; empty options (``a,,b``, a trailing comma)
  are ignored;
* a backslash escapes the next character, so ``\\,`` is a comma inside a
  value and ``\\:`` is a colon inside one ``lowerdir`` entry;
* a double-quoted part of an option keeps its commas (``context="a:b,c"``,
  as containers/storage passes SELinux labels);
* ``lowerdir`` lists the layers top first: ``lowerdir=A:B`` -> ``[A, B]``;
  ``lowerdir_file=PATH`` reads them from a file instead, one a line, top
  first (``-``: standard input; a line ``::`` makes the layers after it
  data-only ones), for stacks whose paths would not fit in one option
  string;
* relative paths are resolved against the ``cwd`` given to
  :func:`parse_options`; stored paths are absolute and canonical
  (symlinks resolved, like the kernel's path lookup).

This module imports nothing heavy so the command line stays fast.
"""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger(__name__)

__all__ = [
    "MountConfig",
    "OptionError",
    "GENERIC_OPTIONS",
    "parse_options",
    "split_options",
    "split_lowerdir",
    "validate_mountpoint",
]


class OptionError(ValueError):
    """A bad mount option, layer or mount point; ``str(err)`` is one line."""

    def __init__(self, message: str) -> None:
        # Keep the message to one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split("\n")))

    @property
    def message(self) -> str:
        return str(self)


# Kernel cache times (seconds). Everything that changes the tree goes through
# us and the adapter invalidates what it changes, so long is safe; only edits
# made directly to lower files bypass it (they show at the next open).
DEFAULT_TIMEOUT = 300.0


class MountConfig:
    """Everything the filesystem needs to know about one mount.

    A plain class rather than a dataclass: importing dataclasses costs the
    command line several milliseconds of its start (see cli.py)."""

    # name -> default; lowers, upper and work have none
    DEFAULTS = {
        "ro": False,  # read-only, the upper layer included (as the kernel's ro)
        "userxattr": False,  # user.overlay.* instead of trusted.overlay.*
        "redirect_dir": True,  # False -> EXDEV on renaming a merged/lower dir
        "redirect_follow": True,  # False (redirect_dir=nofollow): a redirect met at lookup is EPERM
        "volatile": False,
        "allow_other": None,  # None: as root yes (what the kernel overlay shows others, they see), else no
        "default_permissions": False,
        "debug": False,
        "log": None,  # log=PATH (appended to) or log=syslog: where a background mount logs
        "subtype": "overlay",  # the mount's type is fuse.<subtype> (the helpers: their own name)
        "fsname": "overlay",
        "entry_timeout": DEFAULT_TIMEOUT,
        "attr_timeout": DEFAULT_TIMEOUT,
        "engine": "native",  # native (overlay.engine) or pyfuse3 (overlay.fs)
        "workers": None,  # threads (native) or trio tasks (pyfuse3); None: the engine's default
        "uring": "auto",  # native engine: FUSE over io_uring: auto (when the kernel offers it), on, off
        "uring_depth": 8,  # native engine: io_uring entries per queue (a queue per CPU)
        "passthrough": True,  # native engine: FUSE passthrough for file data where possible
        "writeback": False,  # kernel writeback cache (faster big writes)
        "oci_whiteouts": False,  # lower layers with OCI .wh. whiteouts
        "uidmapping": None,  # CONTAINER:HOST:SIZE[:...] (see overlay.idmap)
        "gidmapping": None,
        "squash_to_root": False,
        "uuid": "auto",  # the kernel's uuid=: on, off, null or auto (origin file handles)
        "xino": "off",  # the kernel's xino=: on, off or auto (st_ino of layers on several fs)
        "index": False,  # the kernel's index=on: hard links kept whole across copy-up
        "metacopy": False,  # the kernel's metacopy=on: metadata-only copy-up
        "datadirs": [],  # data-only lower layers (lowerdir=A::B), absolute paths
        "verity": "off",  # the kernel's verity=: on, require or off (fs-verity digests of metacopy data)
        "nfs_export": False,  # the kernel's nfs_export=on: every copy-up indexed, file handles decoded
        # fuse-overlayfs's options (containers pass them: see README, Podman)
        "context": None,  # SELinux label for the mount (context="..."), or None
        "squash_to_uid": None,  # show every object as owned by this uid
        "squash_to_gid": None,  # ... and this gid
        "xattr_permissions": 0,  # 1/2: owner and mode kept in an xattr (security./user.)
        "static_nlink": False,  # dirs show nlink 1
        "noacl": False,  # no POSIX ACLs
        "noxattrs": False,  # xattr calls fail with EOPNOTSUPP
        "ino32": False,  # ino32_t: st_ino folded to 32 bits
        "no_fsync": False,  # fsync=0: fsync does not reach the upper layer (no volatile marker)
        "quota_bytes": None,  # upper layer quota: bytes of regular files (None: no limit)
        "quota_inodes": None,  # upper layer quota: inodes (None: no limit)
        "blob_cache": None,  # where lower layers given as layer blobs keep their index (overlay.images)
        "image": None,  # image=REF: the lower layers are that image's (overlay.images.registry)
        "tls_verify": True,  # image= from a registry: verify its TLS certificate (false: also plain HTTP)
        "authfile": None,  # image=: credentials file (auth.json), else as containers find it
        "prefetch": None,  # prefetch=all: blob layers' data filled in the background (overlay.images)
        "blob_cache_max": None,  # bytes the blob cache may hold (unused layers removed past it)
    }

    def __init__(self, lowers, upper, work, *, ignored=None, **options):
        self.lowers = lowers  # absolute paths, top first (lowerdir=A:B -> [A, B])
        self.upper = upper
        self.work = work
        unknown = set(options) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"MountConfig: unknown fields {sorted(unknown)}")
        for name, default in self.DEFAULTS.items():
            setattr(self, name, options.get(name, default))
        # options that were given but change nothing (for logging/debugging);
        # not part of equality or repr
        self.ignored = list(ignored or [])

    def _fields(self) -> dict:
        return {"lowers": self.lowers, "upper": self.upper, "work": self.work,
                **{name: getattr(self, name) for name in self.DEFAULTS}}

    def __eq__(self, other):
        if not isinstance(other, MountConfig):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self):
        return "MountConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._fields().items()) + ")"

    @property
    def read_only(self) -> bool:
        """A mount without an upper layer cannot be written to, nor one
        mounted ro (its upper layer is shown, as the kernel's)."""
        return self.upper is None or self.ro

    @property
    def atime(self) -> tuple[str, bool]:
        """(the atime rule, nodiratime) the mount's options give."""
        return atime_rules(vfs_flags(self.ignored, self.read_only))


# Generic VFS / mount(8) / fstab options.  They are accepted and ignored: the
# FUSE mount is made by libfuse with its own defaults, and mount.fuse3 adds
# ``dev``/``suid`` on its own.
GENERIC_OPTIONS = frozenset(
    {
        "rw",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "atime",
        "noatime",
        "diratime",
        "nodiratime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
        "async",
        "sync",
        "dirsync",
        "mand",
        "nomand",
        "iversion",
        "noiversion",
        "silent",
        "loud",
        # userspace options of mount(8)/fstab that may reach a helper
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "group",
        "nofail",
        "_netdev",
    }
)

# The generic options that are mount flags: name -> (MS_* to set, to clear),
# the default being libfuse's nosuid,nodev (vfs_flags).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
_MS_OPTIONS = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "suid": (0, MS_NOSUID), "nosuid": (MS_NOSUID, 0),
    "dev": (0, MS_NODEV), "nodev": (MS_NODEV, 0),
    "exec": (0, MS_NOEXEC), "noexec": (MS_NOEXEC, 0),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0), "nolazytime": (0, MS_LAZYTIME),
}


def default_flags() -> int:
    """The mount flags before the user's: as root none, as the kernel
    overlay mounts (set-id files and devices work, for every user with
    allow_other); otherwise nosuid,nodev (fusermount3 forces them anyway)."""
    return 0 if os.geteuid() == 0 else MS_NOSUID | MS_NODEV


def vfs_flags(generic: list[str], read_only: bool, base: int = MS_NOSUID | MS_NODEV) -> int:
    """The mount(2) flags of the generic options, in their order (a later
    one undoes an earlier one, as with mount(8)), over base."""
    flags = base
    for opt in generic:
        add, clear = _MS_OPTIONS.get(opt, (0, 0))
        flags = (flags | add) & ~clear
    if read_only:
        flags |= MS_RDONLY
    return flags


def atime_rules(flags: int) -> tuple[str, bool]:
    """("relatime" | "noatime" | "strictatime", nodiratime) of a mount made
    with these mount(2) flags, by the kernel's rules: relatime unless
    noatime, and strictatime above both."""
    if flags & MS_STRICTATIME:
        mode = "strictatime"
    elif flags & MS_NOATIME:
        mode = "noatime"
    else:
        mode = "relatime"
    return mode, bool(flags & MS_NODIRATIME)


_ATIME_WORDS = frozenset({"atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime"})


def mountinfo_atime(per_mount: str) -> tuple[bool, tuple[str, bool]]:
    """(read-only, (atime rule, nodiratime)) of a mount from its per-mount
    options in /proc/self/mountinfo ("rw,nosuid,nodev,relatime"): no atime
    word there means strictatime."""
    words = per_mount.split(",")
    mode = "noatime" if "noatime" in words else "relatime" if "relatime" in words else "strictatime"
    return "ro" in words, (mode, "nodiratime" in words)


def remount_flags(per_mount: str, given: list[str]) -> int:
    """The mount(2) flags (MS_REMOUNT not included) of `mount -o
    remount,OPTS` on a mount whose per-mount options in mountinfo are
    per_mount: what is not given stays as it is; an atime option given
    replaces the atime rule, as with mount(8)."""
    words = per_mount.split(",")
    if any(w in _ATIME_WORDS for w in given):
        words = [w for w in words if w not in _ATIME_WORDS]
    elif not any(w in ("noatime", "relatime") for w in words):
        words.append("strictatime")         # (mountinfo shows no word for it)
    return vfs_flags(words + list(given), False, base=0)


# Prefixes of userspace-only options (fstab ``x-systemd.*``, ``comment=``).
_GENERIC_PREFIXES = ("x-", "comment=")

_FLAG_OPTIONS = frozenset(
    {"userxattr", "volatile", "allow_other", "default_permissions", "debug", "ro", "writeback",
     "oci_whiteouts", "squash_to_root", "static_nlink", "noacl", "ino32_t"}
)
# FUSE's generic options (libfuse's and the kernel's), as fuse-overlayfs users
# and mount.fuse3 pass them: accepted, and what they would tune is already
# set (allow_root: see the README)
FUSE_GENERIC_FLAGS = frozenset(
    {"allow_root", "auto_unmount", "kernel_cache", "auto_cache", "noauto_cache", "direct_io",
     "nonempty", "hard_remove", "use_ino", "readdir_ino", "big_writes", "no_remote_lock",
     "no_remote_posix_lock", "no_remote_flock", "splice_read", "splice_write", "splice_move",
     "no_splice_read", "no_splice_write", "no_splice_move", "clone_fd", "blkdev",
     "intr", "nointr", "async_read", "sync_read", "atomic_o_trunc", "writeback_cache",
     "no_writeback_cache", "noforget", "fast_ino"}
)
FUSE_GENERIC_VALUES = frozenset(
    {"max_read", "max_write", "max_readahead", "max_background", "congestion_threshold",
     "blksize", "subtype", "user_id", "group_id", "rootmode", "max_idle_threads", "max_threads",
     "umask", "uid", "gid", "negative_timeout", "ac_attr_timeout", "modules", "intr_signal",
     "fd", "remember", "fast_ino"}
)
_VALUE_OPTIONS = frozenset(
    {"lowerdir", "upperdir", "workdir", "redirect_dir", "index", "metacopy", "xino", "fsname",
     "timeout", "entry_timeout", "attr_timeout", "workers", "uidmapping", "gidmapping",
     "engine", "passthrough", "uuid", "nfs_export", "verity",
     # fuse-overlayfs's
     "context", "squash_to_uid", "squash_to_gid", "xattr_permissions", "threaded", "fsync",
     "writeback", "noxattrs", "plugins", "lowerdir_file", "quota_bytes", "quota_inodes",
     "uring", "uring_depth"}
)
# The kernel's on/off features and the values it takes; _NOT_YET are the
# ones we do not have yet (refused with a line saying so, after the
# kernel's own checks of the combination).
_ONOFF = ("on", "off")
_FEATURE_VALUES = {
    "index": _ONOFF,
    "metacopy": _ONOFF,
    "nfs_export": _ONOFF,
    "xino": ("on", "off", "auto"),
    "verity": ("on", "off", "require"),
}
_NOT_YET: dict[str, tuple] = {}
_REDIRECT_DIR = {"on": True, "off": False, "follow": False, "nofollow": False}


def _split_unescaped(text: str, sep: str, quotes: bool = False) -> list[str]:
    """Split ``text`` on ``sep`` except where ``sep`` is backslash-escaped
    (or, with quotes, between double quotes, which are kept).

    Escapes are kept in the pieces (they are removed by :func:`_unescape`),
    so the result can be split again on another separator.
    """
    if "\\" not in text and not quotes:
        return text.split(sep)      # the common case, fast for long lowerdir=
    parts: list[str] = []
    cur: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if quotes and ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if quoted:
        raise OptionError("unbalanced double quote in the mount options")
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    """Drop the backslash of each ``\\x`` pair (``\\\\`` -> ``\\``)."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def split_options(optstring: str) -> list[str]:
    """Split an option string on unescaped commas outside double quotes,
    dropping empty options."""
    return [opt for opt in _split_unescaped(optstring, ",", '"' in optstring) if opt.strip()]


def split_lowerdir(value: str) -> list[str]:
    """Split a ``lowerdir`` value on unescaped ``:`` and unescape each entry."""
    return [_unescape(part) for part in _split_unescaped(value, ":")]


def split_layers(value: str) -> tuple[list[str], list[str]]:
    """The regular and the data-only layers of a ``lowerdir`` value, as the
    kernel reads it: ``A:B::C::D`` is A and B, then data-only C and D (each
    after a ``::``, none followed by a regular one)."""
    parts = _split_unescaped(value, ":")
    if len(parts) > 1 and parts[-1] == "":
        raise OptionError("unescaped trailing colons in lowerdir=")
    lowers: list[str] = []
    data: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] != "":
            if data:
                raise OptionError("regular lower layers cannot follow data-only lower layers in lowerdir=")
            lowers.append(_unescape(parts[i]))
            i += 1
            continue
        j = i
        while j < len(parts) and parts[j] == "":
            j += 1
        if i == 0:
            raise OptionError("empty layer path in lowerdir=")
        if j - i > 1:
            raise OptionError("only single ':' or double '::' sequences of unescaped colons "
                              "are allowed in lowerdir=")
        data.append(_unescape(parts[j]))
        i = j + 1
    return lowers, data


_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


_WORKERS_RANGE = "expected 1 to 64; 1 to 1000 with engine=pyfuse3"


def parse_size(value: str, name: str) -> int:
    """A quota: a number, with k, M, G or T (powers of 1024) after it."""
    v = value.strip()
    suffix = v[-1:].lower() if v[-1:].isalpha() else ""
    digits = v[:-1] if suffix else v
    whole, dot, frac = digits.partition(".")
    if (suffix not in _SIZE_SUFFIX or not whole.isdigit() or (dot and not frac.isdigit())
            or len(digits) > 18):
        raise OptionError(f"bad value '{value}' for {name} (expected a number, with k, M, G or T after it)")
    if not dot:
        return int(digits) * _SIZE_SUFFIX[suffix]
    # 1.5G: exact in integers (no float rounding), down to whole bytes
    return (int(whole + frac) * _SIZE_SUFFIX[suffix]) // 10 ** len(frac)


# options of image layers (overlay.images), for mounts and for the layer
# store (overlay layer-store -o ...)
IMAGE_OPTIONS = ("blob_cache", "blob_cache_max", "tls_verify", "authfile", "prefetch")


def image_option(name: str, value: str, cwd: str):
    """The value of one of IMAGE_OPTIONS (paths resolved against cwd;
    prefetch=none is None)."""
    if name == "tls_verify":
        if value not in ("true", "false"):
            raise OptionError(f"bad value '{value}' for tls_verify (expected true or false)")
        return value == "true"
    if name == "prefetch":
        if value not in ("all", "none"):
            raise OptionError(f"bad value '{value}' for prefetch (expected all or none)")
        return value if value == "all" else None
    if name == "blob_cache_max":
        return parse_size(value, name)
    if not value:
        raise OptionError(f"{name}= needs a {'file' if name == 'authfile' else 'directory'}")
    return _resolve(value, cwd)


def read_layer_file(path: str, cwd: str) -> tuple[list[str], list[str]]:
    """The regular and data-only layers listed in a file (lowerdir_file=):
    one path a line, top first, no escaping; empty lines are skipped; after
    a line "::" the layers are data-only ones. "-" reads standard input."""
    import sys  # noqa: PLC0415

    try:
        if path == "-":
            text = sys.stdin.buffer.read()
        else:
            with open(os.path.join(cwd, os.path.expanduser(path)), "rb") as fh:
                text = fh.read()
    except OSError as exc:
        raise OptionError(f"cannot read lowerdir_file '{path}': {exc.strerror}") from None
    lowers: list[str] = []
    data: list[str] = []
    into = lowers
    for raw in text.split(b"\n"):
        line = os.fsdecode(raw.rstrip(b"\r"))
        if not line.strip():
            continue
        if line.strip() == "::":
            if not lowers:
                raise OptionError(f"lowerdir_file '{path}': data-only layers need a regular one first")
            into = data
            continue
        if into is lowers and data:
            raise OptionError("regular lower layers cannot follow data-only lower layers")
        into.append(line)
    if not lowers:
        raise OptionError(f"lowerdir_file '{path}' lists no layer")
    return lowers, data


def _resolve(path: str, cwd: str, parents: dict | None = None) -> str:
    """The canonical path. With parents (a cache of resolved dirs): the
    layers of a big stack mostly share their parent dir, resolved once;
    only the last name is looked at for each (a symlink: resolved whole)."""
    full = os.path.join(cwd, os.path.expanduser(path))
    if parents is None:
        return os.path.realpath(full)
    head, name = os.path.split(full.rstrip(os.sep) or os.sep)
    if not name or name in (".", "..") or ".." in head.split(os.sep):
        return os.path.realpath(full)
    real_head = parents.get(head)
    if real_head is None:
        real_head = parents[head] = os.path.realpath(head)
    candidate = os.path.join(real_head, name)
    if os.path.islink(candidate):
        return os.path.realpath(candidate)
    return candidate


def _check_dir(path: str, what: str) -> os.stat_result:
    """stat ``path`` and make sure it is a directory, else raise OptionError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OptionError(f"{what} '{path}' does not exist") from None
    except NotADirectoryError:
        raise OptionError(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise OptionError(f"cannot access {what} '{path}': {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OptionError(f"{what} '{path}' is not a directory")
    return st


def _check_lower(path: str) -> None:
    """A lower layer is a directory, or a regular file holding a layer blob
    (tar, tar+gzip, tar+zstd: overlay.images)."""
    try:
        st = os.stat(path)
    except OSError:
        _check_dir(path, "lower layer")     # (its message)
        return
    if stat.S_ISDIR(st.st_mode):
        return
    from overlay.images.blob import sniff_head  # noqa: PLC0415 - only for a file as a layer

    head = b""
    if stat.S_ISREG(st.st_mode):
        try:
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError as exc:
            raise OptionError(f"cannot read lower layer '{path}': {exc.strerror}") from None
    if sniff_head(head) is None:
        raise OptionError(f"lower layer '{path}' is neither a directory nor a layer blob"
                          " (tar, tar+gzip, tar+zstd)")


def _is_same_or_inside(path: str, other: str) -> bool:
    """True if ``path`` equals ``other`` or lies below it (both canonical)."""
    if path == other:
        return True
    prefix = other if other.endswith(os.sep) else other + os.sep
    return path.startswith(prefix)


def _check_lowers_apart(lowers: list[str]) -> None:
    """OptionError if a lower layer is (or lies inside) another one.

    Sorted as lists of components, a path comes right after the paths it
    lies in (or the paths lying in them), so comparing neighbours finds any
    overlap: O(n log n) for the thousands of layers of an image stack."""
    if len(lowers) < 32:
        for i, lower in enumerate(lowers):
            for other in lowers[:i]:
                if _is_same_or_inside(lower, other) or _is_same_or_inside(other, lower):
                    raise OptionError(f"lower layer '{lower}' overlaps lower layer '{other}'")
        return
    order = sorted(range(len(lowers)), key=lambda i: lowers[i].split(os.sep))
    for a, b in zip(order, order[1:]):
        pa, pb = lowers[a].split(os.sep), lowers[b].split(os.sep)
        if pb[:len(pa)] == pa:
            later, earlier = max(a, b), min(a, b)
            raise OptionError(f"lower layer '{lowers[later]}' overlaps lower layer '{lowers[earlier]}'")


def parse_options(optstring: str, cwd: str) -> MountConfig:
    """Parse and validate an overlay option string; see the module docstring.

    Raises :class:`OptionError` with a one-line message on the first problem.
    """
    lowerdir: str | None = None
    lowerdir_file: str | None = None
    upperdir: str | None = None
    workdir: str | None = None
    read_only = False
    flags: dict[str, bool] = {}
    redirect_dir = None
    fsname = "overlay"
    timeouts: dict[str, float] = {}
    extra: dict[str, int] = {}
    idmaps: dict[str, str] = {}
    ignored: list[str] = []
    features: dict[str, str] = {}
    redirect_value = None

    for raw in split_options(optstring):
        opt = raw.strip()
        name, has_value, value = opt.partition("=")
        if opt in GENERIC_OPTIONS or opt.startswith(_GENERIC_PREFIXES):
            ignored.append(opt)
            continue
        if (name in FUSE_GENERIC_FLAGS and not has_value) or (name in FUSE_GENERIC_VALUES and has_value):
            ignored.append(opt)
            continue
        if opt == "noallow_other":
            flags["allow_other"] = False
            continue
        if name == "log":
            if not value:
                raise OptionError("log= needs a file, or syslog")
            extra["log"] = value if value == "syslog" else _resolve(value, cwd)
            continue
        if name == "image":
            if not value:
                raise OptionError("image= needs a reference (HOST[:PORT]/REPO[:TAG], ...@sha256:..., oci:PATH[:TAG])")
            if value.startswith("oci:"):
                path, colon, tag = value[4:].partition(":")
                value = "oci:" + _resolve(path, cwd) + colon + tag
            extra["image"] = value
            continue
        if name in IMAGE_OPTIONS:
            extra[name] = image_option(name, value, cwd)
            continue
        if name == "writeback" and has_value:
            if value not in ("0", "1"):
                raise OptionError(f"bad value '{value}' for writeback (expected 0 or 1)")
            flags["writeback"] = value == "1"
            continue
        if name in _FLAG_OPTIONS:
            if has_value:
                raise OptionError(f"mount option '{name}' takes no value")
            if name == "ro":
                read_only = True
            else:
                flags[name] = True
            continue
        if name not in _VALUE_OPTIONS:
            raise OptionError(f"unknown mount option '{name}'")
        if not has_value or (value == "" and name not in ("lowerdir", "upperdir", "workdir")):
            raise OptionError(f"mount option '{name}' needs a value ({name}=...)")
        if name == "lowerdir":
            lowerdir = value
        elif name == "lowerdir_file":
            lowerdir_file = _unescape(value)
        elif name == "upperdir":
            upperdir = value
        elif name == "workdir":
            workdir = value
        elif name == "fsname":
            fsname = _unescape(value)
        elif name in ("uidmapping", "gidmapping"):
            from .idmap import IdMap, IdMapError
            try:
                IdMap.parse(value, name)
            except IdMapError as exc:
                raise OptionError(str(exc)) from None
            idmaps[name] = value
        elif name == "engine":
            if value not in ("native", "pyfuse3"):
                raise OptionError(f"bad value '{value}' for engine (expected native or pyfuse3)")
            extra["engine"] = value
        elif name == "uring":
            if value not in ("auto", "on", "off"):
                raise OptionError(f"bad value '{value}' for uring (expected auto, on or off)")
            extra["uring"] = value
        elif name == "uring_depth":
            if not value.isdigit() or not 1 <= int(value) <= 256:
                raise OptionError(f"bad value '{value}' for uring_depth (expected 1 to 256)")
            extra["uring_depth"] = int(value)
        elif name == "passthrough":
            if value not in ("on", "off"):
                raise OptionError(f"bad value '{value}' for passthrough (expected on or off)")
            extra["passthrough"] = value == "on"
        elif name == "workers":
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise OptionError(f"bad value '{value}' for workers ({_WORKERS_RANGE})")
            extra["workers"] = int(value)
        elif name in ("timeout", "entry_timeout", "attr_timeout"):
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not 0 <= seconds <= 1e10:
                raise OptionError(f"bad value '{value}' for {name} (expected seconds >= 0)")
            # (fuse-overlayfs's default is 1e9 s; the kernel's timers take less)
            seconds = min(seconds, 1e8)
            if name == "timeout":
                timeouts.setdefault("entry_timeout", seconds)
                timeouts.setdefault("attr_timeout", seconds)
            else:
                timeouts[name] = seconds
        elif name == "context":
            extra["context"] = value
        elif name in ("quota_bytes", "quota_inodes"):
            extra[name] = parse_size(value, name)
        elif name in ("squash_to_uid", "squash_to_gid"):
            if not value.isdigit() or int(value) > 0xFFFFFFFE:
                raise OptionError(f"bad value '{value}' for {name} (expected an id)")
            extra[name] = int(value)
        elif name == "xattr_permissions":
            if value not in ("0", "1", "2"):
                raise OptionError(f"bad value '{value}' for xattr_permissions (expected 0, 1 or 2)")
            extra["xattr_permissions"] = int(value)
        elif name in ("threaded", "noxattrs", "fsync"):
            if value not in ("0", "1"):
                raise OptionError(f"bad value '{value}' for {name} (expected 0 or 1)")
            if name == "threaded":
                # fuse-overlayfs's single-threaded mode: one request at a time
                if value == "0":
                    extra.setdefault("workers", 1)
            elif name == "noxattrs":
                extra["noxattrs"] = value == "1"
            else:
                extra["no_fsync"] = value == "0"
        elif name == "plugins":
            if value:
                raise OptionError("plugins= is not supported: fuse-overlayfs's layer plugins"
                                  " have no equivalent here (use regular layer dirs)")
            ignored.append(opt)
        elif name == "uuid":
            if value not in ("on", "off", "null", "auto"):
                raise OptionError(f"bad value '{value}' for uuid (expected on, off, null or auto)")
            extra["uuid"] = value
        elif name == "redirect_dir":
            if value not in _REDIRECT_DIR:
                raise OptionError(
                    f"bad value '{value}' for redirect_dir (expected on, off, follow or nofollow)"
                )
            redirect_dir = _REDIRECT_DIR[value]
            redirect_value = value
        else:  # index / metacopy / nfs_export / xino / verity
            allowed = _FEATURE_VALUES[name]
            if value not in allowed:
                raise OptionError(
                    f"bad value '{value}' for {name} (expected {', '.join(allowed[:-1])} or {allowed[-1]})"
                )
            features[name] = value

    image = extra.get("image")
    if image is not None and (lowerdir is not None or lowerdir_file is not None):
        raise OptionError("give either image= or lowerdir=, not both")
    if image is not None:
        entries, data_entries = [], []      # (the daemon fetches the image's layers)
    elif lowerdir_file is not None:
        if lowerdir is not None:
            raise OptionError("give either lowerdir= or lowerdir_file=, not both")
        entries, data_entries = read_layer_file(lowerdir_file, cwd)
    elif lowerdir is None:
        raise OptionError("missing required option 'lowerdir='")
    else:
        entries, data_entries = split_layers(lowerdir)
    lowers: list[str] = []
    parents: dict[str, str] = {}
    for entry in entries:
        path = _resolve(entry, cwd, parents)
        _check_lower(path)
        lowers.append(path)
    datadirs: list[str] = []
    for entry in data_entries:
        path = _resolve(entry, cwd, parents)
        _check_dir(path, "data-only lower layer")
        datadirs.append(path)

    upper = work = None
    if upperdir is not None or workdir is not None:
        if upperdir is None:
            raise OptionError("workdir= given without upperdir=")
        if workdir is None:
            raise OptionError("upperdir= given without workdir=")
        if upperdir == "":
            raise OptionError("empty path in upperdir=")
        if workdir == "":
            raise OptionError("empty path in workdir=")
        upper = _resolve(_unescape(upperdir), cwd)
        work = _resolve(_unescape(workdir), cwd)
        st_upper = _check_dir(upper, "upperdir")
        st_work = _check_dir(work, "workdir")
        if st_upper.st_dev != st_work.st_dev:
            raise OptionError(
                f"workdir '{work}' is not on the same filesystem as upperdir '{upper}'"
            )
        if _is_same_or_inside(upper, work) or _is_same_or_inside(work, upper):
            raise OptionError(
                f"upperdir '{upper}' and workdir '{work}' must be different, non-nested directories"
            )
        if os.statvfs(upper).f_flag & os.ST_RDONLY:
            raise OptionError(f"upperdir '{upper}' is on a read-only filesystem")

    # like the kernel ("overlapping lowerdir path"): a lower layer may not be
    # inside (or be) the upper dir, the work dir or another lower layer
    for i, lower in enumerate(lowers + datadirs):
        for what, other in (("upperdir", upper), ("workdir", work)):
            if other is not None and _is_same_or_inside(lower, other):
                raise OptionError(f"lower layer '{lower}' overlaps {what} '{other}'")
    _check_lowers_apart(lowers + datadirs)
    if datadirs:
        extra["datadirs"] = datadirs

    userxattr = flags.get("userxattr", False)
    _check_combination(features, redirect_value, userxattr, upper is not None)
    for name, value in features.items():
        if value in _NOT_YET.get(name, ()):
            raise OptionError(f"{name}={value} is not supported yet")
        if name == "xino":
            extra["xino"] = value
        elif name in ("index", "metacopy", "nfs_export"):
            extra[name] = value == "on"
        elif name == "verity":
            extra["verity"] = value
        else:
            ignored.append(f"{name}={value}")
    if redirect_dir is None:
        # like the kernel, which refuses redirect_dir=on with userxattr
        # (unprivileged mounts): renaming merged dirs then gives EXDEV
        redirect_dir = not userxattr
    if redirect_value == "nofollow" or (redirect_value is None and userxattr):
        # the kernel's nofollow (userxattr's default): a dir's redirect is
        # not followed, its lookup fails (EPERM)
        extra["redirect_follow"] = False
    if extra.get("nfs_export") and upper is not None and features.get("index") != "off":
        extra["index"] = True       # as the kernel: nfs_export=on needs the index

    if extra.get("engine") == "pyfuse3":
        for name, given in (("squash_to_uid", "squash_to_uid" in extra),
                            ("squash_to_gid", "squash_to_gid" in extra),
                            ("static_nlink", flags.get("static_nlink")), ("noacl", flags.get("noacl")),
                            ("ino32_t", flags.get("ino32_t")), ("noxattrs", extra.get("noxattrs"))):
            if given:
                raise OptionError(f"{name} needs the native engine (not engine=pyfuse3)")
    for name in ("quota_bytes", "quota_inodes"):
        if name in extra:
            if upper is None:
                raise OptionError(f"{name} needs an upper layer (upperdir= and workdir=)")
            if extra.get("engine") == "pyfuse3":
                raise OptionError(f"{name} needs the native engine (not engine=pyfuse3)")
    if "quota_bytes" in extra and flags.get("writeback"):
        raise OptionError("quota_bytes cannot go with writeback=1: the kernel's writeback cache"
                          " would report a write over the quota long after write(2) returned")
    if extra.get("xattr_permissions") and upper is None:
        extra["xattr_permissions"] = 0      # (as fuse-overlayfs: only an upper layer is written)
    if extra.get("engine", "native") == "native" and extra.get("workers", 1) > 64:
        raise OptionError(f"bad value '{extra['workers']}' for workers ({_WORKERS_RANGE})")

    config = MountConfig(
        lowers=lowers,
        upper=upper,
        work=work,
        ro=read_only,
        userxattr=userxattr,
        redirect_dir=redirect_dir,
        volatile=flags.get("volatile", False),
        allow_other=flags.get("allow_other"),
        default_permissions=flags.get("default_permissions", False),
        debug=flags.get("debug", False),
        writeback=flags.get("writeback", False),
        oci_whiteouts=flags.get("oci_whiteouts", False),
        squash_to_root=flags.get("squash_to_root", False),
        static_nlink=flags.get("static_nlink", False),
        noacl=flags.get("noacl", False),
        ino32=flags.get("ino32_t", False),
        **idmaps,
        fsname=fsname,
        **timeouts,
        **extra,
        ignored=ignored,
    )
    log.debug("parsed mount options %r -> %r", optstring, config)
    return config


def _check_combination(features: dict, redirect_value, userxattr: bool, has_upper: bool) -> None:
    """The option combinations the kernel overlay refuses, in its words
    ("conflicting options: ..."), checked in the order it checks them, and
    its fallback of nfs_export=on on a mount without upper layer (dropped
    from features, with its line in the log)."""
    def conflict(a, b):
        raise OptionError(f"conflicting options: {a},{b}")

    metacopy = features.get("metacopy") == "on"
    nfs_export = features.get("nfs_export") == "on"
    if metacopy and redirect_value in ("off", "follow", "nofollow"):
        # the kernel names redirect_dir=off as it reads it: follow
        conflict("metacopy=on", "redirect_dir=" + ("follow" if redirect_value == "off" else redirect_value))
    if nfs_export and not has_upper and redirect_value != "nofollow":
        # lower handles of redirected dirs could not be decoded
        log.info('NFS export requires "redirect_dir=nofollow" on non-upper mount,'
                 " falling back to nfs_export=off")
        features["nfs_export"] = "off"
        nfs_export = False
    if nfs_export and features.get("index") == "off":
        conflict("nfs_export=on", "index=off")
    if nfs_export and metacopy:
        conflict("nfs_export=on", "metacopy=on")
    if userxattr and redirect_value == "on":
        conflict("userxattr", "redirect_dir=on")
    if userxattr and redirect_value in ("off", "follow"):
        # (with userxattr only nofollow is allowed; off reads as follow)
        conflict("userxattr", "redirect_dir=follow")
    if userxattr and metacopy:
        conflict("userxattr", "metacopy=on")


def validate_mountpoint(path: str, cwd: str | None = None) -> str:
    """Return the absolute mount point, or raise OptionError if unusable."""
    if not path:
        raise OptionError("empty mountpoint")
    absolute = os.path.realpath(os.path.join(cwd or os.getcwd(), os.path.expanduser(path)))
    try:
        st = os.stat(absolute)
    except (FileNotFoundError, NotADirectoryError):
        raise OptionError(f"mountpoint '{absolute}' does not exist") from None
    except OSError as exc:
        raise OptionError(f"cannot access mountpoint '{absolute}': {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OptionError(f"mountpoint '{absolute}' is not a directory")
    return absolute

"""Command line front end (src/overlay/cli.py).

Two console scripts live here (see ``[project.scripts]`` in pyproject.toml):

``overlay`` -> :func:`main`
    ``overlay mount -o OPTS [-f] MOUNTPOINT``   mount (in the background unless -f)
    ``overlay umount MOUNTPOINT``               unmount
    ``overlay demo``                            the guided walkthrough (overlay.demo)
    ``overlay diff UPPER [--lower A:B]``        what an upper dir adds/changes/deletes
    ``overlay commit UPPER -o LAYER.tar``       an upper dir as an OCI layer tarball
                                                (both in overlay.layertools)

``overlay-mount`` -> :func:`mount_helper_main`
    The helper behind ``mount -t fuse.overlay-mount SOURCE MOUNTPOINT -o OPTS``:
    mount.fuse3 runs ``overlay-mount SOURCE MOUNTPOINT -o OPTS`` through
    ``/bin/sh -c``, so the script must be on the PATH that mount(8) sees.

The filesystem itself (``overlay.serve.run_fs``, which pulls in the engine and
the Cython core) is imported only once a mount is really about to happen, so
``--help`` and option errors are fast.  Bad input gives one line on stderr and
exit code 1 (2 for command-line usage errors), and nothing gets mounted.

Background mounts fork: the child starts a new session, detaches its stdio
(to ``/dev/null`` or the ``--log`` file), runs ``run_fs`` and tells the parent
through a pipe either ``ready`` or the one-line error; the parent exits 0 once
the mount is live, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Callable, Sequence

from overlay.mounttable import (  # noqa: F401  (re-exported: tests and callers use cli.*)
    MountEntry,
    find_mount,
    is_ours,
    iter_mounts,
    mountpoint_path as _mountpoint_path,
    our_mounts,
    unescape_mountinfo as _unescape_mountinfo,
    unmount as _unmount,
)
from overlay.options import (
    MountConfig,
    OptionError,
    parse_options,
    split_options,
    validate_mountpoint,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

# How long a background mount waits for the filesystem to come up.
DEFAULT_READY_TIMEOUT = 60.0

LOG_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"

RunFs = "Callable[[MountConfig, str, Callable[[], None]], None]"


# --------------------------------------------------------------------------
# small helpers


def _say_error(prog: str, message: str) -> int:
    """Print ``prog: message`` as one line on stderr and return EXIT_ERROR."""
    text = " ".join(str(message).split())
    print(f"{prog}: {text}", file=sys.stderr, flush=True)
    return EXIT_ERROR


SYSLOG_SOCKET = "/dev/log"


def syslog_available() -> bool:
    """Is there a syslog socket (journald's, or a syslog daemon's)?"""
    import stat as _stat  # noqa: PLC0415

    try:
        return _stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode)
    except OSError:
        return False


def check_log_target(target: str) -> str | None:
    """Why the log target (a file, or "syslog") cannot be used, or None.
    A file is created if missing (the mount would log into it)."""
    if target == "syslog":
        return None if syslog_available() else f"log=syslog: no syslog socket ({SYSLOG_SOCKET}) here"
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        return f"cannot open the log '{target}': {exc.strerror}"
    os.close(fd)
    return None


def setup_logging(level: int, log_file: str | None = None) -> None:
    """Send log records to stderr, append them to ``log_file``, or (log_file
    "syslog") to the syslog socket: the journal where systemd runs."""
    handler: logging.Handler
    if log_file == "syslog":
        from logging.handlers import SysLogHandler  # noqa: PLC0415

        handler = SysLogHandler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("overlay[%(process)d]: %(name)s %(levelname)s: %(message)s"))
        logging.basicConfig(level=level, handlers=[handler], force=True)
        return
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def describe_exception(exc: BaseException) -> str:
    """One line for an exception, unwrapping (single-member) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename:
            name = exc.filename
            if isinstance(name, bytes):
                name = os.fsdecode(name)
            text = f"{text}: '{name}'"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _load_run_fs() -> RunFs:
    """Import the filesystem lazily (the engine and the Cython core)."""
    from overlay.serve import run_fs  # noqa: PLC0415 - deliberately lazy

    return run_fs


# --------------------------------------------------------------------------
# running the filesystem


def run_foreground(config: MountConfig, mountpoint: str, prog: str) -> int:
    """Run the filesystem in this process until it is unmounted."""
    try:
        run_fs = _load_run_fs()
    except ImportError as exc:
        log.debug("import of the filesystem failed", exc_info=True)
        return _say_error(prog, f"cannot load the filesystem: {describe_exception(exc)}")

    def on_ready() -> None:
        log.info("mounted %s on %s", config.fsname, mountpoint)

    try:
        run_fs(config, mountpoint, on_ready)
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    except Exception as exc:  # one line for the user, the trace in the log
        log.debug("run_fs failed", exc_info=True)
        return _say_error(prog, f"cannot mount on '{mountpoint}': {describe_exception(exc)}")
    log.info("%s unmounted", mountpoint)
    return EXIT_OK


def _redirect_stdio(log_file: str | None) -> None:
    """Point fds 0, 1, 2 away from the caller's terminal or pipes."""
    devnull = os.open(os.devnull, os.O_RDWR)
    target = devnull
    if log_file:
        try:
            target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            target = devnull
    os.dup2(devnull, 0)
    os.dup2(target, 1)
    os.dup2(target, 2)
    for fd in {devnull, target}:
        if fd > 2:
            os.close(fd)


def _daemon_child(
    config: MountConfig,
    mountpoint: str,
    report_fd: int,
    log_file: str | None,
    loader: Callable[[], RunFs],
) -> int:
    """Body of the forked background process; returns its exit status."""
    os.setsid()
    os.chdir("/")
    _redirect_stdio(None if log_file == "syslog" else log_file)
    # fds 1/2 now go to the log (or nowhere); the logging handler writes to fd 2
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    setup_logging(logging.DEBUG if config.debug else logging.INFO,
                  "syslog" if log_file == "syslog" else None)

    reported = False

    def report(message: str) -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        try:
            os.write(report_fd, (message + "\n").encode("utf-8", "replace"))
        except OSError:
            log.warning("could not report %r to the parent process", message)
        finally:
            os.close(report_fd)

    def on_ready() -> None:
        log.info("mounted %s on %s", config.fsname, mountpoint)
        report("ready")

    try:
        run_fs = loader()
        run_fs(config, mountpoint, on_ready)
    except BaseException as exc:  # noqa: BLE001 - the child must always report
        message = describe_exception(exc)
        if isinstance(exc, ImportError):
            message = f"cannot load the filesystem: {message}"
        elif not reported:
            message = f"cannot mount on '{mountpoint}': {message}"
        log.error("filesystem on %s failed: %s", mountpoint, message, exc_info=True)
        report("error " + message)
        return EXIT_ERROR
    if not reported:
        report("error filesystem stopped before the mount was ready")
        return EXIT_ERROR
    log.info("%s unmounted", mountpoint)
    return EXIT_OK


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _reap(pid: int, wait: float) -> int | None:
    """waitpid ``pid`` for up to ``wait`` seconds; its status or None."""
    deadline = time.monotonic() + wait
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _read_report(fd: int, timeout: float) -> str | None:
    """First line the child writes to ``fd``; '' on EOF, None on time-out."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode("utf-8", "replace")


def run_background(
    config: MountConfig,
    mountpoint: str,
    prog: str,
    *,
    log_file: str | None = None,
    timeout: float = DEFAULT_READY_TIMEOUT,
    loader: Callable[[], RunFs] = _load_run_fs,
) -> int:
    """Fork a detached filesystem process; return once the mount is live."""
    mounted_before = find_mount(mountpoint)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = EXIT_ERROR
        try:
            os.close(read_fd)
            code = _daemon_child(config, mountpoint, write_fd, log_file, loader)
        finally:
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    os.close(write_fd)
    try:
        line = _read_report(read_fd, timeout)
    finally:
        os.close(read_fd)

    if line == "ready":
        log.debug("filesystem process %d is serving %s", pid, mountpoint)
        return EXIT_OK
    if line is None:
        log.debug("killing filesystem process %d after time-out", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _reap(pid, 5.0)
        mounted_now = find_mount(mountpoint)
        if mounted_now is not None and mounted_now != mounted_before:
            _unmount(mountpoint, lazy=True)  # the half-started mount is ours
        return _say_error(
            prog, f"the filesystem did not come up on '{mountpoint}' within {timeout:g} seconds"
        )
    status = _reap(pid, 10.0)
    if line.startswith("error "):
        return _say_error(prog, line[len("error ") :])
    how = _describe_status(status) if status is not None else "no report"
    return _say_error(prog, f"the filesystem process ended ({how}) before '{mountpoint}' was mounted")


def start_mount(
    optstrings: Sequence[str],
    mountpoint: str,
    *,
    prog: str,
    foreground: bool,
    log_file: str | None,
    timeout: float,
    debug: bool = False,
    as_helper: bool = False,
    source: str | None = None,
) -> int:
    """Validate everything, then mount in the foreground or the background."""
    optstring = ",".join(o for o in optstrings if o)
    cwd = os.getcwd()
    if "remount" in split_options(optstring):
        return remount_command(split_options(optstring), mountpoint, prog=prog)
    root_logger = logging.getLogger()
    saved_level = root_logger.level
    # (the parse's own debug lines would reach the terminal before the log
    # is set up; the config is logged below, where the log goes)
    root_logger.setLevel(max(saved_level, logging.INFO))
    try:
        config = parse_options(optstring, cwd)
        if as_helper:
            _apply_helper_defaults(config, optstring, source, prog)
        if config.allow_other is None:
            # the same default at every entry point: a root mount shows
            # other users what the kernel overlay would show them
            config.allow_other = os.geteuid() == 0
        if debug:
            config.debug = True
        mountpoint = validate_mountpoint(mountpoint, cwd)
    except OptionError as exc:
        return _say_error(prog, str(exc))
    finally:
        root_logger.setLevel(saved_level)
    # where the log goes: --log, else log=, else (background) the syslog
    # socket where there is one; a target that cannot be used is an error
    if log_file:
        log_file = os.path.abspath(log_file) if log_file != "syslog" else log_file
    else:
        log_file = config.log
    if log_file:
        problem = check_log_target(log_file)
        if problem:
            return _say_error(prog, problem)
    elif not foreground and syslog_available():
        log_file = "syslog"
    level = logging.DEBUG if config.debug else (logging.getLogger().level or logging.WARNING)
    if log_file and (foreground or log_file != "syslog"):
        # this process's own lines (the options, the outcome) go there too
        setup_logging(level, log_file)
    else:
        logging.getLogger().setLevel(level)
    log.debug("mounting %r on %s (foreground=%s)", config, mountpoint, foreground)
    if foreground:
        return run_foreground(config, mountpoint, prog)
    return run_background(config, mountpoint, prog, log_file=log_file, timeout=timeout)


def remount_command(words: list[str], mountpoint: str, *, prog: str) -> int:
    """`mount -o remount,OPTS` of a mount of ours (mount(8) hands it to the
    helper): the generic options (ro, rw, noatime, nodiratime...) change
    the mount's flags, the others (the layers) stay as mounted. The
    daemon sees the change in the mount table and follows it."""
    from overlay.options import _MS_OPTIONS, MS_REMOUNT, remount_flags  # noqa: PLC0415

    path = _mountpoint_path(mountpoint)
    entry = find_mount(path)
    if entry is None or not is_ours(entry):
        return _say_error(prog, f"'{path}' is not a mount of ours")
    given = [w for w in words if w in _MS_OPTIONS]
    flags = remount_flags(entry.options, given)
    from overlay.engine import wire  # noqa: PLC0415 - the native engine's mount(2)

    try:
        wire.sys_mount(b"", os.fsencode(path), b"", MS_REMOUNT | flags, b"")
    except OSError as exc:
        return _say_error(prog, f"cannot remount '{path}': {exc.strerror}")
    return EXIT_OK


# --------------------------------------------------------------------------
# unmounting


def _umount_target(mountpoint: str) -> str:
    """The mount point umount(8) would take for mountpoint: a symlink is
    followed (the final one too); a mount point itself is never stat()ed
    through (a dead FUSE mount would fail)."""
    path = _mountpoint_path(mountpoint)
    try:
        if os.path.islink(path):
            return os.path.realpath(path)
    except OSError:
        pass
    return path


def umount_command(mountpoint: str, *, lazy: bool, prog: str, force: bool = False) -> int:
    path = _umount_target(mountpoint)
    entry = find_mount(path)
    if entry is None:
        return _say_error(prog, f"'{path}' is not mounted")
    if not force and not is_ours(entry):
        return _say_error(prog, f"'{path}' is not an overlay of ours (it is {entry.fstype});"
                                " use umount(8), or --force")
    ok, error = _unmount(path, lazy=lazy)
    if not ok:
        return _say_error(prog, f"cannot unmount '{path}': {error}")
    return EXIT_OK


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    return (f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s")


def list_mounts() -> list[dict]:
    """Every live mount of ours this process sees: mount point, layers,
    options, daemon PID, engine, uptime (what its daemon reports)."""
    out = []
    now = time.time()
    for entry, st in our_mounts():
        info = (st or {}).get("mount") or {}
        out.append({
            "mountpoint": entry.mountpoint,
            "source": entry.source,
            "fstype": entry.fstype,
            "pid": info.get("pid"),
            "engine": info.get("engine") or (st or {}).get("engine"),
            "uptime_s": round(now - info["started"], 1) if info.get("started") else None,
            "lowers": info.get("lowers"),
            "datadirs": info.get("datadirs") or [],
            "upper": info.get("upper"),
            "work": info.get("work"),
            "options": info.get("options"),
            "mount_options": entry.options,
            "answering": st is not None,
        })
    return out


def list_command(as_json: bool) -> int:
    mounts = list_mounts()
    if as_json:
        import json  # noqa: PLC0415

        print(json.dumps(mounts, indent=2))
        return EXIT_OK
    if not mounts:
        print("no overlay mounts of ours")
        return EXIT_OK
    for m in mounts:
        if not m["answering"]:
            print(f"{m['mountpoint']}  (its daemon does not answer)")
            continue
        if m["pid"] is None:
            print(f"{m['mountpoint']}  (a daemon of an older version: no details)")
            continue
        print(f"{m['mountpoint']}  pid {m['pid']}  {m['engine']}  up {_age(m['uptime_s'] or 0)}"
              f"  ({m['mount_options']})")
        lowers = ":".join(m["lowers"] or []) + ("::" + ":".join(m["datadirs"]) if m["datadirs"] else "")
        print(f"  lower    {lowers}")
        if m["upper"]:
            print(f"  upper    {m['upper']}")
            print(f"  work     {m['work']}")
        if m["options"]:
            opts = ",".join(k if v is True else f"{k}={v}" for k, v in sorted(m["options"].items()))
            print(f"  options  {opts}")
    return EXIT_OK


# --------------------------------------------------------------------------
# overlay (main)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("overlay-fuse")
    except Exception:  # noqa: BLE001 - not installed, running from a checkout
        return "unknown"


def build_parser(tools: bool = True) -> argparse.ArgumentParser:
    """The `overlay` parser; tools=False leaves out diff, commit and stats
    (their modules take a while to import: `overlay mount` starts faster)."""
    parser = argparse.ArgumentParser(
        prog="overlay",
        description="A kernel-exact overlay (union, copy-on-write) filesystem on FUSE.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    mount = sub.add_parser(
        "mount",
        help="mount an overlay",
        description="Mount an overlay on MOUNTPOINT (in the background unless -f).",
        epilog="example: overlay mount -o lowerdir=image2:image1,upperdir=up,workdir=work merged",
    )
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="comma-separated mount options (lowerdir=, upperdir=, workdir=, ...); may repeat",
    )
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    mount.add_argument(
        "-d", "--debug", action="store_true", help="debug logging (same as -o debug)"
    )
    mount.add_argument("--log", metavar="FILE", help="background mode: append the log to FILE")
    mount.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT,
        metavar="SECONDS",
        help="background mode: how long to wait for the mount (default %(default)g)",
    )
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")

    umount = sub.add_parser("umount", help="unmount an overlay",
                            description="Unmount MOUNTPOINT (an overlay of ours; a symlink is followed).")
    umount.add_argument("-l", "-z", "--lazy", action="store_true", help="lazy unmount")
    umount.add_argument("--force", action="store_true",
                        help="unmount MOUNTPOINT even if it is not an overlay of ours")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")

    lst = sub.add_parser("list", help="list the live overlay mounts of ours",
                         description="List every live overlay mount of ours: mount point, daemon PID,"
                         " engine, uptime, layers and options.")
    lst.add_argument("--json", action="store_true", help="print JSON")

    demo = sub.add_parser(
        "demo",
        help="walk through whiteouts and copy-up on a scratch overlay",
        description="Build a scratch overlay in a temporary directory and show, step by step, "
        "how whiteouts and copy-up behave. Exits non-zero if any step misbehaves.",
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    demo.add_argument("--dir", metavar="DIR", help="create the scratch directory under DIR")

    if not tools:
        return parser
    from overlay import layertools  # noqa: PLC0415 - stdlib only, no pyfuse3

    layertools.add_commands(sub)
    from overlay import stats  # noqa: PLC0415 - stdlib only

    stats.add_command(sub)
    stats.add_which_command(sub)
    from overlay import layerstore  # noqa: PLC0415

    layerstore.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``overlay`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(tools=not argv or argv[0] not in ("mount", "umount", "list"))
    args = parser.parse_args(argv)
    if args.version:
        print(f"overlay {_version()}")
        return EXIT_OK
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("overlay: error: a command is required (mount, umount, list, demo, diff, commit, stats, which or layer-store)",
              file=sys.stderr)
        return EXIT_USAGE

    if args.command == "mount":
        level = logging.DEBUG if args.debug else (logging.INFO if args.foreground else logging.WARNING)
        setup_logging(level)        # (start_mount sends it to --log or log=)
        if args.timeout <= 0:
            parser.error("--timeout must be positive")
        return start_mount(
            args.options,
            args.mountpoint,
            prog="overlay",
            foreground=args.foreground,
            log_file=args.log,
            timeout=args.timeout,
            debug=args.debug,
        )

    setup_logging(logging.WARNING)
    if args.command in ("list", "stats", "which", "diff", "commit"):
        # output piped into head(1) and the like: end quietly when the
        # reader goes away, as other tools do (killed by SIGPIPE)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.command == "umount":
        return umount_command(args.mountpoint, lazy=args.lazy, prog="overlay", force=args.force)
    if args.command == "list":
        return list_command(args.json)
    if args.command == "demo":
        from overlay.demo import run_demo  # noqa: PLC0415 - lazy

        return run_demo(keep=args.keep, base_dir=args.dir)
    if args.command == "stats":
        from overlay import stats  # noqa: PLC0415

        return stats.run_command(args, prog="overlay")
    if args.command == "which":
        from overlay import stats  # noqa: PLC0415

        return stats.run_which(args, prog="overlay")
    if args.command == "layer-store":
        from overlay import layerstore  # noqa: PLC0415

        return layerstore.run_command(args, prog="overlay")
    if args.command in ("diff", "commit"):
        from overlay import layertools  # noqa: PLC0415

        return layertools.run_command(args, prog="overlay")
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks
    return EXIT_USAGE


# --------------------------------------------------------------------------
# overlay-mount (mount.fuse3 helper)

HELPER_USAGE = (
    "usage: overlay-mount [SOURCE] MOUNTPOINT -o OPTS [-o OPTS ...] [-f] [--log FILE]\n"
    "       (mount -t fuse.overlay-mount SOURCE MOUNTPOINT -o lowerdir=...,upperdir=...,workdir=...)"
)


class HelperUsageError(Exception):
    """Bad command line for overlay-mount."""


class HelperArgs:
    """What overlay-mount was given."""

    def __init__(self, source, mountpoint, options, foreground=False, log_file=None, help=False):
        self.source = source
        self.mountpoint = mountpoint
        self.options = options
        self.foreground = foreground
        self.log_file = log_file
        self.help = help


def parse_helper_args(argv: Sequence[str]) -> HelperArgs:
    """Parse ``[SOURCE] MOUNTPOINT`` with ``-o OPTS`` anywhere (repeatable).

    Understands what mount.fuse3 passes (``SOURCE MOUNTPOINT -o OPTS``) as well
    as ``-o OPTS MOUNTPOINT``; ``-oOPTS`` is accepted too.  The ``-n``, ``-s``,
    ``-v`` flags mount(8) hands to some helpers are ignored.
    """
    options: list[str] = []
    positionals: list[str] = []
    foreground = False
    log_file = None
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positionals.extend(args[i:])
            break
        if arg == "-o":
            if i >= len(args):
                raise HelperUsageError("option -o needs an argument")
            options.append(args[i])
            i += 1
        elif arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg in ("-f", "--foreground"):
            foreground = True
        elif arg == "--log":
            if i >= len(args):
                raise HelperUsageError("option --log needs an argument")
            log_file = args[i]
            i += 1
        elif arg.startswith("--log="):
            log_file = arg[len("--log=") :]
        elif arg in ("-h", "--help"):
            return HelperArgs(None, "", [], help=True)
        elif arg in ("-V", "--version"):
            return HelperArgs(None, "", [], help="version")
        elif arg in ("-n", "-s", "-v"):
            continue
        elif arg.startswith("-") and arg != "-":
            raise HelperUsageError(f"unknown argument '{arg}'")
        else:
            positionals.append(arg)
    if len(positionals) == 1:
        return HelperArgs(None, positionals[0], options, foreground, log_file)
    if len(positionals) == 2:
        return HelperArgs(positionals[0], positionals[1], options, foreground, log_file)
    if not positionals:
        raise HelperUsageError("missing MOUNTPOINT")
    raise HelperUsageError(f"too many arguments: {' '.join(positionals)}")


def _apply_helper_defaults(config: MountConfig, optstring: str, source: str | None,
                           prog: str = "overlay-mount") -> None:
    """What overlay-mount adds on top of the user's options: the source as
    the fsname, and its own name as the mount's type (fuse.overlay-mount,
    what mount -t named, so findmnt -t and umount -t find it)."""
    config.subtype = prog
    if os.geteuid() == 0:
        config.default_permissions = True
    if source and not any(o.strip().startswith("fsname=") for o in split_options(optstring)):
        config.fsname = source


def containers_mount_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``overlay-containers-mount``: ``overlay-mount`` for
    containers-storage (podman, buildah as ``mount_program``), whose layers
    keep whiteouts in the OCI form (``.wh.NAME``, ``.wh..wh..opq``); it adds
    the ``oci_whiteouts`` option, since podman passes only the layer dirs."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):
        if a == "-o" and i + 1 < len(args):
            args[i + 1] = args[i + 1].rstrip(",") + ",oci_whiteouts"
            break
        if a.startswith("-o") and len(a) > 2:
            args[i] = a.rstrip(",") + ",oci_whiteouts"
            break
    else:
        args += ["-o", "oci_whiteouts"]
    return mount_helper_main(args, prog="overlay-containers-mount")


def mount_helper_main(argv: Sequence[str] | None = None, prog: str = "overlay-mount") -> int:
    """Entry point of the ``overlay-mount`` console script (mount.fuse3 helper)."""
    usage = HELPER_USAGE.replace("overlay-mount", prog)
    if prog == "overlay-containers-mount":
        usage += ("\n       (podman, buildah: mount_program; the layers' whiteouts in the OCI form,"
                  " .wh.NAME: oci_whiteouts is added)")
    try:
        args = parse_helper_args(sys.argv[1:] if argv is None else argv)
    except HelperUsageError as exc:
        print(usage, file=sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.help == "version":
        print(f"{prog} {_version()}")
        return EXIT_OK
    if args.help:
        print(usage)
        return EXIT_OK
    if args.mountpoint.startswith("/dev/fd/"):
        return _say_error(prog, "mounting on a /dev/fd/N file descriptor (drop_privileges) is not supported")
    setup_logging(logging.INFO if args.foreground else logging.WARNING, None)
    return start_mount(
        args.options,
        args.mountpoint,
        prog=prog,
        foreground=args.foreground,
        log_file=args.log_file,
        timeout=DEFAULT_READY_TIMEOUT,
        as_helper=True,
        source=args.source,
    )

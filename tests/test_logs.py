"""Where a mount logs (issue 22): --log and the log=PATH / log=syslog mount
options (so mount -t, fstab and podman can log), debug wherever the log
goes, a log that cannot be opened is a mount error, and every line of the
mount goes there (none to the terminal). The same defaults at every entry
point: allow_other as root, set-id files and devices as on the kernel
overlay, the type mount -t named. Everything mounted here is unmounted in
teardown; a /dev/log made for a test is removed."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

import mountutil
from relutil import mkdirs, overlay_cmd, overlay_env, relmounts, reltmp  # noqa: F401  (fixtures)
from test_cli import helper_on_default_path, mount_options_of  # noqa: F401  (fixture)


def _mount(opts, mp, *extra):
    return subprocess.run(overlay_cmd("mount", *extra, "-o", opts, mp), capture_output=True,
                          text=True, env=overlay_env(), stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture
def layers(reltmp, relmounts):
    lo, up, wk, mp = mkdirs(reltmp, "l", "u", "w", "m")
    relmounts.track(mp)
    return f"lowerdir={lo},upperdir={up},workdir={wk}", mp


def _log_text(path, until, timeout=10.0):
    """The log's text once it holds until (the daemon writes its last
    lines after the unmount returned)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        text = open(path).read()
        if until in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _mounted(mp):
    from overlay.mounttable import find_mount
    return find_mount(mp)


def test_log_that_cannot_be_opened_is_a_mount_error(layers):
    opts, mp = layers
    for args in (("--log", "/nonexistent/dir/log"), ()):
        o = opts + (",log=/nonexistent/dir/log" if not args else "")
        r = _mount(o, mp, *args)
        assert r.returncode == 1
        assert r.stderr.strip() == "overlay: cannot open the log '/nonexistent/dir/log': No such file or directory"
        assert _mounted(mp) is None


def test_log_option_with_debug(layers, reltmp):
    opts, mp = layers
    logf = os.path.join(reltmp, "x.log")
    r = _mount(opts + f",log={logf},debug", mp)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""
    os.listdir(mp)
    mountutil.umount(mp)
    text = _log_text(logf, "unmounted")
    assert " DEBUG: " in text and "mounted overlay on" in text and "unmounted" in text


def test_debug_background_with_log_file_writes_nothing_to_the_terminal(layers, reltmp):
    opts, mp = layers
    logf = os.path.join(reltmp, "y.log")
    r = _mount(opts, mp, "-d", "--log", logf)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""
    text = open(logf).read()
    assert "mounting MountConfig(" in text and "overlay.engine DEBUG" in text


@pytest.fixture
def fake_syslog(reltmp):
    """A syslog socket at /dev/log (journald's place) for the test, when
    this machine has none: a datagram socket the test reads."""
    if os.path.exists("/dev/log"):
        pytest.skip("/dev/log exists here: not replaced by a test")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("/dev/log")
    s.settimeout(10)
    try:
        yield s
    finally:
        s.close()
        os.unlink("/dev/log")


def _drain(s):
    out = []
    s.settimeout(0.5)
    try:
        while True:
            out.append(s.recv(65536).decode(errors="replace"))
    except TimeoutError:
        pass
    return out


def test_log_syslog_and_the_default_of_background_mounts(layers, fake_syslog):
    opts, mp = layers
    r = _mount(opts + ",log=syslog,debug", mp)
    assert r.returncode == 0, r.stderr
    mountutil.umount(mp)
    lines = _drain(fake_syslog)
    assert any("overlay[" in ln and "DEBUG" in ln for ln in lines), lines
    assert any("mounted overlay on" in ln for ln in lines)
    # without log=, a background mount logs to syslog where there is one
    r = _mount(opts, mp)
    assert r.returncode == 0, r.stderr
    mountutil.umount(mp)
    lines = _drain(fake_syslog)
    assert any("mounted overlay on" in ln for ln in lines), lines
    assert not any("DEBUG" in ln for ln in lines)


def test_log_syslog_without_a_socket_is_an_error(layers):
    if os.path.exists("/dev/log"):
        pytest.skip("this machine has a syslog socket")
    opts, mp = layers
    r = _mount(opts + ",log=syslog", mp)
    assert r.returncode == 1
    assert r.stderr.strip() == "overlay: log=syslog: no syslog socket (/dev/log) here"


def test_root_defaults_as_the_kernel_overlay(layers):
    if os.geteuid() != 0:
        pytest.skip("root's defaults")
    opts, mp = layers
    r = _mount(opts, mp)
    assert r.returncode == 0, r.stderr
    options = mount_options_of(mp).split(",")
    assert "allow_other" in options
    assert "nosuid" not in options and "nodev" not in options
    assert _mounted(mp).fstype == "fuse.overlay"
    mountutil.umount(mp)
    r = _mount(opts + ",noallow_other,nosuid,nodev", mp)
    assert r.returncode == 0, r.stderr
    options = mount_options_of(mp).split(",")
    assert "allow_other" not in options and "nosuid" in options and "nodev" in options


def test_mount_t_logs_and_keeps_its_type(layers, reltmp, helper_on_default_path):
    opts, mp = layers
    logf = os.path.join(reltmp, "z.log")
    r = subprocess.run(["mount", "-t", "fuse.overlay-mount", "src", mp, "-o", opts + f",log={logf},debug"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _mounted(mp).fstype == "fuse.overlay-mount"
    assert "allow_other" in mount_options_of(mp).split(",")
    r = subprocess.run(["findmnt", "-n", "-t", "fuse.overlay-mount", "-o", "TARGET"],
                       capture_output=True, text=True)
    assert mp in r.stdout.split()
    r = subprocess.run(overlay_cmd("list", "--json"), capture_output=True, text=True, env=overlay_env())
    assert f'"mountpoint": "{mp}"' in r.stdout
    mountutil.umount(mp)
    assert " DEBUG: " in _log_text(logf, "unmounted")

"""Tests of the pytest plugin (overlay.pytest_plugin) with pytester (tests/test_pytest_plugin.py).

Each test writes a small test module, runs pytest on it and checks the
outcome, then checks from the outside that the source tree was never written
and that nothing is left mounted or on disk:

* ``cow_dir``: writes, deletes, renames and chmods through the view; two views
  of one source are independent; a failing test still gets its view removed;
* ``overlay_mount``: the OverlayMount with its upper dir and ``diff()``;
* FUSE unusable (simulated) -> the test is skipped with the reason;
* the ``pytest11`` entry point: the fixtures are found without ``-p``.

Source trees and the ``overlay_tmpdir`` live under /tmp/eco-plugin-*.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import textwrap

import pytest

from overlay.api import fuse_unavailable_reason

pytest_plugins = ["pytester"]


def tree_digest(root):
    """Names, modes and contents of a tree, to prove it was not changed."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            h.update(f"{os.path.relpath(full, root)}:{st.st_mode:o}:{st.st_mtime_ns}\n".encode())
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def mounted_below(d):
    prefix = os.path.realpath(d).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if (line.split()[4] + "/").startswith(prefix)]


@pytest.fixture
def source():
    """/tmp/eco-plugin-*/src (a small read-only fixture tree) and .../tmp."""
    d = tempfile.mkdtemp(prefix="eco-plugin-", dir="/tmp")
    src = os.path.join(d, "src")
    os.makedirs(os.path.join(src, "data", "sub"))
    for rel, text in {"data/a.txt": "alpha\n", "data/sub/b.txt": "beta\n", "README": "r\n"}.items():
        with open(os.path.join(src, rel), "w") as fh:
            fh.write(text)
    os.chmod(src, 0o555)  # read-only for good measure
    digest = tree_digest(src)
    yield d, src
    assert tree_digest(src) == digest, "the source tree was modified"
    assert mounted_below(d) == []
    tmp = os.path.join(d, "tmp")
    if os.path.isdir(tmp):
        assert os.listdir(tmp) == [], "temporary mount points / upper dirs left behind"
    os.chmod(src, 0o755)
    shutil.rmtree(d)


@pytest.fixture
def need_fuse():
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE not usable: {reason}")


def run_inner(pytester, monkeypatch, d, code, *args):
    """Run pytest on ``code`` with the plugin loaded explicitly (no autoload)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makeini(f"[pytest]\noverlay_tmpdir = {d}/tmp\n")
    pytester.makepyfile(test_inner=textwrap.dedent(code))
    return pytester.runpytest("-p", "overlay.pytest_plugin", "-rs", "-v", *args)


def test_cow_dir_writes_never_reach_the_source(pytester, monkeypatch, source, need_fuse):
    d, src = source
    result = run_inner(
        pytester,
        monkeypatch,
        d,
        f"""
        import os
        SRC = {src!r}

        def test_change_everything(cow_dir):
            tree = cow_dir(SRC)
            assert sorted(os.listdir(tree)) == ["README", "data"]
            (tree / "data" / "a.txt").write_text("changed\\n")
            (tree / "data" / "sub" / "b.txt").unlink()
            (tree / "data" / "sub").rename(tree / "moved")
            (tree / "new.bin").write_bytes(b"x" * 100000)
            os.chmod(tree / "README", 0o600)
            assert (tree / "data" / "a.txt").read_text() == "changed\\n"
            assert sorted(os.listdir(tree)) == ["README", "data", "moved", "new.bin"]
            assert os.listdir(tree / "moved") == []

        def test_views_are_independent(cow_dir):
            one, two = cow_dir(SRC), cow_dir(SRC)
            assert one != two
            (one / "README").write_text("one\\n")
            assert (two / "README").read_text() == "r\\n"
            assert (one / "data" / "a.txt").read_text() == "alpha\\n"

        def test_fresh_view_each_test(cow_dir):
            tree = cow_dir(SRC)
            assert (tree / "data" / "a.txt").read_text() == "alpha\\n"
            assert not (tree / "new.bin").exists()

        def test_failing_test_still_cleans_up(cow_dir):
            tree = cow_dir(SRC)
            (tree / "README").write_text("doomed\\n")
            assert False, "deliberate failure"
        """,
    )
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*deliberate failure*"])


def test_overlay_mount_fixture(pytester, monkeypatch, source, need_fuse):
    d, src = source
    result = run_inner(
        pytester,
        monkeypatch,
        d,
        f"""
        import os
        import overlay

        def test_upper_and_diff(overlay_mount):
            m = overlay_mount({src!r}, redirect_dir="on")
            assert isinstance(m, overlay.OverlayMount) and m.mounted
            os.remove(m.path / "README")
            (m.path / "data" / "new").write_text("n")
            assert sorted(os.listdir(m.upper)) == ["README", "data"]
            assert [str(c) for c in m.diff()] == ["D /README", "C /data", "A /data/new"]
            assert os.fspath(m) == str(m.path)
        """,
    )
    result.assert_outcomes(passed=1)


def test_skips_without_fuse(pytester, monkeypatch, source):
    d, src = source
    import overlay.pytest_plugin as plugin

    # pytester runs in this process: patch through monkeypatch, which puts the
    # function back afterwards (a patch from an inner conftest would leak
    # into the tests that follow)
    monkeypatch.setattr(plugin, "fuse_unavailable_reason", lambda: "no /dev/fuse (simulated)")
    result = run_inner(
        pytester,
        monkeypatch,
        d,
        f"""
        def test_needs_a_view(cow_dir):
            cow_dir({src!r})
            raise AssertionError("not reached")
        """,
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*overlay: FUSE is not usable here: no /dev/fuse (simulated)*"])


def test_bad_source_is_an_error(pytester, monkeypatch, source, need_fuse):
    d, src = source
    result = run_inner(
        pytester,
        monkeypatch,
        d,
        f"""
        import pytest

        def test_missing(cow_dir):
            with pytest.raises(NotADirectoryError, match="is not a directory"):
                cow_dir({src!r} + "/nope")
        """,
    )
    result.assert_outcomes(passed=1)


def test_entry_point_registers_the_fixtures(pytester, source, need_fuse):
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    if names.get("overlay") != "overlay.pytest_plugin":
        pytest.skip(
            "the installed overlay-fuse metadata has no pytest11 entry point yet "
            "(reinstall: ./run test, or pip install -e .)"
        )
    d, src = source
    pytester.makeini(f"[pytest]\noverlay_tmpdir = {d}/tmp\n")
    pytester.makepyfile(
        test_auto=f"""
        def test_auto(cow_dir):
            tree = cow_dir({src!r})
            (tree / "x").write_text("x")
        """
    )
    result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=1)

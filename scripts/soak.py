#!/usr/bin/env python3
"""Long reliability runs (scripts/soak.py): the CI tests of tests/test_stress.py
and tests/test_reliability.py, for as long as asked.

    sudo .venv/bin/python scripts/soak.py --minutes 60
    sudo .venv/bin/python scripts/soak.py --minutes 10 --only fsx
    SOAK_MINUTES=120 sudo .venv/bin/python scripts/soak.py

What it runs, in a loop until the time is up (each part can be chosen with
``--only``, several times):

* ``memory``: once, at the start: 1,000,000 lookups and opens (``--mem-ops``)
  over a 20,000-file tree from 2 processes, mount option ``timeout=0`` so
  every lookup reaches the daemon; prints the daemon's RSS after the tree
  was visited once, after 20% of the operations and at the end, and its peak
  (VmHWM); fails if the peak exceeds 400 MiB or RSS keeps growing.
* ``fsx``: the fsx-like stress (4 processes, model checked after every
  operation, then the kernel overlay over our upper) in rounds of
  ``--fsx-minutes`` (default 5), alternating the default mount options and
  ``workers=4,timeout=0``; every round on fresh layers and a new seed.
* ``kill``: kill -9 of the daemon at random moments while writers copy up,
  rename and delete (with and without ``volatile``), then remount and check
  nothing is partial or temporary; and every 10th round the kill in the
  middle of a 1 GiB copy-up (``--big-mib``).

Runs as root (mounts). Scratch dirs are /tmp/rel-soak-*; everything mounted
is unmounted and every daemon started is stopped, also on Ctrl-C.  Exit
status 0 when every round passed; the first failure stops the run (the seed
is printed, ``--seed`` replays an fsx round), unless ``--keep-going``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
sys.path.insert(0, TESTS)

import mountutil  # noqa: E402
import relutil  # noqa: E402
import test_reliability as rel  # noqa: E402
import test_stress as stress  # noqa: E402


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def run_part(name, fn, failures, keep_going):
    base = relutil.rel_tmpdir("soak")
    daemons = []
    t0 = time.monotonic()
    try:
        with mountutil.MountTracker() as tracker:
            try:
                result = fn(base, tracker, daemons)
            finally:
                for d in reversed(daemons):
                    d.stop()
        log(f"{name}: ok ({time.monotonic() - t0:.0f}s) {json.dumps(result, default=str)}")
        relutil.rel_cleanup(base)
        return True
    except Exception:  # noqa: BLE001
        failures.append(name)
        log(f"{name}: FAILED (scratch dir kept: {base})\n{traceback.format_exc()}")
        if not keep_going:
            raise SystemExit(1)
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "30")),
                    help="how long to run (default 30, or $SOAK_MINUTES)")
    ap.add_argument("--only", action="append", choices=["memory", "fsx", "kill"],
                    help="run only these parts (repeatable)")
    ap.add_argument("--mem-ops", type=int, default=1_000_000)
    ap.add_argument("--mem-files", type=int, default=20_000)
    ap.add_argument("--fsx-minutes", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=4, help="fsx processes")
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=None, help="fsx seed of the first round")
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first failure")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak.py: needs root (it mounts filesystems)", file=sys.stderr)
        return 2
    parts = set(args.only or ["memory", "fsx", "kill"])
    deadline = time.monotonic() + args.minutes * 60
    failures: list[str] = []
    totals = {"fsx_rounds": 0, "fsx_ops": 0, "kill_rounds": 0, "big_kills": 0}
    rnd = random.Random(args.seed)

    if "memory" in parts:
        def memory(base, tracker, daemons):
            f = stress.run_memory(base, args.mem_ops, daemons, log=log, nfiles=args.mem_files)
            stress.check_memory(f)
            return f
        run_part("memory", memory, failures, args.keep_going)

    round_no = 0
    while time.monotonic() < deadline and parts & {"fsx", "kill"}:
        round_no += 1
        if "fsx" in parts:
            opts = () if round_no % 2 else ("workers=4", "timeout=0")
            seed = args.seed if (args.seed is not None and round_no == 1) else rnd.randrange(1 << 30)
            minutes = min(args.fsx_minutes, max(0.25, (deadline - time.monotonic()) / 60))

            def fsx(base, tracker, daemons, opts=opts, seed=seed, minutes=minutes):
                f = stress.run_fsx(base, minutes * 60, nworkers=args.workers, opts=opts, seed=seed,
                                   tracker=tracker, log=log)
                totals["fsx_ops"] += f["ops"]
                return {k: v for k, v in f.items() if k != "counts"}
            if run_part(f"fsx round {round_no} {opts or 'defaults'} seed={seed}", fsx, failures,
                        args.keep_going):
                totals["fsx_rounds"] += 1
        if "kill" in parts and time.monotonic() < deadline:
            for volatile in (False, True):
                def kill(base, tracker, daemons, volatile=volatile):
                    return rel._torture_round(base, rnd, 3, 24, 20, tracker, daemons, volatile=volatile)
                if run_part(f"kill round {round_no} volatile={volatile}", kill, failures, args.keep_going):
                    totals["kill_rounds"] += 1
            if round_no % 10 == 1:
                def big(base, tracker, daemons):
                    return rel.kill9_during_big_copy_up(base, tracker, daemons, args.big_mib)
                if run_part(f"kill -9 during a {args.big_mib} MiB copy-up", big, failures, args.keep_going):
                    totals["big_kills"] += 1
    log(f"done: {json.dumps(totals)}; failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

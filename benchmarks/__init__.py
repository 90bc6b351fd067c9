"""Benchmarks of the overlay filesystem.

* ``benchmarks/test_micro_core.py``: pytest-benchmark micro-benchmarks of the
  Cython core (``overlay_core.Overlay``), no mount.
* ``benchmarks/test_macro_mounted.py``: pytest-benchmark macro-benchmarks on
  real mounts of the kernel overlay, fuse-overlayfs and ours.
* ``python -m benchmarks.compare``: the comparison runner (all three systems,
  interleaved, medians, ratios, targets; Markdown, JSON and a PNG chart under
  ``benchmarks/results/``).

None of this runs in the normal test run (``./run test`` only collects
``tests/``); see the "Benchmarks" section of README.md.
"""

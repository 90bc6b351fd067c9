"""Differential test harness: compares the kernel overlayfs with ours.

Modules:

* ``layers``: declarative layer-stack specs, a seeded random stack
  generator and ``build_stack`` which materialises a spec on disk.
* ``ops``: filesystem operations (as plain tuples), a seeded random op
  generator and an interpreter that applies an op below a mount point and
  returns a comparable result.
* ``snapshot``: whole-tree snapshots of a mount or of an upper dir
  (normalised) and a readable diff between two snapshots.
* ``pair``: ``DiffPair`` builds the same stack twice, mounts the kernel
  overlay on one copy and ours on the other, applies ops to both, compares
  everything and runs the unmount/remount checks;
* ``tolerate``: opt-in masks for known differences (``DIFF_TOLERATE``).
"""

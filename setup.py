"""Build script: compiles the Cython core (src/overlay_core) into one extension module.

Everything else (metadata, entry points) lives in pyproject.toml.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

annotate = bool(os.environ.get("OVERLAY_CYTHON_ANNOTATE"))
# the modules are translated and compiled side by side (the core alone
# takes most of a minute to compile; the others fit beside it)
jobs = max(1, min(4, len(os.sched_getaffinity(0))))

extensions = [
    Extension(
        "overlay_core._core",
        ["src/overlay_core/_core.pyx"],
        extra_compile_args=["-O2", "-D_GNU_SOURCE", "-Wno-unused-function"],
    ),
    Extension(
        "overlay.engine.wire",
        ["src/overlay/engine/wire.pyx"],
        extra_compile_args=["-O2", "-D_GNU_SOURCE", "-Wno-unused-function"],
    ),
    Extension(
        "overlay.engine.bridge",
        ["src/overlay/engine/bridge.pyx"],
        extra_compile_args=["-O2", "-D_GNU_SOURCE", "-Wno-unused-function"],
    ),
    Extension(
        "overlay._fuseattr",
        ["src/overlay/_fuseattr.pyx"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=annotate,
        compiler_directives={"embedsignature": True},
        include_path=["src"],
        nthreads=jobs if jobs > 1 else 0,
    ),
    options={"build_ext": {"parallel": jobs}},
)

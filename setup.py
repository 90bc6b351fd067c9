"""Build script: compiles the Cython core (src/overlay_core) into one extension module.

Everything else (metadata, entry points) lives in pyproject.toml.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

annotate = bool(os.environ.get("OVERLAY_CYTHON_ANNOTATE"))

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
    ),
)

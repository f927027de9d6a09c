"""Builds the optional C extensions of ``subspectral.pipeline``; everything else is pyproject.toml.

``_splitjpeg`` links the system libjpeg-turbo (Debian: libjpeg62-turbo-dev). Where that or a C compiler
is missing the build is skipped with a warning, and the pipeline encodes through simplejpeg instead:
the same bytes, 7–13 % slower per image (BENCHMARKS.md). ``_keyhash`` (BLAKE2b of the planner's keys)
needs only a C compiler; without it the planner hashes through hashlib: the same numbers, slower, and
with a Python object per input (BENCHMARKS.md, "Prepare at ImageNet-21K scale").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("subspectral.pipeline._splitjpeg", ["pipeline/_splitjpeg.c"], libraries=["jpeg"], optional=True),
        Extension("subspectral.pipeline._keyhash", ["pipeline/_keyhash.c"], optional=True),
    ]
)

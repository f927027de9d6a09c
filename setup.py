"""Builds the optional C extension ``subspectral.pipeline._splitjpeg``; everything else is pyproject.toml.

It links the system libjpeg-turbo (Debian: libjpeg62-turbo-dev). Where that or a C compiler is
missing the build is skipped with a warning, and the pipeline encodes through simplejpeg instead:
the same bytes, 7–13 % slower per image (BENCHMARKS.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("subspectral.pipeline._splitjpeg", ["pipeline/_splitjpeg.c"], libraries=["jpeg"], optional=True),
    ]
)

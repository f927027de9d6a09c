"""Why an input was not written: the ``reason`` of rejects.parquet and manifest.parquet (docs/format.md)."""

from __future__ import annotations

from enum import Enum


class RejectReason(str, Enum):
    """Every reject reason the pipeline records; tables and the card hold the ``value`` strings."""

    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    CORRUPT_TAR = "corrupt_tar"
    UNSAFE_TAR_MEMBER = "unsafe_tar_member"
    STRAY_FILE = "stray_file"
    EMPTY_CLASS = "empty_class"
    BELOW_MIN_PER_CLASS = "below_min_per_class"
    SYMLINK_LOOP = "symlink_loop"
    OUTSIDE_SOURCE = "outside_source"
    DANGLING_LINK = "dangling_link"
    NOT_A_FILE = "not_a_file"
    DUPLICATE_INPUT = "duplicate_input"
    NO_LABEL = "no_label"

    def __str__(self) -> str:  # the table value, also in f-strings on every Python version
        return self.value

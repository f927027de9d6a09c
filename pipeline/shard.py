"""One unit of work: shard j of one split, written to all N sub-datasets. No scheduling here.

Reads the plan's rows for the shard in order (members of one source tar that lie together are
fetched by one read, ``reader``); each image is decoded, resized, split and encoded N times; its
members (``KEY.cls`` and the image, plus ``KEY.json`` with ``--sample-json``) go to the N tar
streams. An input that fails is recorded and left out of all N shards alike, so they stay aligned.
Completion order: the N tars are renamed into place, then the shard's status table, then its stats
file — the marker a rerun checks.
"""

from __future__ import annotations

import functools
import io
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from subspectral.schemas import bands
from subspectral.schemas.card import shard_file, shard_name, sub_dataset_names
from subspectral.schemas.reasons import RejectReason
from subspectral.schemas.tables import STATUS_SCHEMA

from . import decompose, encode, resize
from .decode import RejectedInput, SizeLimits, decode_image
from .reader import SourceReader
from .storage import Location, atomic_output, write_bytes, write_json
from .tarwriter import BLOCK, MemberHeader, TarShardWriter, member_bytes, padding

STAGES = ("read", "decode", "resize", "decompose", "encode", "write")


@dataclass(frozen=True)
class SampleSpec:
    """Everything about a sample's pixels and encoding: the options that change output bytes."""

    split: int = 36
    size: int = 56
    resize_mode: str = "center-crop"
    transform: str = "none"
    image_format: str = "jpg"
    quality: int = 95
    limits: SizeLimits | None = None  # None: SizeLimits.for_side(image_size)
    sample_json: bool = False  # also write KEY.json (class, source, original size) beside each image

    def __post_init__(self) -> None:
        if self.limits is None:
            object.__setattr__(self, "limits", SizeLimits.for_side(self.image_size))

    @property
    def grid(self) -> int:
        return decompose.grid_factor(self.split)

    @property
    def image_size(self) -> int:
        return self.grid * self.size

    @property
    def sample_dtype(self) -> np.dtype:
        """What a decoded sample holds: uint8 pixels, or the integer type ``dct_forward`` stores the bands in."""
        return decompose.dct_quantisation(self.split)[1] if self.transform == "dct" else np.dtype(np.uint8)


@dataclass(frozen=True)
class ShardTask:
    out: Location
    split: str  # "train" | "val"
    shard: int
    rows: pa.Table  # PLAN_SCHEMA rows of this shard, in position order
    spec: SampleSpec


def stats_location(out: Location, split: str, shard: int) -> Location:
    return out.join("stats", shard_name(split, shard) + ".json")


def status_location(out: Location, split: str, shard: int) -> Location:
    return out.join("_work", "status", shard_name(split, shard) + ".parquet")


class SampleEncoder:
    """Bytes of one image → its N encoded sub-images and original size; keeps per-stage timings."""

    def __init__(self, spec: SampleSpec) -> None:
        self.spec = spec
        self._encode = encode.encoder(spec.image_format, spec.quality) if spec.image_format != bands.EXTENSION else None
        # Split and encode in one C call where it can: same bytes, less time (timed as "encode").
        use_split = spec.image_format == "jpg" and spec.transform == "none"
        self._split_encode = encode.split_jpeg_encoder(spec.quality) if use_split else None
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._scratch = bytearray()  # the decoder's output buffer, reused image after image
        self._minimum = functools.partial(resize.decoded_minimum, size=spec.image_size, mode=spec.resize_mode)

    def square(self, data: bytes) -> tuple[np.ndarray, int, int]:
        """Decode and resize: the S×S pixels (RGBX for JPEG, else RGB) and the original width and height."""
        image, width, height = self._square_image(data)
        return resize.pixels(image), width, height

    def _square_image(self, data: bytes) -> tuple[Image.Image, int, int]:
        clock = time.perf_counter
        start = clock()
        decoded = decode_image(data, self._minimum, self.spec.limits, self._scratch)
        decoded_at = clock()
        image = resize.resize_image(decoded.image, self.spec.image_size, self.spec.resize_mode)
        self.seconds["decode"] += decoded_at - start
        self.seconds["resize"] += clock() - decoded_at
        return image, decoded.width, decoded.height

    def __call__(self, data: bytes) -> tuple[list[bytes], int, int]:
        image, width, height = self._square_image(data)
        clock = time.perf_counter
        start = clock()
        if self._split_encode is not None:  # reads the Pillow image in place
            encoded = self._split_encode(image, self.spec.grid)
            self.seconds["encode"] += clock() - start
            return encoded, width, height
        square = resize.pixels(image)
        parts = decompose.decompose(square, self.spec.grid)
        if self.spec.transform == "dct":
            parts = decompose.dct_forward(parts[..., :3])
        split_at = clock()
        if self.spec.image_format == bands.EXTENSION:  # all N bands in one pass
            encoded = bands.encode_bands(parts)
        else:
            encoded = [self._encode(part) for part in parts]
        self.seconds["decompose"] += split_at - start
        self.seconds["encode"] += clock() - split_at
        return encoded, width, height


def sample_member_bytes(spec: SampleSpec, row: dict, image: bytes, width: int, height: int) -> int:
    """Bytes one sample takes in one sub-dataset's tar: each member's header, data and padding."""
    members = [_label_member(row), image] + ([_meta_member(row, width, height)] if spec.sample_json else [])
    return sum(BLOCK + len(data) + len(padding(len(data))) for data in members)


def _label_member(row: dict) -> bytes:
    return str(row["label"]).encode()


def _meta_member(row: dict, width: int, height: int) -> bytes:
    source = f"{row['source']}#{row['member']}" if row["member"] else row["source"]
    return json.dumps({"class": row["class"], "height": height, "src": source, "width": width}, sort_keys=True).encode()


def write_shard(task: ShardTask) -> dict:
    """Write shard ``task.shard`` of ``task.split`` to all N sub-datasets; returns its stats."""
    spec = task.spec
    extension = spec.image_format
    names = sub_dataset_names(spec.split)
    tar_name = shard_file(task.split, task.shard)
    sample_encoder = SampleEncoder(spec)
    reader = SourceReader(spec.limits.max_file_bytes)
    status: dict[str, list] = {name: [] for name in STATUS_SCHEMA.names}
    rows = task.rows.select(["key", "label", "class", "source", "member", "offset", "size"]).to_pylist()
    reader.expect([(row["source"], row["offset"], row["size"]) for row in rows])
    clock = time.perf_counter
    # Members in sorted name order, as webdataset's TarWriter writes them: KEY.cls first, then the image and
    # KEY.json in the order of their extensions.
    image_first = extension < "json"
    # Val shards are what ensemble-eval pairs across sub-datasets, so it checks them against their digests;
    # hashing costs ~7 % of a shard's CPU (bench/bench_shard_digest.py), which train shards do not pay.
    hashed = task.split == "val"
    with ExitStack() as stack:
        writers = [
            TarShardWriter(stack.enter_context(atomic_output(task.out.join(name, tar_name))), hashed)
            for name in names
        ]
        for row in rows:
            key = row["key"]
            start = clock()
            try:
                data = reader.read(row["source"], row["offset"], row["size"])
            except RejectedInput as error:  # not a file, or too large: never read
                _record(status, key, error.reason, error.detail)
                continue
            except OSError as error:
                _record(status, key, RejectReason.UNREADABLE, str(error))
                continue
            sample_encoder.seconds["read"] += clock() - start
            try:
                images, width, height = sample_encoder(data)
            except RejectedInput as error:
                _record(status, key, error.reason, error.detail)
                continue
            write_start = clock()
            label = member_bytes(f"{key}.cls", _label_member(row))
            meta = member_bytes(f"{key}.json", _meta_member(row, width, height)) if spec.sample_json else b""
            # The image's header differs between sub-datasets only in its size field.
            headers = MemberHeader(f"{key}.{extension}").many([len(image) for image in images])
            for k, (writer, image) in enumerate(zip(writers, images, strict=True)):
                image_parts = (headers[k * BLOCK : (k + 1) * BLOCK], image, padding(len(image)))
                if image_first:
                    writer.write_parts(label, *image_parts, meta)
                else:
                    writer.write_parts(label, meta, *image_parts)
            sample_encoder.seconds["write"] += clock() - write_start
            _record(status, key, None, None, width, height)
        for writer in writers:
            writer.finish()
    reader.close()
    written = sum(1 for s in status["status"] if s == "written")
    status_table = pa.table(status, schema=STATUS_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(status_table, buffer)
    write_bytes(status_location(task.out, task.split, task.shard), buffer.getvalue())
    stats = {
        "split": task.split,
        "shard": task.shard,
        "samples": written,
        "rejected": len(rows) - written,
        "bytes": [writer.bytes_written for writer in writers],
        "requests": reader.reads + reader.opens,
        "sha256": [writer.sha256 for writer in writers] if hashed else None,
    }
    write_json(stats_location(task.out, task.split, task.shard), stats)
    return {**stats, "seconds": sample_encoder.seconds}


def _record(status: dict[str, list], key: str, reason: RejectReason | None, detail: str | None,
            width: int | None = None, height: int | None = None) -> None:
    status["key"].append(key)
    status["status"].append("rejected" if reason else "written")
    status["reason"].append(reason.value if reason else None)
    status["detail"].append(detail)
    status["width"].append(width)
    status["height"].append(height)

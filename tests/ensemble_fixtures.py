"""Small prepared datasets and run folders in the exact on-disk formats (docs/format.md, run layout),
for the ensemble tests. Shards are written with ``tarfile`` so the tests do not depend on ``cli.py
prepare``; the card, shard table and run records through the contract's own types (``subspectral.schemas``)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import subspectral.schemas as schemas
from subspectral.schemas.card import ByteCounts, Counts, Source, SplitSummary


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    tar.addfile(info, io.BytesIO(payload))


def write_shard(path: Path, keys: Sequence[str], labels: Sequence[int], images: Sequence[np.ndarray]) -> None:
    """One shard: KEY.cls, KEY.npy, KEY.json per sample, adjacent, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, label, image in zip(keys, labels, images, strict=True):
            _add(tar, f"{key}.cls", str(int(label)).encode())
            _add(tar, f"{key}.npy", npy_bytes(image))
            meta = {"class": f"c{label}", "src": f"file:///{key}.png", "width": 64, "height": 64}
            _add(tar, f"{key}.json", json.dumps(meta).encode())


def class_table_sha256(num_classes: int) -> str:
    return schemas.class_table_sha256(f"c{i}" for i in range(num_classes))


def make_dataset(
    root: Path, images: np.ndarray, labels: Sequence[int], num_classes: int, shard_size: int = 3
) -> dict:
    """``images[k, i]`` is sub-image k of val sample i (npy, any HWC shape); returns the card (dataset.json).

    Writes dataset.json and shards.parquet as ``cli.py prepare`` does: the card validates and the
    shards' digests are those of the tars written here."""
    num_subs, num_samples = images.shape[:2]
    names = schemas.sub_dataset_names(num_subs)
    keys = [f"img_{i:04d}" for i in range(num_samples)]
    starts = list(range(0, num_samples, shard_size))
    tables = []
    for j, start in enumerate(starts):
        part = slice(start, start + shard_size)
        for k, name in enumerate(names):
            write_shard(root / name / schemas.shard_file("val", j), keys[part], labels[part], images[k, part])
        paths = [root / name / schemas.shard_file("val", j) for name in names]
        tables.append(schemas.shards_table("val", j, len(keys[part]), [p.stat().st_size for p in paths],
                                           [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]))
    shards = pa.concat_tables(tables)
    pq.write_table(shards, root / "shards.parquet")
    val_files = [schemas.shard_file("val", j) for j in range(len(starts))]
    digests = shards.to_pylist()
    size = int(images.shape[2])
    card = schemas.DatasetCard(
        tool_version="test", split=num_subs, grid=int(round(num_subs**0.5)), size=size,
        image_size=int(round(num_subs**0.5)) * size, sample_shape=(size, size, 3),
        sample_dtype=images.dtype.name, resize_mode="center-crop", transform="none", dct_scale=None, format="npy",
        quality=95, seed=0, shard_size=shard_size, val_per_class=0, min_per_class=0, min_side=1, max_pixels=1 << 30,
        max_file_bytes=1 << 28,
        num_classes=num_classes, class_table_sha256=class_table_sha256(num_classes), sub_datasets=tuple(names),
        splits={
            "train": SplitSummary(0, 0),
            "val": SplitSummary(len(starts), num_samples, tuple(
                schemas.listing_sha256(val_files, [r["sha256"] for r in digests if r["sub_dataset"] == k])
                for k in range(num_subs))),
        },
        counts=Counts(num_samples, num_samples, 0, {}),
        bytes=ByteCounts(int(sum(shards.column("bytes").to_pylist())),
                         tuple(sum(r["bytes"] for r in digests if r["sub_dataset"] == k) for k in range(num_subs)),
                         0.0),
        source=Source((str(root),), "imagefolder"), pil="test",
    )
    document = card.to_json()
    (root / "dataset.json").write_text(json.dumps(document))
    return document


def make_run(runs: Path, card: dict, shard: int, top1: float, backend: str, data: str, **extra) -> Path:
    """RUNS/sub-KK with run.json (the record of a member trained on ``card``) and final.json; ``extra``
    overrides run.json fields."""
    path = runs / card["sub_datasets"][shard]
    path.mkdir(parents=True, exist_ok=True)
    spec = schemas.ModelSpec(name="resnet18", stem="imagenet", head="linear", ebv_dim=None, ebv_tau=0.07, ebv_seed=42,
                             ebv_threshold=0.002, input=schemas.InputConstants(1 / 255, (0.5,) * 3, (0.5,) * 3))
    record = schemas.RunRecord.for_member(schemas.DatasetCard.from_json(card), shard, data, backend=backend,
                                          recipe="fixture", model=spec)
    (path / "run.json").write_text(json.dumps({**record.to_json(), **extra}))
    (path / "final.json").write_text(json.dumps({"top1": top1, "top5": 1.0}))
    return path


def make_torch_run(
    runs: Path, card: dict, shard: int, top1: float, data: str, *, name: str = "resnet18",
    stem: str = "imagenet", head: str = "linear", seed: int = 0,
) -> Path:
    """A torch member in the trainer's exact run layout, with deterministic random weights:
    run.json, final.json, final.pt ({"model", "meta"}) and, for EBV heads, ebv_basis.safetensors."""
    import torch
    from subspectral.train.checkpoint import save_basis
    from subspectral.train.models import create_model

    num_classes = int(card["num_classes"])
    generator = torch.Generator().manual_seed(1000 * seed + shard)
    basis = torch.nn.functional.normalize(torch.randn(num_classes, num_classes, generator=generator), dim=1)
    spec = {
        "name": name, "stem": stem, "head": head, "ebv_dim": num_classes if head == "ebv" else None,
        "ebv_tau": 0.07, "ebv_seed": 42, "ebv_threshold": 0.002,
        "input": {"scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    torch.manual_seed(1000 * seed + shard)
    model = create_model(name, num_classes, stem=stem, head=head, ebv_dim=spec["ebv_dim"],
                         ebv_basis=basis if head == "ebv" else None)
    path = make_run(runs, card, shard, top1, backend="torch", data=data, model=spec)
    meta = json.loads((path / "run.json").read_text())
    torch.save({"model": model.state_dict(), "meta": meta}, path / "final.pt")
    save_basis(path, model)
    return path

"""prepare reads from and writes to object storage: a real S3 endpoint (moto server) on loopback, with a
request counter (the server's own log) for the request budgets of issue 10."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import S3_CREDENTIALS, run_cli, s3_client
from corpora import GOOD_PER_CLASS, image_folder, jpeg
from subspectral.pipeline.listing import ListingUnit, list_unit

STREAM_BLOCK = 64 * 2**20  # the budget: one request per 64 MB streamed

pytest.importorskip("boto3")
pytest.importorskip("moto")

def test_prepare_from_s3_to_s3(s3_endpoint, tmp_path):
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="corpus")
    client.create_bucket(Bucket="work")
    root = image_folder(tmp_path / "corpus")
    for path in sorted(root.rglob("*.JPEG")):
        client.put_object(Bucket="corpus", Key=f"in/{path.relative_to(root)}", Body=path.read_bytes())

    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    args = ("prepare", "--src", "s3://corpus/in", "--out", "s3://work/sub4", "--split", "4", "--size", "24",
            "--shard-size", "8", "--num-workers", "2", "--sample-json")
    result = run_cli(*args, env=env)
    assert "18 written + 0 rejected = 18 inputs" in result.stdout

    card = json.loads(client.get_object(Bucket="work", Key="sub4/dataset.json")["Body"].read())
    assert card["splits"]["train"] == {"shards": 3, "samples": 3 * GOOD_PER_CLASS}
    keys = {obj["Key"] for obj in client.list_objects_v2(Bucket="work", Prefix="sub4/")["Contents"]}
    assert not any(".partial" in k for k in keys)
    for table in ("manifest.parquet", "rejects.parquet", "classes.parquet"):
        assert f"sub4/{table}" in keys
    order = None
    for k in range(4):
        body = client.get_object(Bucket="work", Key=f"sub4/sub-{k:02d}/train-000001.tar")["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as archive:
            names = archive.getnames()
            meta = json.loads(archive.extractfile(names[2]).read())
        assert len(names) == 3 * 8
        order = order or [n.split(".")[0] for n in names]
        assert [n.split(".")[0] for n in names] == order
    assert meta["src"].startswith("s3://corpus/in/n00")

    again = run_cli(*args, env=env)
    assert "already complete" in again.stdout


# ---- request budgets on object storage (issue 10): counted by the server itself ------------------------

MEMBERS_PER_TAR = 40


def upload_class_tars(client, bucket: str, root: Path) -> dict[str, int]:
    """Three class tars of MEMBERS_PER_TAR small JPEGs each, uploaded; returns tar key → size."""
    client.create_bucket(Bucket=bucket)
    sizes = {}
    for c, name in enumerate(("n001", "n002", "n003")):
        path = root / f"{name}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(MEMBERS_PER_TAR):
                data = jpeg(1000 * c + i, 48, 40)
                info = tarfile.TarInfo(f"{name}_{i}.JPEG")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        client.put_object(Bucket=bucket, Key=f"tars/{name}.tar", Body=path.read_bytes())
        sizes[f"/{bucket}/tars/{name}.tar"] = path.stat().st_size
    return sizes


def per_object(requests: list[tuple[str, str]]) -> Counter:
    return Counter(path for method, path in requests if method in ("GET", "HEAD") and path.endswith(".tar"))


def test_listing_a_class_tar_costs_one_request_to_open_and_one_per_64_mb(s3_request_log, tmp_path, monkeypatch):
    """Before: two ranged GETs per member (1,401 for a 700-member tar)."""
    sizes = upload_class_tars(s3_client(s3_request_log.url), "listing", tmp_path)
    for name, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_request_log.url}.items():
        monkeypatch.setenv(name, value)
    s3_request_log.mark()
    for key in sizes:
        listed = list_unit(ListingUnit("tar", f"s3:/{key}", key.rsplit("/", 1)[1][:-4], None))
        assert listed.inputs.num_rows == MEMBERS_PER_TAR
    counted = per_object(s3_request_log.since_mark())
    assert counted == {key: 1 + math.ceil(size / STREAM_BLOCK) for key, size in sizes.items()}


def test_prepare_reads_each_run_of_members_with_one_request(s3_request_log, tmp_path):
    """A shard holding whole class tars: each tar costs one request to open and one read (before: one per member),
    on top of its listing's two and the space estimate's two; the summary reports the shard's reads per image."""
    sizes = upload_class_tars(s3_client(s3_request_log.url), "reads", tmp_path)
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_request_log.url}
    s3_request_log.mark()
    result = run_cli("prepare", "--src", "s3://reads/tars", "--out", str(tmp_path / "out"), "--split", "4",
                     "--size", "16", "--shard-size", "1000", "--executor", "serial", env=env)
    images = 3 * MEMBERS_PER_TAR
    assert f"{images} written + 0 rejected" in result.stdout
    # listing: open + one GET; the space check on a local --out, which encodes a few planned images: open + one
    # GET; the shard: open + one GET
    expected = {key: 2 + 2 + 2 for key in sizes}
    expected["/reads/tars/n001.tar"] += 2  # the look into the first tar that tells class tars from WebDataset shards
    assert per_object(s3_request_log.since_mark()) == expected
    assert f"reads: 6 requests for {images} images (0.05 per image)" in result.stdout

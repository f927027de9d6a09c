"""prepare reads from and writes to object storage: a real S3 endpoint (moto server) on loopback."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from conftest import S3_CREDENTIALS, run_cli, s3_client
from corpora import GOOD_PER_CLASS, image_folder

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

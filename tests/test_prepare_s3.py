"""prepare reads from and writes to object storage: a real S3 endpoint (moto server) on loopback."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import run_cli
from corpora import GOOD_PER_CLASS, image_folder

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


def test_prepare_from_s3_to_s3(s3_endpoint, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="corpus")
    client.create_bucket(Bucket="work")
    root = image_folder(tmp_path / "corpus")
    for path in sorted(root.rglob("*.JPEG")):
        client.put_object(Bucket="corpus", Key=f"in/{path.relative_to(root)}", Body=path.read_bytes())

    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    args = ("prepare", "--src", "s3://corpus/in", "--out", "s3://work/sub4", "--split", "4", "--size", "24",
            "--shard-size", "8", "--num-workers", "2")
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

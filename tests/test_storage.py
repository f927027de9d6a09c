"""pipeline.storage: local paths are paths, atomic writes clean up on a full disk, object stores time out."""

from __future__ import annotations

import errno

import pytest
from conftest import S3_CREDENTIALS, call_within, mounted_tmpfs
from subspectral.pipeline import storage
from subspectral.pipeline.storage import Location, atomic_output, location


def test_a_local_path_with_question_marks_is_a_path(tmp_path):
    out = location(tmp_path / "oq?x=1")
    assert out.uri == str(tmp_path / "oq?x=1")
    card = out.join("sub?dup", "dataset.json")
    assert card.uri == str(tmp_path / "oq?x=1" / "sub?dup" / "dataset.json")
    storage.write_json(card, {"ok": 1})
    assert (tmp_path / "oq?x=1" / "sub?dup" / "dataset.json").exists()
    assert not (tmp_path / "oq").exists()
    assert storage.read_json(card) == {"ok": 1}


def test_only_a_uri_with_a_scheme_has_a_query():
    assert storage.is_remote("s3://bucket/key?endpoint_override=x") and not storage.is_remote("/data/a://b")
    remote = Location("s3://bucket/in?endpoint_override=127.0.0.1:9000&scheme=http").join("n001", "a?b.JPEG")
    assert remote.uri == "s3://bucket/in/n001/a?b.JPEG?endpoint_override=127.0.0.1:9000&scheme=http"
    assert location("file:///data/x").uri == "/data/x"
    with pytest.raises(ValueError, match="unknown URI option endpoint"):
        Location("s3://bucket/key?endpoint=127.0.0.1:9000").resolve()


def test_a_full_disk_leaves_no_partial_file(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "256k") as disk:
        with pytest.raises(OSError) as caught, atomic_output(location(disk / "out" / "big.tar")) as stream:
            for _ in range(100):
                stream.write(bytes(64 * 1024))  # 6.4 MB into 256 KB
        assert caught.value.errno == errno.ENOSPC
        assert sorted(p.name for p in (disk / "out").iterdir()) == []


def test_a_store_that_never_answers_fails_the_read_instead_of_hanging(stalled_endpoint, monkeypatch):
    url, accepted = stalled_endpoint
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SUBSPECTRAL_STORAGE_TIMEOUT", "1")  # 3 attempts of 1 s without a byte
    uri = f"s3://corpus/in/n001/a.JPEG?endpoint_override={url.split('://')[1]}&scheme=http"
    with pytest.raises(OSError, match="Timeout was reached"):  # pyarrow's default client retries for ~100 s
        call_within(60, storage.read_bytes, Location(uri))
    assert accepted, "the request never reached the endpoint: nothing was tested"


def test_the_timeout_setting_is_checked(monkeypatch):
    monkeypatch.setenv("SUBSPECTRAL_STORAGE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SUBSPECTRAL_STORAGE_TIMEOUT must be a number of seconds above 0"):
        storage.storage_timeout()
    monkeypatch.setenv("SUBSPECTRAL_STORAGE_TIMEOUT", "2.5")
    assert storage.storage_timeout() == 2.5

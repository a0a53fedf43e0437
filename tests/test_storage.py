"""Storage by path or URL: joins, whole-file reads and writes, on the local disk and on an S3 server."""

from __future__ import annotations

import pytest

from rival_jax.data.storage import is_url, join, read_bytes, write_bytes
from rival_jax.errors import RivalError


def test_urls_and_paths_are_told_apart_and_joined_like_their_kind():
    assert is_url("s3://bucket/a") and is_url("file:///tmp/a") and not is_url("/tmp/a") and not is_url("c/a.png")
    assert join("s3://bucket/data/", "cat/a.png") == "s3://bucket/data/cat/a.png"
    assert join("/data", "gs://other/a.png") == "gs://other/a.png"
    assert join("/data", "/abs/a.png") == "/abs/a.png"
    assert join("/data", "cat/a.png") == "/data/cat/a.png"


def test_bytes_written_at_a_path_read_back_whole_and_a_missing_file_is_one_line(tmp_path):
    write_bytes(tmp_path / "sub" / "a.bin", b"abc")
    assert read_bytes(tmp_path / "sub" / "a.bin") == b"abc"
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")]
    with pytest.raises(RivalError, match="cannot be read"):
        read_bytes(tmp_path / "missing.bin")


def test_bytes_round_trip_through_a_local_s3_server(s3_bucket):
    write_bytes(f"{s3_bucket}/out/a.bin", b"\x00\x01payload")
    assert read_bytes(join(f"{s3_bucket}/out", "a.bin")) == b"\x00\x01payload"
    with pytest.raises(RivalError, match="cannot be read"):
        read_bytes(f"{s3_bucket}/out/missing.bin")


def test_a_protocol_without_its_package_names_the_extra():
    with pytest.raises(RivalError, match=r"pip install"):
        read_bytes("nosuchprotocol://bucket/a.bin")

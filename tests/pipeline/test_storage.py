"""pipeline.core.storage: the same calls on a local folder and on S3 (moto), and clear errors."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from pipeline.core.storage import (
    StorageError,
    StorageOptions,
    exists,
    fsspec_filesystem,
    is_s3,
    join_uri,
    list_files,
    pyarrow_filesystem,
    read_bytes,
    remove,
    write_bytes_atomic,
)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def test_round_trip_and_listing(root):
    a, b = join_uri(root, "run", "a.json"), join_uri(root, "run", "b.tar")
    assert not exists(a)
    write_bytes_atomic(a, b"first")
    write_bytes_atomic(a, b"second")  # replaces
    write_bytes_atomic(b, b"\x00" * 10)
    assert read_bytes(a) == b"second" and exists(a)
    assert list_files(join_uri(root, "run")) == [a, b]
    assert list_files(join_uri(root, "run"), ".tar") == [b]
    remove(join_uri(root, "run"))
    assert not exists(a) and not exists(b)
    remove(join_uri(root, "run"))  # missing: not an error


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    target = str(tmp_path / "deep" / "x.bin")
    write_bytes_atomic(target, b"abc")
    assert os.listdir(tmp_path / "deep") == ["x.bin"]
    assert (os.stat(target).st_mode & 0o777) == 0o644


def test_pyarrow_filesystem_reads_what_fsspec_wrote(s3_bucket, s3_endpoint):
    uri = join_uri(s3_bucket, "p", "data.bin")
    write_bytes_atomic(uri, b"payload")
    fs, path = pyarrow_filesystem(uri)
    assert isinstance(fs, pafs.S3FileSystem) and not path.startswith("s3://")
    with fs.open_input_stream(path) as f:
        assert f.read() == b"payload"
    # The endpoint comes from AWS_ENDPOINT_URL, passed to pyarrow explicitly (it ignores the variable).
    assert StorageOptions.from_env().endpoint_url == s3_endpoint
    local_fs, local_path = pyarrow_filesystem("relative/dir")
    assert isinstance(local_fs, pafs.LocalFileSystem) and os.path.isabs(local_path)


def test_from_env_and_explicit_options(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://objects.example:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    options = StorageOptions.from_env()
    assert (options.endpoint_url, options.access_key_id, options.region) == ("https://objects.example:9000", "key",
                                                                            "eu-west-1")
    fs, path = pyarrow_filesystem("s3://bucket/prefix/", options)
    assert path == "bucket/prefix" and fs.region == "eu-west-1"
    fsspec_fs, fsspec_path = fsspec_filesystem("s3://bucket/prefix", options)
    assert fsspec_path == "bucket/prefix" and fsspec_fs.client_kwargs == {"region_name": "eu-west-1"}
    assert is_s3("s3://b") and not is_s3("/data/s3://x")
    with pytest.raises(Exception):
        StorageOptions(endpoint=1)  # unknown field


def test_missing_uri_is_a_clear_error(root):
    missing = join_uri(root, "nothing", "here.json")
    with pytest.raises(StorageError, match=r"here\.json: does not exist"):
        read_bytes(missing)


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(StorageError, match="s3://no-such-bucket-xyz/a.json: does not exist"):
        read_bytes("s3://no-such-bucket-xyz/a.json")


def test_wrong_credentials_are_a_clear_error(auth_s3_endpoint):
    options = StorageOptions(endpoint_url=auth_s3_endpoint, access_key_id="wrong", secret_access_key="wrong",
                             region="us-east-1")
    with pytest.raises(StorageError, match="s3://some-bucket/index.json: access denied"):
        read_bytes("s3://some-bucket/index.json", options)
    with pytest.raises(StorageError, match="access denied"):
        write_bytes_atomic("s3://some-bucket/x.json", b"{}", options)

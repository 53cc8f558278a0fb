"""Shared fixtures: one local Ray cluster per session, one moto S3 server per session, real data.

Environment settings go in before Ray is imported anywhere (see shared/reference/environment.md).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from local_servers import start_moto_server

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _key, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}.items():
    os.environ[_key] = _value

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 for the whole session; AWS_ENDPOINT_URL points at it.

    Set before the Ray fixture starts so Ray workers inherit the endpoint too.
    """
    process, endpoint = start_moto_server()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    process.terminate()
    process.wait(timeout=10)
    os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(scope="session")
def auth_s3_endpoint():
    """A second moto server with authentication on: unknown access keys are refused (403)."""
    process, endpoint = start_moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket per test; returns its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for the session. 4 logical CPUs on 2 cores: with num_cpus=2 a Train
    run with two workers plus a dataset waits forever for resources (environment.md)."""
    import ray

    # address="local": never attach to a cluster some other `ray start` left on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in (
                 "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "DS_ACCELERATOR", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> str:
    from pipeline.data.sources.fashion_mnist import default_dir

    folder = default_dir()
    if not Path(folder, "train-images-idx3-ubyte.gz").exists() and not Path(folder, "train-images-idx3-ubyte").exists():
        pytest.fail(f"Fashion-MNIST not found in {folder}: run ./setup.sh (Debian package dataset-fashion-mnist)")
    return folder

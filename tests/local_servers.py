"""Servers the tests start on 127.0.0.1: a free port, waiting for a listener, a moto S3 server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`; TimeoutError after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def start_moto_server(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A `moto.server` process on a free loopback port; returns (process, endpoint URL)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(extra_env or {})},
    )
    try:
        wait_for_port(port, timeout=30)
    except TimeoutError:
        process.kill()
        raise RuntimeError("moto_server did not start") from None
    return process, f"http://127.0.0.1:{port}"

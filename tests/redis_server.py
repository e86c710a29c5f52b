"""Real `redis-server` processes for tests, on free loopback ports, with nothing persisted.

Import the fixture into a test module (`from redis_server import redis_server`) to get one
server per module; call `flush()` where a test needs an empty database.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server on 127.0.0.1; `stop` then `start` restarts it empty on the same port."""

    def __init__(self, *args: str, port: Optional[int] = None, client_options: Optional[dict] = None):
        """`args` go to redis-server after the defaults; `client_options` are how to reach it
        (TLS, an admin user) when `--port` alone is not enough."""
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed; run scripts/setup.sh --test")
        self.port = port or free_port()
        self.args = args
        self.client_options = client_options or {}
        self.proc = None
        self._dir = tempfile.mkdtemp(prefix="redis-test-")

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self._dir, "--loglevel", "warning", *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        """Freeze the server: connections open, nothing answered (a slow or hung Redis)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10, **{**self.client_options, **kwargs})

    def flush(self) -> None:
        self.client().flushall()

    def env(self) -> dict:
        """The function's environment variables that point it at this server."""
        return {"CVAT_FUNCTIONS_REDIS_HOST": "127.0.0.1", "CVAT_FUNCTIONS_REDIS_PORT": str(self.port)}

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.resume()  # in case a test stopped half-way with the server frozen
    server.close()

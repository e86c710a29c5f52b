"""Replicas of the function for multi-replica tests and benchmarks.

`Replica`: another replica in this process, sharing a loaded model but with its own settings and
state store (so its own cache). `ReplicaProcess`: `python server.py` in a separate process.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import nuclio_sdk

from support import ROOT, Function, body
from redis_server import free_port
from state_store import make_store
from tracking import TrackingService


class Replica(Function):
    """Another replica of a loaded function: the same model, its own settings and state store."""

    def __init__(self, base: Function, **settings):
        self.main = base.main
        self.context = nuclio_sdk.Context(logger=base.context.logger)
        settings = dataclasses.replace(base.context.user_data.settings, **settings)
        tracker = base.context.user_data.service.tracker
        self.context.user_data.settings = settings
        self.context.user_data.service = TrackingService(
            tracker, make_store(settings), polygon_tolerance=settings.polygon_tolerance
        )

    @property
    def key_prefix(self) -> str:
        return self.context.user_data.settings.state_prefix


class ReplicaProcess:
    """`python server.py` on a free port with the given environment; its log goes to a temp file."""

    def __init__(self, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "server.py"), "--port", str(self.port)],
            cwd=ROOT, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError("replica did not start:\n" + self.log.read().decode(errors="replace"))
            time.sleep(0.3)

    def _request(self, path: str, data=None):
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def health(self) -> int:
        return self._request("/health")[0]

    def post(self, payload: dict):
        """(status, decoded JSON answer)."""
        return self._request("/", json.dumps(payload).encode())

    def track(self, image: bytes, *, shapes=None, states=None) -> dict:
        status, answer = self.post(body(image, shapes=shapes, states=states))
        assert status == 200, answer
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.close()

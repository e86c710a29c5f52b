"""The local HTTP server: a real process serving the function over HTTP."""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from cvat_sdk.masks import encode_mask

from support import ROOT, first_masks, make_frames, model_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, payload=None, *, method="POST", content_type="application/json"):
    data = None if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(checkpoint):
    port = free_port()
    env = {**os.environ, **model_env(checkpoint), "CVAT_FUNCTIONS_REDIS_HOST": "", "SAM2_MAX_BODY_BYTES": "2000000"}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "server.py"), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if request(url + "/health", method="GET")[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not start:\n" + proc.stdout.read().decode(errors="replace"))
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_server_tracks_like_the_in_process_function(server, function):
    frames = make_frames(3, seed=5)
    payload = {"image": base64.b64encode(frames[0]).decode(), "shapes": [{"type": "mask", "points": encode_mask(first_masks()[0])}], "states": []}
    status, over_http = request(server, payload)
    assert status == 200
    in_process = function.track(frames[0], shapes=payload["shapes"])
    assert over_http["shapes"] == in_process["shapes"]
    payload = {"image": base64.b64encode(frames[1]).decode(), "shapes": [None], "states": over_http["states"]}
    status, answer = request(server, payload, content_type="application/json; charset=utf-8")
    assert status == 200 and answer["states"][0]["t"] == 1


def test_server_health_endpoint(server):
    status, answer = request(server + "/health", method="GET")
    assert status == 200 and answer["status"] == "ok"


def test_server_refuses_an_oversize_body_with_json_413(server):
    status, answer = request(server, b"x" * 2_000_001)
    assert status == 413
    assert "SAM2_MAX_BODY_BYTES" in answer["error"]


def test_server_answers_garbage_with_json_400(server):
    status, answer = request(server, b"{not json")
    assert status == 400 and "JSON" in answer["error"]

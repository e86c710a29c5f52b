"""The local HTTP server: a real process serving the function over HTTP."""

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
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


def start_server(checkpoint) -> tuple[subprocess.Popen, str]:
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
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not start:\n" + proc.stdout.read().decode(errors="replace"))
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = start_server(checkpoint)
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


def test_server_refuses_an_oversize_chunked_body_with_json_413(server):
    # No Content-Length: the size shows only as the chunks arrive.
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (b"x" * 100_000 for _ in range(25))  # 2.5 MB against a 2 MB limit
    conn.request("POST", "/", body=chunks, encode_chunked=True, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413
    assert response.getheader("Content-Type").startswith("application/json")
    assert "SAM2_MAX_BODY_BYTES" in json.loads(response.read())["error"]


@pytest.mark.parametrize("method, path, status", [("GET", "/nowhere", 404), ("DELETE", "/", 405)])
def test_server_answers_every_error_in_json(server, method, path, status):
    got, answer = request(server + path, method=method)
    assert got == status and isinstance(answer["error"], str)


def test_health_answers_while_a_long_request_runs(server):
    frames = make_frames(1, seed=6)
    boxes = [[i % 50, i % 40, 60 + i % 50, 50 + i % 40] for i in range(128)]  # 128 objects to start: seconds of work
    payload = {"image": base64.b64encode(frames[0]).decode(),
               "shapes": [{"type": "rectangle", "points": b} for b in boxes], "states": []}
    done = {}

    def long_request():
        done["status"] = request(server, payload)[0]
        done["at"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    started = time.monotonic()
    thread.start()
    time.sleep(0.5)  # the request is being served
    status, answer = request(server + "/health", method="GET")
    answered = time.monotonic()
    thread.join(timeout=120)
    assert status == 200 and answer["status"] == "ok"
    assert done["status"] == 200
    assert done["at"] - started > 2, "the request was too short to tell"
    assert answered < done["at"], "health waited for the tracking request"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_server_stops_cleanly_on_a_signal(checkpoint, signum):
    proc, _ = start_server(checkpoint)
    proc.send_signal(signum)
    output = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output

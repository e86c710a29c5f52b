"""The function on the Redis store, in-process: only commands Kvrocks 2.7 has, one frame's memory
written per step, TTLs on every key, and clear 4xx/503 answers for missing, corrupted, foreign
and unreachable state."""

import re
import threading
import time
import uuid

import msgpack
import pytest

from support import FIRST_BOXES, Function, body, first_masks, make_frames, mask_shape
from redis_server import redis_server  # noqa: F401 - fixture
from replicas import Replica
from redis_client import COMMANDS
from state_codec import encode_header

# Commands Kvrocks 2.7.0 (CVAT's Redis) has, from its source; EXPIRE's NX|XX|GT|LT options, which it
# lacks, are checked separately.
KVROCKS_27 = {
    "PING", "GET", "SET", "MGET", "HSET", "HGET", "HMGET", "HGETALL", "HDEL", "DEL", "EXISTS",
    "EXPIRE", "PEXPIRE", "TTL", "MULTI", "EXEC", "WATCH", "EVAL", "EVALSHA",
}


@pytest.fixture
def server(redis_server):  # noqa: F811
    redis_server.flush()
    return redis_server


def on_redis(function: Function, server, **settings) -> Replica:
    return Replica(function, redis_host="127.0.0.1", redis_port=server.port, **settings)


class CommandLog:
    """Every command the server runs, as seen by MONITOR."""

    def __init__(self, server):
        self._server = server
        self._stop = f"stop-{uuid.uuid4().hex}"
        self.commands: list[list[str]] = []
        ready = threading.Event()

        def listen():
            with server.client().monitor() as monitor:
                ready.set()
                for entry in monitor.listen():
                    if self._stop in entry["command"]:
                        return
                    self.commands.append(entry["command"].split(" "))

        self._thread = threading.Thread(target=listen, daemon=True)
        self._thread.start()
        assert ready.wait(10)

    def stop(self) -> list[list[str]]:
        self._server.client().echo(self._stop)
        self._thread.join(10)
        return self.commands


def test_a_full_session_sends_only_commands_kvrocks_2_7_supports(function, server):
    replica, other = on_redis(function, server), on_redis(function, server)
    frames = make_frames(17, seed=4)  # from frame 16 on, a step also deletes the oldest pointer
    log = CommandLog(server)
    replica.context.user_data.service.store.check()  # what init_context sends
    assert replica.call(None, method="GET")[0] == 200
    answer = replica.track(frames[0], shapes=[{"type": "rectangle", "points": FIRST_BOXES[1]}])
    for i, frame in enumerate(frames[1:], start=1):
        previous = answer["states"]
        answer = (other if i % 5 == 0 else replica).track(frame, states=previous)
    assert replica.track(frame, states=previous) == answer  # a retry
    assert replica.call(body(frames[0], states=previous))[0] == 409  # another frame on a used state
    unknown = [dict(previous[0], id=uuid.uuid4().hex)]
    assert replica.call(body(frames[0], states=unknown))[0] == 410
    commands = log.stop()

    names = {c[0].upper() for c in commands}
    assert names == set(COMMANDS)  # what an ACL user needs (tests/test_redis_topologies.py)
    assert names <= KVROCKS_27, names - KVROCKS_27
    expires = [c for c in commands if c[0].upper() == "EXPIRE"]
    assert all(len(c) == 3 for c in expires), "EXPIRE with NX|XX|GT|LT is not in Kvrocks 2.7"


def test_a_step_writes_only_the_new_frames_memory(function, server):
    replica = on_redis(function, server)
    frames = make_frames(8, seed=6)
    states = replica.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    for frame in frames[1:7]:
        states = replica.track(frame, states=states)["states"]
    raw = server.client()
    key = replica.key_prefix + states[0]["id"]
    memory = len(raw.hget(key, f"m:{states[0]['t']}"))
    state = sum(len(k) + len(v) for k, v in raw.hgetall(key).items())
    received = raw.info("stats")["total_net_input_bytes"]
    replica.track(frames[7], states=states)
    written = raw.info("stats")["total_net_input_bytes"] - received
    assert state > 6 * memory  # the prompt frame's and six recent frames' memories
    assert written < memory + 8 * 1024  # the new memory, plus its pointer, answer and token


def test_sessions_are_one_key_each_under_one_prefix_with_random_ids_and_an_8_hour_ttl(function, server):
    replica = on_redis(function, server)
    frames = make_frames(2, seed=7)
    states = replica.track(frames[0], shapes=[mask_shape(m) for m in first_masks()])["states"]
    states = replica.track(frames[1], states=states)["states"]
    raw = server.client()
    ids = [s["id"] for s in states]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)  # 128 random bits
    assert sorted(raw.keys("*")) == sorted(f"sam2-tracker:{i}".encode() for i in ids)
    assert all(8 * 3600 - 60 < raw.ttl(key) <= 8 * 3600 for key in raw.keys("*"))


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def tensor(dtype: str, shape: list, nbytes: int) -> bytes:
    return pack({"dtype": dtype, "shape": shape, "data": bytes(nbytes)})


CORRUPTIONS = {
    # name: (field, new bytes from the stored ones, status, words in the error)
    "garbage memory": ("m:2", lambda b: b"\x00 not msgpack" * 50, 410, "unreadable"),
    "truncated memory": ("m:2", lambda b: b[: len(b) // 2], 410, "unreadable"),
    "truncated prompt memory": ("cond", lambda b: b[:-1], 410, "unreadable"),
    "memory of another shape": ("m:1", lambda b: tensor("bfloat16", [1, 64, 8, 8], 8192), 410, "shape"),
    "memory shorter than its shape": ("m:1", lambda b: tensor("bfloat16", [1, 64, 16, 16], 100), 410, "bytes"),
    "float32 memory of the right shape": ("m:1", lambda b: tensor("float32", [1, 64, 16, 16], 65536), 410, "bfloat16"),
    "pointer of an unknown dtype": ("p:2", lambda b: tensor("int64", [1, 256], 2048), 410, "dtype"),
    "bin length past the end": ("p:1", lambda b: b"\xc6\x7f\xff\xff\xff", 410, "unreadable"),
    "garbage header": ("hdr", lambda b: b"\xc1", 410, "unreadable"),
    "header of another model": (
        "hdr", lambda b: encode_header(fingerprint="0" * 16, width=160, height=120, shape_type="mask"),
        409, "different model",
    ),
    "header of another format": (
        "hdr", lambda b: pack({**msgpack.unpackb(b), "format": 99}), 409, "format",
    ),
}


@pytest.fixture(scope="module")
def tracked_sessions(function, redis_server):  # noqa: F811
    """One session per corruption case, tracked to frame 2 by a replica that caches nothing."""
    replica = on_redis(function, redis_server, cache_bytes=1)  # every read comes from Redis
    frames = make_frames(4, seed=8)
    states = replica.track(frames[0], shapes=[mask_shape(first_masks()[0])] * len(CORRUPTIONS))["states"]
    for frame in frames[1:3]:
        states = replica.track(frame, states=states)["states"]
    return replica, frames[3], dict(zip(CORRUPTIONS, states))


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_truncated_and_foreign_state_bytes_are_refused_with_4xx(tracked_sessions, redis_server, case):  # noqa: F811
    replica, next_frame, states = tracked_sessions
    field, corrupt, status, words = CORRUPTIONS[case]
    raw = redis_server.client()
    key = replica.key_prefix + states[case]["id"]
    raw.hset(key, field, corrupt(raw.hget(key, field)))
    got, answer = replica.call(body(next_frame, states=[states[case]]))
    assert got == status, answer
    assert words in answer["error"]


def test_a_session_key_replaced_by_another_type_is_410(function, server):
    replica = on_redis(function, server)
    frames = make_frames(2, seed=9)
    states = replica.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    server.client().set(replica.key_prefix + states[0]["id"], b"junk")
    status, answer = replica.call(body(frames[1], states=states))
    assert status == 410 and "re-initialize" in answer["error"]


def test_a_slow_redis_answers_503_within_the_timeout_and_the_function_recovers(function, server):
    replica = on_redis(function, server, redis_timeout_s=1.0)
    frames = make_frames(3, seed=10)
    states = replica.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    server.pause()
    try:
        started = time.monotonic()
        status, answer = replica.call(body(frames[1], states=states))
        elapsed = time.monotonic() - started
        assert replica.call(None, method="GET")[0] == 503
    finally:
        server.resume()
    assert status == 503 and "state store (Redis at 127.0.0.1:" in answer["error"]
    assert elapsed < 3
    assert replica.track(frames[1], states=states)["states"][0]["t"] == 1

"""A full Redis. With an eviction policy (allkeys-lru here) Redis drops whole sessions, since each
object's session is one hash: the evicted objects answer 410, re-initialize, never a mask from
part of a state, and the others track on exactly as without eviction. With noeviction, a
request whose writes Redis refuses answers 503 and writes nothing."""

import time

import pytest

from redis_server import redis_server  # noqa: F401 - fixture
from replicas import Replica
from support import FRAME_H, FRAME_W, body, grid_masks, make_frames, mask_shape, run_function

OBJECTS = 3
PROMPTS = [mask_shape(m) for m in grid_masks(OBJECTS, width=FRAME_W, height=FRAME_H)]


@pytest.fixture
def server(redis_server):  # noqa: F811
    redis_server.flush()
    yield redis_server
    redis_server.client().config_set("maxmemory", 0)
    redis_server.client().config_set("maxmemory-policy", "noeviction")
    redis_server.client().config_set("maxmemory-samples", 5)
    redis_server.flush()


@pytest.fixture(scope="module")
def frames():
    return make_frames(5, seed=12)


@pytest.fixture(scope="module")
def reference(function, frames):
    """Per frame, the shapes the embedded store answers for PROMPTS tracked from frame 0."""
    return run_function(function, frames, PROMPTS)


def used_memory(server) -> int:
    return server.client().info("memory")["used_memory"]


def track(replica, frames, count: int) -> tuple[list, list]:
    """PROMPTS on frames[0], then tracked on frames[1:count]: (answers' shapes per frame, states)."""
    answer = replica.track(frames[0], shapes=PROMPTS)
    shapes = [answer["shapes"]]
    for frame in frames[1:count]:
        answer = replica.track(frame, states=answer["states"])
        shapes.append(answer["shapes"])
    return shapes, answer["states"]


def test_evicted_sessions_answer_410_and_the_others_track_as_without_eviction(function, server, frames, reference):
    # The replica's cache keeps a copy of every session: an evicted one must not be answered from it.
    replica = Replica(function, redis_host="127.0.0.1", redis_port=server.port)
    raw = server.client()
    baseline = used_memory(server)
    early_shapes, early = track(replica, frames, 3)
    assert early_shapes == reference[:3]
    # Room for the early sessions and half as much again: a second group as big evicts some.
    early_bytes = used_memory(server) - baseline
    raw.config_set("maxmemory-policy", "allkeys-lru")
    raw.config_set("maxmemory-samples", 10)  # exact LRU among this handful of keys
    raw.config_set("maxmemory", baseline + early_bytes * 3 // 2)
    time.sleep(1.1)  # Redis' LRU clock ticks once a second: the early group is now strictly older

    late_shapes, late = track(replica, frames, 3)
    assert raw.info("stats")["evicted_keys"] > 0
    assert late_shapes == reference[:3]
    # The late objects, the most recently used, go on exactly as without eviction.
    for i, state in enumerate(late):
        status, answer = replica.call(body(frames[3], states=[state]))
        assert status == 200, answer
        assert answer["shapes"][0] == reference[3][i]
    # Each early object either lost its whole session (410) or goes on as without eviction.
    outcomes = []
    for i, state in enumerate(early):
        status, answer = replica.call(body(frames[3], states=[state]))
        if status == 410:
            assert "re-initialize the object" in answer["error"]
            assert not raw.exists(replica.key_prefix + state["id"])
        else:
            assert status == 200, answer
            assert answer["shapes"][0] == reference[3][i]
        outcomes.append(status)
    assert 410 in outcomes, "no early session was evicted: the test proves nothing"
    # An evicted object is simply initialised again.
    status, answer = replica.call(body(frames[3], shapes=[PROMPTS[0]]))
    assert status == 200 and answer["states"][0]["t"] == 0


def test_a_full_redis_without_eviction_answers_503_and_writes_nothing(function, server, frames, reference):
    replica = Replica(function, redis_host="127.0.0.1", redis_port=server.port)
    raw = server.client()
    _, states = track(replica, frames, 2)
    before = {key: raw.hgetall(key) for key in raw.keys("*")}
    raw.config_set("maxmemory-policy", "noeviction")
    raw.config_set("maxmemory", used_memory(server) // 2)  # full: Redis refuses every write
    # A new object and the continued ones (the new session is written first, so its create is
    # refused), then the continued ones alone (their commits are refused).
    requests = [{**body(frames[2], states=[None, *states]), "shapes": [PROMPTS[0], *[None] * len(states)]},
                body(frames[2], states=states)]
    for request in requests:
        status, answer = replica.call(request)
        assert status == 503, answer
        assert "refused a command" in answer["error"] and "used memory > 'maxmemory'" in answer["error"]
        assert {key: raw.hgetall(key) for key in raw.keys("*")} == before  # no new session, nothing advanced
    assert replica.call(None, method="GET")[0] == 200  # PING still answers: health does not see a full Redis

    raw.config_set("maxmemory", 0)  # room again: the same requests now get their answers
    started = function.track(frames[2], shapes=[PROMPTS[0]])["shapes"][0]
    assert replica.track(frames[2], shapes=requests[0]["shapes"], states=requests[0]["states"])["shapes"] == [
        started, *reference[2]
    ]
    assert replica.track(frames[2], states=states)["shapes"] == reference[2]  # a retry: answered from the store

"""What a failed request leaves behind, on a real redis-server (see the README's "When a request
fails"): a request refused by validation touches no state; after any failure, the identical
request answers exactly as the first try would have; sessions a failed request started are
deleted again."""

import hashlib

import pytest

from redis_server import redis_server  # noqa: F401 - fixture
from replicas import Replica
from support import FIRST_BOXES, body, first_masks, make_frames, mask_shape
from tracking import _next_token


@pytest.fixture
def server(redis_server):  # noqa: F811
    redis_server.flush()
    return redis_server


@pytest.fixture(scope="module")
def frames():
    return make_frames(3, seed=21)


def on_redis(function, server, **settings) -> Replica:
    return Replica(function, redis_host="127.0.0.1", redis_port=server.port, **settings)


def keys(server) -> set[bytes]:
    return set(server.client().keys("*"))


def snapshot(server) -> dict:
    """Every key's fields and remaining lifetime in ms."""
    client = server.client()
    return {key: (client.hgetall(key), client.pttl(key)) for key in sorted(client.keys("*"))}


def test_a_request_refused_by_validation_touches_no_state(function, server, frames):
    replica = on_redis(function, server)
    states = replica.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    before = snapshot(server)
    commands = server.client().info("stats")["total_commands_processed"]
    # Object 0 continues correctly; object 1's shape is invalid.
    bad = {"type": "polygon", "points": [1, 2, 3]}
    status, answer = replica.call(body(frames[1], shapes=[None, bad], states=states + [None]))
    assert status == 400 and "shapes[1]" in answer["error"]
    # Not one command reached Redis (the INFO below is the only one since the last INFO), so no
    # lifetime was refreshed and nothing was written.
    assert server.client().info("stats")["total_commands_processed"] == commands + 1
    after = snapshot(server)
    assert {k: fields for k, (fields, _) in after.items()} == {k: fields for k, (fields, _) in before.items()}
    assert all(after[k][1] <= before[k][1] for k in before)


def test_after_redis_hangs_between_two_objects_writes_the_retry_answers_as_the_first_try_would(
    function, server, frames, monkeypatch
):
    replica = on_redis(function, server, redis_timeout_s=1.0)
    shapes = [mask_shape(m) for m in first_masks()]
    states = replica.track(frames[0], shapes=shapes)["states"]
    # What the first try would have answered: the same objects started and tracked without a fault.
    control = on_redis(function, server)
    expected = control.track(frames[1], states=control.track(frames[0], shapes=shapes)["states"])

    store = replica.context.user_data.service.store
    commit = store.commit
    calls = []

    def hangs_after_the_first(session, **kwargs):
        calls.append(session)
        if len(calls) == 2:
            server.pause()  # SIGSTOP: the second object's write never gets an answer
        return commit(session, **kwargs)

    monkeypatch.setattr(store, "commit", hangs_after_the_first)
    try:
        status, answer = replica.call(body(frames[1], states=states))
    finally:
        server.resume()
    assert status == 503, answer
    assert len(calls) == 2  # the first object was advanced, the second was not
    monkeypatch.setattr(store, "commit", commit)

    tracked = []
    track = replica.context.user_data.service.tracker.track
    monkeypatch.setattr(replica.context.user_data.service.tracker, "track",
                        lambda *a, **k: tracked.append(1) or track(*a, **k))
    retry = replica.track(frames[1], states=states)
    assert len(tracked) == 1  # the first object's answer came from the store; the second was computed
    assert retry["shapes"] == expected["shapes"]
    digest = hashlib.sha256(frames[1]).digest()
    assert retry["states"] == [
        {"v": 1, "id": s["id"], "t": 1, "tok": _next_token(s["tok"], digest)} for s in states
    ]
    # And the sessions go on from there as if nothing had happened.
    next_frame = replica.track(frames[2], states=retry["states"])["shapes"]
    assert next_frame == control.track(frames[2], states=expected["states"])["shapes"]


def test_sessions_started_by_a_request_that_fails_are_deleted(function, server, frames, monkeypatch):
    replica, other = on_redis(function, server), on_redis(function, server)
    states = replica.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    before = keys(server)
    # Object 0 is new; object 1's state is advanced by another request between this request's
    # model work and its writes, so its write is refused (409) after object 0's session exists.
    store = replica.context.user_data.service.store
    commit = store.commit

    def overtaken(session, **kwargs):
        other.track(frames[2], states=states)  # a racing request, on another replica
        return commit(session, **kwargs)

    monkeypatch.setattr(store, "commit", overtaken)
    status, answer = replica.call(
        body(frames[1], shapes=[{"type": "rectangle", "points": FIRST_BOXES[1]}, None], states=[None] + states)
    )
    assert status == 409 and "states[1]" in answer["error"]
    assert keys(server) == before  # object 0's new session is gone again


def test_a_failed_start_leaves_no_session_in_the_embedded_store(function, frames, monkeypatch):
    service = function.context.user_data.service
    store = service.store
    sessions = store._sessions.keys()
    create = store.create
    created = []

    def fails_second(session, fields):
        if created:
            raise RuntimeError("disk full")  # any failure: here a bug, answered 500
        created.append(session)
        return create(session, fields)

    monkeypatch.setattr(store, "create", fails_second)
    status, _ = function.call(body(frames[0], shapes=[mask_shape(m) for m in first_masks()]))
    assert status == 500
    assert len(created) == 1 and store._sessions.peek(created[0]) is None
    assert store._sessions.keys() == sessions

"""Replica processes (server.py) sharing one real redis-server: they serve one session in turns with
the official predictor's masks, and survive a peer's kill -9, racing requests, and Redis restarts
and outages."""

import concurrent.futures
import time

import pytest
from cvat_sdk.masks import encode_mask

from redis_server import redis_server  # noqa: F401 - fixture
from replicas import ReplicaProcess
from support import (
    FRAME_H, FRAME_W, answer_mask, assert_same_masks, body, first_masks, model_env, run_function,
)

def shape_to_mask(shape):
    return answer_mask(shape, width=FRAME_W, height=FRAME_H)


def mask_shapes(count: int = 2) -> list:
    return [{"type": "mask", "points": encode_mask(m)} for m in first_masks()[:count]]


@pytest.fixture(scope="module")
def replicas(checkpoint, redis_server):  # noqa: F811
    """Two replicas; they load their models side by side. The last test kills the second."""
    env = {**model_env(checkpoint), **redis_server.env(), "SAM2_REDIS_TIMEOUT_SECONDS": "2", "OMP_NUM_THREADS": "1"}
    started = [ReplicaProcess(env) for _ in range(2)]
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.close()


@pytest.fixture(scope="module")
def frames(video):
    return video


@pytest.fixture(scope="module")
def official(official_video):
    return official_video


def masks_of(answers: list) -> list:
    return [[shape_to_mask(s) for s in shapes] for shapes in answers]


def test_replicas_taking_turns_answer_like_one_process_and_the_official_predictor(replicas, frames, official):
    a, b = replicas
    answers, states = [], None
    for i, frame in enumerate(frames):
        replica = b if i % 3 == 1 else a  # a serves some frames twice in a row (cached), b never does
        answer = replica.track(frame, shapes=None if states else mask_shapes(), states=states)
        answers.append(answer["shapes"])
        states = answer["states"]
    # test_exactness shows one process gives exactly these masks, so this compares with both.
    assert_same_masks(masks_of(answers), official)


def race(requests: list) -> list:
    """Send (replica, payload) pairs at the same moment; their (status, answer) in order."""
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda job: job[0].post(job[1]), requests))


def test_the_same_request_racing_on_two_replicas_gets_one_answer(replicas, frames, official):
    a, b = replicas
    states = a.track(frames[0], shapes=mask_shapes(1))["states"]
    states = b.track(frames[1], states=states)["states"]
    request = body(frames[2], states=states)
    (status_a, answer_a), (status_b, answer_b) = race([(a, request), (b, request)])
    assert status_a == status_b == 200 and answer_a == answer_b
    answer = b.track(frames[3], states=answer_a["states"])
    assert (shape_to_mask(answer["shapes"][0]) == official[3][0]).all()


def test_different_requests_racing_on_one_state_leave_one_winner_and_a_usable_state(replicas, frames, function):
    a, b = replicas
    states = a.track(frames[0], shapes=mask_shapes(1))["states"]
    states = a.track(frames[1], states=states)["states"]
    results = race([(a, body(frames[2], states=states)), (b, body(frames[5], states=states))])
    assert sorted(status for status, _ in results) == [200, 409]
    loser = next(answer for status, answer in results if status == 409)
    assert "re-initialize" in loser["error"]
    winner_frame = frames[2] if results[0][0] == 200 else frames[5]
    winner_states = next(answer for status, answer in results if status == 200)["states"]
    answer = b.track(frames[3], states=winner_states)
    expected = run_function(function, [frames[0], frames[1], winner_frame, frames[3]], mask_shapes(1))
    assert answer["shapes"] == expected[3]


def test_replicas_outlive_a_redis_outage_and_restart(replicas, redis_server, frames):  # noqa: F811
    a, b = replicas
    states = a.track(frames[0], shapes=mask_shapes(1))["states"]
    redis_server.stop()
    try:
        status, answer = b.post(body(frames[1], states=states))
        assert status == 503 and f"state store (Redis at 127.0.0.1:{redis_server.port})" in answer["error"]
        assert a.health() == 503
    finally:
        redis_server.start()  # empty: nothing was persisted
    assert a.health() == b.health() == 200
    status, answer = b.post(body(frames[1], states=states))
    assert status == 410 and "re-initialize" in answer["error"]
    states = b.track(frames[0], shapes=mask_shapes(1))["states"]
    assert a.track(frames[1], states=states)["states"][0]["t"] == 1


def test_a_replica_killed_mid_session_loses_nothing(replicas, frames, official):
    a, victim = replicas  # runs last: the other tests need both
    answer = a.track(frames[0], shapes=mask_shapes())
    answers = [answer["shapes"]]
    for i in range(1, 4):
        answer = (a, victim)[i % 2].track(frames[i], states=answer["states"])
        answers.append(answer["shapes"])
    # The victim gets frame 4 with 100 more objects to start: seconds of work, all before any write.
    extra = [{"type": "rectangle", "points": [i % 40, i % 30, 60 + i % 40, 50 + i % 30]} for i in range(100)]
    payload = body(frames[4], shapes=[None, None] + extra, states=answer["states"] + [None] * 100)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(victim.post, payload)
        time.sleep(1.0)  # the victim is computing
        victim.proc.kill()
        victim.proc.wait()
        # The kill landed mid-request: the connection dropped with no answer.
        assert isinstance(pending.exception(timeout=60), OSError), pending.result()
    for i in range(4, 12):  # frame 4 again, on the survivor, then on as if nothing happened
        answer = a.track(frames[i], states=answer["states"])
        answers.append(answer["shapes"])
    masks = masks_of(answers)
    assert all((got == expected).all() for frame, ref in zip(masks, official) for got, expected in zip(frame, ref))

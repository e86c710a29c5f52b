"""CVAT's tracker protocol through main.handler with the embedded store."""

import json

import pytest
from cvat_sdk.masks import decode_mask

from support import (
    FIRST_BOXES, FRAME_H, FRAME_W, Function, body, first_masks, make_checkpoint, make_frames, mask_shape, model_env,
)


@pytest.fixture(scope="module")
def frames():
    return make_frames(6, seed=3)


def test_answers_one_shape_and_one_small_state_per_object_in_order(function, frames):
    shapes = [mask_shape(first_masks()[0]), {"type": "rectangle", "points": FIRST_BOXES[1]}]
    answer = function.track(frames[0], shapes=shapes)
    assert [s["type"] for s in answer["shapes"]] == ["mask", "rectangle"]
    assert len(answer["states"]) == 2
    for state in answer["states"]:
        # CVAT signs json.dumps(state, separators=(",", ":")) and ships it through the browser.
        assert len(json.dumps(state, separators=(",", ":"))) <= 1024
    answer = function.track(frames[1], states=answer["states"])
    assert [s["type"] for s in answer["shapes"]] == ["mask", "rectangle"]


def test_output_type_equals_input_type(function, frames):
    polygon = [20, 30, 60, 30, 60, 70, 20, 70]
    shapes = [{"type": "polygon", "points": polygon}, {"type": "rectangle", "points": FIRST_BOXES[0]},
              mask_shape(first_masks()[1])]
    states = function.track(frames[0], shapes=shapes)["states"]
    answer = function.track(frames[1], states=states)
    assert [s["type"] for s in answer["shapes"]] == ["polygon", "rectangle", "mask"]
    points = answer["shapes"][0]["points"]
    assert len(points) >= 6 and len(points) % 2 == 0
    x1, y1, x2, y2 = answer["shapes"][1]["points"]
    assert 0 <= x1 < x2 <= FRAME_W and 0 <= y1 < y2 <= FRAME_H
    assert decode_mask(answer["shapes"][2]["points"], image_width=FRAME_W, image_height=FRAME_H).any()


def test_bytes_body_with_charset_gives_the_same_answer_as_a_decoded_dict(function, frames):
    request = body(frames[0], shapes=[mask_shape(first_masks()[0])])
    status, from_dict = function.call(request)
    raw = json.dumps(request).encode()
    status_raw, from_bytes = function.call(raw, content_type="application/json; charset=utf-8")
    assert status == status_raw == 200
    assert from_dict["shapes"] == from_bytes["shapes"]
    assert from_dict["states"] != from_bytes["states"]  # two separate tracking sessions


def test_frame_is_encoded_once_whatever_the_number_of_objects(function, frames, monkeypatch):
    tracker = function.context.user_data.service.tracker
    calls = []
    original = tracker.model.forward_image
    monkeypatch.setattr(tracker.model, "forward_image", lambda img: calls.append(1) or original(img))
    shapes = [mask_shape(m) for m in first_masks()] + [{"type": "rectangle", "points": FIRST_BOXES[0]}]
    states = function.track(frames[0], shapes=shapes)["states"]
    function.track(frames[1], states=states)
    assert len(calls) == 2


def test_retrying_a_request_gives_the_same_answer(function, frames):
    states = function.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    first = function.track(frames[1], states=states)
    again = function.track(frames[1], states=states)
    assert again == first
    # And the session goes on from either answer.
    assert function.track(frames[2], states=again["states"])["states"][0]["t"] == 2


def test_another_frame_on_an_already_advanced_state_is_refused_with_409(function, frames):
    states = function.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    function.track(frames[1], states=states)
    status, answer = function.call(body(frames[2], states=states))
    assert status == 409
    assert "re-initialize" in answer["error"]


def test_unknown_state_asks_to_reinitialize_with_410(function, frames):
    forged = {"v": 1, "id": "0" * 32, "t": 3, "tok": "0" * 16}
    status, answer = function.call(body(frames[1], states=[forged]))
    assert status == 410
    assert "re-initialize" in answer["error"] and "unknown or has expired" in answer["error"]


def test_shape_with_a_state_restarts_the_object(function, frames):
    states = function.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    answer = function.track(frames[1], shapes=[mask_shape(first_masks()[1])], states=states)
    assert answer["states"][0]["t"] == 0 and answer["states"][0]["id"] != states[0]["id"]


def test_bad_request_gets_400_json_naming_the_field(function, frames):
    status, answer = function.call(body(frames[0], shapes=[{"type": "ellipse", "points": [1, 2, 3, 4]}]))
    assert status == 400
    assert "shapes[0].type" in answer["error"]


def test_a_bug_gets_500_json_and_the_traceback_is_logged(function, frames, monkeypatch, caplog):
    service = function.context.user_data.service

    def broken(**kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(service, "track", broken)
    with caplog.at_level("ERROR"):
        status, answer = function.call(body(frames[0], shapes=[mask_shape(first_masks()[0])]))
    assert status == 500
    assert "ZeroDivisionError" in answer["error"]
    assert any("ZeroDivisionError: boom" in str(getattr(r, "with", {}).get("traceback")) for r in caplog.records)


def test_get_is_a_health_check(function):
    status, answer = function.call(b"", content_type="", method="GET")
    assert status == 200 and answer["status"] == "ok"


@pytest.fixture(scope="module")
def absent_function(tmp_path_factory):
    """A model whose object-score head always says "absent"."""
    path = str(tmp_path_factory.mktemp("absent") / "absent.pt")
    make_checkpoint(path, obj_score_bias=-10.0)
    return Function({**model_env(path), "CVAT_FUNCTIONS_REDIS_HOST": ""})


def test_lost_object_gets_null_and_keeps_its_state(absent_function, frames):
    answer = absent_function.track(frames[0], shapes=[mask_shape(first_masks()[0])])
    assert answer["shapes"][0]["type"] == "mask"  # the prompt frame shows the given mask
    states = answer["states"]
    for t in (1, 2, 3):
        answer = absent_function.track(frames[t], states=states)
        assert answer["shapes"] == [None]
        states = answer["states"]
        assert states[0]["t"] == t  # the object keeps being tracked while unseen


def test_a_corrupt_stored_state_advances_no_object_of_the_request(function, frames):
    states = function.track(frames[0], shapes=[mask_shape(m) for m in first_masks()])["states"]
    states = function.track(frames[1], states=states)["states"]
    store = function.context.user_data.service.store
    store._sessions.peek(states[1]["id"])[1]["m:1"] = b"\x00 not a memory"  # write-once API: go around it
    status, answer = function.call(body(frames[2], states=states))
    assert status == 410 and "states[1]" in answer["error"]
    assert store.read(states[0]["id"], ["s:2"]) == {}  # the valid object did not advance either

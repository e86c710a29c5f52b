"""The one log line per tracking request, and the health check's store fields."""

import base64
import json
import logging

import pytest
from redis_server import redis_server  # noqa: F401 - a fixture

from replicas import Replica
from support import FIRST_BOXES, body, first_masks, make_frames, mask_shape

PHASES = ("decode_ms", "encoder_ms", "model_ms", "codec_ms", "store_read_ms", "store_write_ms", "shapes_ms")
FIELDS = {"status", "objects_new", "objects_continued", "objects_replayed", "width", "height", *PHASES,
          "total_ms", "store"}


@pytest.fixture(scope="module")
def frames():
    return make_frames(3, seed=11)


@pytest.fixture
def log(caplog):
    """The function's log records (its nuclio_sdk logger) at INFO and above, as (message, fields)."""
    caplog.set_level(logging.INFO, logger="nuclio_sdk")
    return lambda: [(r.getMessage(), getattr(r, "with", {})) for r in caplog.records if r.name == "nuclio_sdk"]


def tracked(function, log, image, **kwargs) -> tuple[dict, dict]:
    """One request; its answer and its one log line's fields."""
    before = len(log())
    answer = function.track(image, **kwargs)
    lines = log()[before:]
    assert len(lines) == 1, lines
    message, fields = lines[0]
    assert message == "tracked"
    return answer, fields


def assert_well_formed(fields: dict, *, width: int, height: int) -> None:
    assert set(fields) == FIELDS
    assert fields["status"] == 200 and fields["store"] == "embedded"
    assert (fields["width"], fields["height"]) == (width, height)
    for name in (*PHASES, "total_ms"):
        assert isinstance(fields[name], float) and fields[name] >= 0, (name, fields[name])
    # Small slack: each value is rounded to the microsecond.
    assert fields["total_ms"] + 0.01 >= sum(fields[p] for p in PHASES), fields


def test_one_line_per_request_with_counts_for_new_continued_and_replayed_objects(function, frames, log):
    shapes = [mask_shape(first_masks()[0]), {"type": "rectangle", "points": FIRST_BOXES[1]}]
    answer, fields = tracked(function, log, frames[0], shapes=shapes)
    assert (fields["objects_new"], fields["objects_continued"], fields["objects_replayed"]) == (2, 0, 0)
    assert_well_formed(fields, width=160, height=120)
    assert fields["model_ms"] > 0 and fields["encoder_ms"] > 0 and fields["decode_ms"] > 0
    assert fields["store_read_ms"] == 0  # nothing to read for new objects

    states = answer["states"]
    first, fields = tracked(function, log, frames[1], states=states)
    assert (fields["objects_new"], fields["objects_continued"], fields["objects_replayed"]) == (0, 2, 0)
    assert_well_formed(fields, width=160, height=120)
    assert fields["store_read_ms"] > 0 and fields["store_write_ms"] > 0 and fields["codec_ms"] > 0

    again, fields = tracked(function, log, frames[1], states=states)  # a retry: answered from the store
    assert again == first
    assert (fields["objects_new"], fields["objects_continued"], fields["objects_replayed"]) == (0, 0, 2)
    assert_well_formed(fields, width=160, height=120)
    assert fields["encoder_ms"] == fields["model_ms"] == 0  # no model work for a replay

    # One request of each kind at once: a restarted object, a continued one, none replayed.
    _, fields = tracked(function, log, frames[2], shapes=[mask_shape(first_masks()[1]), None],
                        states=first["states"])
    assert (fields["objects_new"], fields["objects_continued"], fields["objects_replayed"]) == (1, 1, 0)


def test_the_line_holds_no_image_shape_or_state(function, frames, log):
    shape = mask_shape(first_masks()[0])
    before = len(log())
    first = function.track(frames[0], shapes=[shape])
    second = function.track(frames[1], states=first["states"])
    function.track(frames[1], states=first["states"])  # a replay
    refused = body(frames[2], states=first["states"])  # the state was already advanced: 409
    assert function.call(refused)[0] == 409
    forged = {"v": 1, "id": "f" * 32, "t": 0, "tok": "e" * 16}
    status, error = function.call(body(frames[2], states=[forged]))  # its message names the state: 410
    assert status == 410 and "f" * 32 in error["error"]
    lines = log()[before:]
    assert [m for m, _ in lines] == ["tracked"] * 3 + ["tracking request refused"] * 2
    assert [f["status"] for _, f in lines] == [200, 200, 200, 409, 410]
    assert [f["error"] for _, f in lines[3:]] == ["StateConflict", "StateNotFound"]
    text = json.dumps([[m, f] for m, f in lines])
    secrets = [base64.b64encode(frames[i]).decode()[:40] for i in range(3)]
    secrets += [json.dumps(shape["points"])[1:40]] + [json.dumps(s["points"])[1:40] for s in second["shapes"]]
    for answer in (first, second):
        for state in answer["states"]:
            secrets += [state["id"], state["tok"]]
    secrets += [forged["id"], forged["tok"]]
    for secret in secrets:
        assert secret not in text, secret


def test_a_refused_request_logs_one_line_with_its_status(function, log):
    before = len(log())
    status, _ = function.call({"image": "not base64!", "shapes": [mask_shape(first_masks()[0])], "states": []})
    assert status == 400
    (message, fields), = log()[before:]
    assert message == "tracking request refused" and fields["status"] == 400 and fields["error"] == "BadRequest"
    assert fields["objects_new"] == 0 and fields["total_ms"] >= fields["decode_ms"] >= 0


def test_a_server_side_failure_logs_one_warning_with_its_message(function, frames, monkeypatch, caplog, log):
    from errors import StoreUnavailable

    def down(*args, **kwargs):
        raise StoreUnavailable("state store (test) is unreachable; retry later")

    monkeypatch.setattr(function.context.user_data.service.store, "create", down)
    before = len(caplog.records)
    status, _ = function.call(body(frames[0], shapes=[mask_shape(first_masks()[0])]))
    assert status == 503
    (record,) = [r for r in caplog.records[before:] if r.name == "nuclio_sdk"]
    assert record.levelno == logging.WARNING
    fields = getattr(record, "with")
    assert fields["status"] == 503 and "unreachable" in fields["error"] and fields["model_ms"] > 0


def test_health_reports_the_store_and_its_round_trip_time(function, log):
    before = len(log())
    status, answer = function.call(b"", content_type="", method="GET")
    assert status == 200 and answer["status"] == "ok" and answer["store"] == "embedded"
    assert isinstance(answer["store_rtt_ms"], float) and answer["store_rtt_ms"] >= 0
    assert log()[before:] == []  # health checks are not logged: probes would flood the log


def test_with_redis_health_and_log_name_the_store(function, redis_server, frames, log):  # noqa: F811
    replica = Replica(function, redis_host="127.0.0.1", redis_port=redis_server.port)
    status, answer = replica.call(b"", content_type="", method="GET")
    assert status == 200 and answer["store"] == "redis"
    assert isinstance(answer["store_rtt_ms"], float) and answer["store_rtt_ms"] > 0  # a real round trip
    states = replica.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    _, fields = tracked(replica, log, frames[1], states=states)
    assert fields["store"] == "redis" and fields["objects_continued"] == 1
    assert fields["store_read_ms"] > 0 and fields["store_write_ms"] > 0


def test_the_local_server_prints_the_line_once(function, frames, capsys):
    import nuclio_sdk

    import server

    context = server.make_context()  # its handler writes to sys.stderr: here, capsys
    context.user_data = function.context.user_data
    event = server.make_event(body=json.dumps(body(frames[0], shapes=[mask_shape(first_masks()[0])])).encode(),
                              content_type="application/json", method="POST", path="/", headers={})
    output = server.main.handler(context, event)
    assert nuclio_sdk.Response.from_entrypoint_output(json.dumps, output)["status_code"] == 200
    lines = [line for line in capsys.readouterr().err.splitlines() if "tracked" in line]
    assert len(lines) == 1 and "[info] tracked: {" in lines[0] and "'objects_new': 1" in lines[0], lines
    # A root handler (sam2 installs one) holds the stderr of its day, which capsys cannot see: the
    # line reaches no other handler only because it does not propagate.
    assert logging.getLogger("sam2-tracker").propagate is False

"""Fuzzing the handler: whatever arrives, the answer is a 2xx or a 4xx JSON, never a 5xx.

Three generators: arbitrary JSON, arbitrary bytes, and valid requests (initialising and
continuing, every shape type) with a few mutations each: a field replaced by arbitrary JSON or
an edge-case number, a key dropped, a list cut or grown, a hex digit of a state changed, the
image's bytes flipped, cut or swapped for another format or size. Only mutated requests can reach
the model (~0.2 s each on CPU), so they get fewer examples.

CI runs a bounded number of examples with a fixed seed. For a longer run, set FUZZ_EXAMPLES
(examples of the mutated-request fuzz; the cheap ones run 4x as many), which also picks a random
seed each run, e.g.:

    FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz.py --hypothesis-show-statistics
"""

import base64
import io
import json
import os
from datetime import timedelta

import numpy as np
import PIL.Image
import pytest
from cvat_sdk.masks import encode_mask
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from support import FIRST_BOXES, first_masks, make_frames
from config import Settings
from errors import TrackerError
from protocol import parse_request

ON_DEMAND = "FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=not ON_DEMAND,  # CI sees the same examples every run
        deadline=timedelta(seconds=60),  # a request this slow is a bug (a bomb let through); CI machines vary
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )


FRAMES = make_frames(3)


def encoded(image: PIL.Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def image_pool() -> list[bytes]:
    """The frames a client might send, and some it should not: other formats, modes and sizes."""
    frame = PIL.Image.open(io.BytesIO(FRAMES[1]))
    gray16 = PIL.Image.fromarray((np.asarray(frame.convert("L"), dtype=np.uint16) * 257))
    return [
        FRAMES[0],
        FRAMES[1],
        encoded(frame, "PNG"),
        encoded(frame.convert("RGBA"), "PNG"),
        encoded(frame.convert("L"), "JPEG"),
        encoded(frame.convert("CMYK"), "JPEG"),
        encoded(frame.convert("P"), "PNG"),
        encoded(frame.convert("1"), "PNG"),
        encoded(gray16, "PNG"),
        encoded(frame, "BMP"),
        encoded(frame, "TIFF"),
        encoded(frame, "WEBP", lossless=True),
        encoded(frame, "GIF"),
        encoded(frame.resize((1, 1)), "PNG"),
        encoded(frame.transpose(PIL.Image.Transpose.ROTATE_90), "JPEG"),
    ]


IMAGES = image_pool()
EDGE_NUMBERS = [0, -1, 1, 0.5, -0.0, 1e-300, 1e308, -1e308, 2**31, 2**53 + 1, 2**63, 2**64 + 1, 10**40, True, False,
                float("nan"), float("inf"), float("-inf")]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(EDGE_NUMBERS),
    lambda children: st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=40,
)
# Objects that look like requests, so the fuzzer gets past the first checks.
request_like = st.dictionaries(
    st.sampled_from(["image", "shapes", "states", "frame", ""]), json_values, max_size=4
) | st.fixed_dictionaries(
    {"image": st.sampled_from([base64.b64encode(i).decode() for i in IMAGES[:3]]) | json_values},
    optional={"shapes": json_values, "states": json_values},
)


def assert_answered(status: int, answer) -> None:
    """A 2xx with one shape and one state per object, or a 4xx with exactly {"error": str}."""
    event(f"status {status}")
    assert status < 500, answer
    if status == 200:
        assert set(answer) == {"shapes", "states"} and len(answer["shapes"]) == len(answer["states"]) > 0
        for shape in answer["shapes"]:
            assert shape is None or (shape["type"] in ("mask", "polygon", "rectangle") and shape["points"])
    else:
        assert 400 <= status < 500 and set(answer) == {"error"} and isinstance(answer["error"], str), answer
        assert len(answer["error"]) < 1000  # a caller's value is never echoed back whole


@fuzz_settings(EXAMPLES * 4)
@given(request_like | json_values)
def test_parser_answers_arbitrary_json_with_a_request_or_a_4xx(payload):
    try:
        if isinstance(payload, dict):
            parse_request(payload, Settings())
    except TrackerError as e:
        assert 400 <= e.status < 500, e


@fuzz_settings(EXAMPLES * 4)
@given(request_like | json_values)
def test_handler_answers_arbitrary_json_with_a_4xx(function, payload):
    assert_answered(*function.call(json.dumps(payload)))


@fuzz_settings(EXAMPLES * 4)
@given(
    st.binary(max_size=300) | st.sampled_from([b"", b"{}", b"[]", b"null", b'{"image": "' + b"A" * 64 + b'"}']),
    st.sampled_from(["text/plain", "application/octet-stream", "application/json; charset=utf-8", ""]),
    st.sampled_from(["POST", "PUT", "PATCH", "DELETE"]),
)
def test_handler_answers_arbitrary_bytes_with_a_4xx(function, body, content_type, method):
    assert_answered(*function.call(body, content_type=content_type, method=method))


# --- mutated valid requests -----------------------------------------------------------------

PROMPTS = [
    {"type": "mask", "points": encode_mask(first_masks()[0])},
    {"type": "polygon", "points": [96, 56, 124, 56, 124, 84, 96, 84]},
    {"type": "rectangle", "points": FIRST_BOXES[0]},
    FIRST_BOXES[1],  # the legacy interface: bare rectangle points
]


@pytest.fixture(scope="module")
def valid_requests(function) -> str:
    """Valid requests, as JSON text to copy from: initialising, continuing and both."""
    states = function.track(FRAMES[0], shapes=PROMPTS)["states"]
    b64 = [base64.b64encode(f).decode() for f in FRAMES[:2]]
    return json.dumps(
        [
            {"image": b64[0], "shapes": PROMPTS, "states": []},
            {"image": b64[1], "shapes": [None] * len(states), "states": states},
            {"image": b64[1], "shapes": [PROMPTS[0], None, None, PROMPTS[3]], "states": states},
            {"image": b64[1], "states": states[:2]},
            *({"image": b64[0], "shapes": [prompt], "states": []} for prompt in PROMPTS),
            *({"image": b64[1], "shapes": [None], "states": [state]} for state in states),
        ]
    )


def paths(value, prefix=()):
    """Every path into a JSON value, the value itself included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, prefix + (index,))


def get(value, path):
    for step in path:
        value = value[step]
    return value


def put(value, path, new):
    if not path:
        return new
    get(value, path[:-1])[path[-1]] = new
    return value


def mutate_image(data, value) -> str:
    """Another frame from the pool, or this one, with its bytes or its base64 text damaged."""
    raw = data.draw(st.sampled_from(IMAGES))
    if isinstance(value, str) and data.draw(st.booleans()):
        try:
            raw = base64.b64decode(value + "==")  # lenient: earlier mutations may have damaged it
        except ValueError:
            pass  # damaged beyond reading: damage a frame from the pool instead
    how = data.draw(st.sampled_from(["as is", "flip", "cut", "insert", "text"]))
    if how == "flip" and raw:
        at = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
    elif how == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif how == "insert":
        at = data.draw(st.integers(0, len(raw)))
        raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=64)) + raw[at:]
    text = base64.b64encode(raw).decode()
    if how == "text":
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.text(min_size=1, max_size=4)) + text[at:]
    return text


def mutate(data, body):
    """`body` with one mutation: a quarter of them to the image, the rest anywhere in the JSON."""
    if isinstance(body, dict) and data.draw(st.integers(0, 3)) == 0:
        body["image"] = mutate_image(data, body.get("image"))
        return body
    path = data.draw(st.sampled_from(list(paths(body))))
    value = get(body, path)
    how = data.draw(st.sampled_from(["replace", "edge", "drop", "cut", "grow", "hex", "nudge", "nudge"]))
    if how == "replace":
        return put(body, path, data.draw(json_values))
    if how == "edge":
        return put(body, path, data.draw(st.sampled_from(EDGE_NUMBERS)))
    if how == "drop" and path:
        del get(body, path[:-1])[path[-1]]
        return body
    if how == "cut" and isinstance(value, list):
        return put(body, path, value[: data.draw(st.integers(0, len(value)))])
    if how == "grow" and isinstance(value, list) and value:
        return put(body, path, value + [data.draw(st.sampled_from(value))] * data.draw(st.integers(1, 3)))
    if how == "hex" and isinstance(value, str) and value:  # a state id or token off by one digit
        at = data.draw(st.integers(0, len(value) - 1))
        return put(body, path, value[:at] + data.draw(st.sampled_from("0123456789abcdefX")) + value[at + 1 :])
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # a coordinate or frame index moved
        return put(body, path, value + data.draw(st.sampled_from([-1000, -5, -1, 1, 5, 1000, 0.25])))
    return body


@fuzz_settings(EXAMPLES)
@given(st.data())
def test_handler_answers_mutated_requests_with_a_2xx_or_a_4xx(function, valid_requests, data):
    body = data.draw(st.sampled_from(json.loads(valid_requests)))
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]))):
        body = mutate(data, body)
    as_bytes = data.draw(st.booleans())
    content_type = "application/json; charset=utf-8" if as_bytes else "application/json"
    assert_answered(*function.call(json.dumps(body).encode() if as_bytes else body, content_type=content_type))


# --- stored state: whatever bytes a store hands back, the answer is 409 or 410 ---------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def tracked_to_frame_3(function):
    """An object tracked to frame 3 in the embedded store, and the request for frame 4."""
    frames = make_frames(5, seed=11)
    states = function.track(frames[0], shapes=[{"type": "mask", "points": encode_mask(first_masks()[0])}])["states"]
    for frame in frames[1:4]:
        states = function.track(frame, states=states)["states"]
    request = {"image": base64.b64encode(frames[4]).decode(), "shapes": [None], "states": states}
    store = function.context.user_data.service.store
    return request, store._sessions.peek(states[0]["id"])[1]  # the session's fields, to corrupt in place


@pytest.fixture(scope="module")
def stored(function):
    """A request that continues an object: it reads the object's header, tokens and memories."""
    return tracked_to_frame_3(function)


@pytest.fixture(scope="module")
def replayed(function):
    """A request sent again after it was answered: it reads the stored answer (o:4) instead."""
    request, fields = tracked_to_frame_3(function)
    status, _ = function.call(request)
    assert status == 200
    return request, fields


def corruptions(original: bytes) -> st.SearchStrategy:
    """Bytes that are not `original`: random, other msgpack values, or the stored map with one
    entry (at any depth) replaced by an arbitrary value."""
    import msgpack

    try:
        value = msgpack.unpackb(original, raw=False)
    except ValueError:  # a token: raw bytes, not msgpack
        value = None

    def replaced(path_and_new):
        path, new = path_and_new
        copy = msgpack.unpackb(original, raw=False)
        target = copy
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = new
        return msgpack.packb(copy, use_bin_type=True)

    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, child in node.items():
                paths.append(path + [key])
                walk(child, path + [key])

    walk(value, [])
    strategies = [st.binary(max_size=256), msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True))]
    if paths:
        strategies.append(st.tuples(st.sampled_from(paths), msgpack_values).map(replaced))
    def differs(data: bytes) -> bool:  # in value, not only in bytes (1 and True are equal in Python)
        try:
            return msgpack.unpackb(data, raw=False) != value
        except Exception:
            return data != original

    return st.one_of(strategies).filter(differs)


@fuzz_settings(EXAMPLES * 2)
@given(st.data())
def test_any_bytes_in_any_stored_field_give_409_or_410(function, stored, replayed, data):
    case = data.draw(st.sampled_from(["continue", "replay"]), label="case")
    request, fields = stored if case == "continue" else replayed
    read = ["hdr", "cond", "s:3", "p:1", "p:3", "m:2", "m:3"] if case == "continue" else ["hdr", "s:3", "s:4", "o:4"]
    name = data.draw(st.sampled_from(read), label="field")
    saved = dict(fields)
    corrupt = data.draw(corruptions(saved[name]).filter(lambda b: name != "o:4" or not a_valid_answer(b)))
    fields[name] = corrupt
    event(f"{name}: {len(corrupt)} bytes")
    try:
        status, answer = function.call(request)
    finally:
        fields.clear()
        fields.update(saved)
    assert "states[0]" in answer["error"], (status, answer)
    if status == 400:  # a well-formed header of another frame size: indistinguishable from a wrong frame
        assert name == "hdr" and "frames of one task must have one size" in answer["error"]
    else:
        assert status in (409, 410) and "re-initialize" in answer["error"], (status, answer)


def a_valid_answer(data: bytes) -> bool:
    """Bytes that decode to an answer the function could have stored (null, or a mask shape): in
    place of the real one they cannot be told apart, like tensor bytes of the right length."""
    from state_codec import StateCorrupt, decode_output

    try:
        decode_output(data, shape_type="mask")
        return True
    except StateCorrupt:
        return False


def test_a_corrupt_stored_answer_names_the_object(function, replayed):
    request, fields = replayed
    saved = dict(fields)
    try:
        fields["o:4"] = b"\xc1"  # a byte msgpack never writes
        status, answer = function.call(request)  # the retry reads the stored answer
    finally:
        fields.clear()
        fields.update(saved)
    assert status == 410, answer
    assert "states[0]" in answer["error"] and "re-initialize" in answer["error"]

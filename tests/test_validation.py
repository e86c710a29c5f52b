"""Hostile input: every bad request gets a 4xx whose JSON {"error": ...} names the field.

One test per case of issue 5. Each goes through the real handler (`function`), and each
refusal is checked for its status, the error format and the field the message names. The last
section shows that a request refused for one object advances no object.
"""

import base64
import dataclasses
import io
import json
import os
import struct
import zlib

import PIL.Image
import pytest
import yaml
from cvat_sdk.masks import encode_mask

from support import CONFIG, FIRST_BOXES, FRAME_H, FRAME_W, OVERRIDES, ROOT, first_masks, make_checkpoint, make_frames
from config import Settings
from model_handler import load_tracker
from protocol import decode_image
from state_store import EmbeddedStore
from tracking import ObjectRequest, TrackingService

FRAMES = make_frames(3)
BOX = {"type": "rectangle", "points": FIRST_BOXES[0]}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(*, image: bytes = FRAMES[0], shapes=None, states=None) -> dict:
    return {"image": b64(image), "shapes": [BOX] if shapes is None else shapes, "states": states or []}


def refused(function, body, status: int, *names: str, content_type="application/json") -> str:
    """Send `body`; assert the status, that the answer is exactly {"error": str}, and that it names `names`."""
    got, answer = function.call(body, content_type=content_type)
    assert got == status, answer
    assert set(answer) == {"error"} and isinstance(answer["error"], str), answer
    for name in names:
        assert name in answer["error"], (name, answer["error"])
    return answer["error"]


def with_shape(shape) -> dict:
    return request(shapes=[BOX, shape])  # the first object is valid: the second alone is refused


@pytest.fixture
def limits(function, monkeypatch):
    """Run the function with some request limits changed, as if set in its environment."""

    def apply(**changes):
        settings = dataclasses.replace(function.context.user_data.settings, **changes)
        monkeypatch.setattr(function.context.user_data, "settings", settings)

    return apply


@pytest.fixture(scope="module")
def started(function) -> list[dict]:
    """States of the two objects of FIRST_BOXES, initialised on frame 0.

    Shared by the tests that refuse them: a refused request advances no state (see the last tests).
    """
    shapes = [{"type": "rectangle", "points": box} for box in FIRST_BOXES]
    return function.track(FRAMES[0], shapes=shapes)["states"]


def png(width: int, height: int, *, rows: bool = True) -> bytes:
    """An 8-bit grayscale PNG of zeros; without `rows`, only its header (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compressobj(9)
    idat = b"".join(pixels.compress(bytes(width + 1)) for _ in range(height)) if rows else b""
    idat += pixels.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# --- body -----------------------------------------------------------------------------------


def test_body_that_is_not_json_is_refused(function):
    refused(function, b"{image: nope", 400, "request body", "JSON", content_type="text/plain")


def test_body_that_is_not_utf8_is_refused(function):
    refused(function, b'{"image": "\xff\xfe"}', 400, "request body", content_type="application/octet-stream")


def test_body_with_an_integer_too_long_to_parse_is_refused(function):
    refused(function, b'{"image": ' + b"9" * 5000 + b"}", 400, "request body", content_type="text/plain")


def test_body_nested_too_deep_to_parse_is_refused(function):
    refused(function, b"[" * 100_000 + b"]" * 100_000, 400, "request body", content_type="text/plain")


def test_empty_body_is_refused(function):
    refused(function, b"", 400, "request body", content_type="text/plain")


@pytest.mark.parametrize("body", [[], [1, 2], "text", 3, None, True], ids=repr)
def test_json_that_is_not_an_object_is_refused(function, body):
    refused(function, json.dumps(body), 400, "request body", "JSON")


def test_missing_image_is_refused(function):
    body = request()
    del body["image"]
    refused(function, body, 400, "'image'")


@pytest.mark.parametrize("image", [None, 42, [], {}, "", True], ids=repr)
def test_image_of_the_wrong_type_is_refused(function, image):
    refused(function, {**request(), "image": image}, 400, "'image'", "base64")


def test_missing_shapes_and_states_are_refused(function):
    refused(function, {"image": b64(FRAMES[0])}, 400, "'shapes'", "missing")


@pytest.mark.parametrize("shapes", [{}, "rectangle", 7, True], ids=repr)
def test_shapes_of_the_wrong_type_are_refused(function, shapes):
    refused(function, {**request(), "shapes": shapes}, 400, "'shapes'", "list")


@pytest.mark.parametrize("states", [{}, "state", 7], ids=repr)
def test_states_of_the_wrong_type_are_refused(function, states):
    refused(function, {**request(), "states": states}, 400, "'states'", "list")


def test_request_without_any_object_is_refused(function):
    refused(function, request(shapes=[], states=[]), 400, "'shapes'", "empty")


def test_null_shape_without_a_state_is_refused(function):
    refused(function, request(shapes=[BOX, None]), 400, "shapes[1]", "states[1]")


# --- image ----------------------------------------------------------------------------------


@pytest.mark.parametrize("image", ["not base64!", "QUJ", "data:image/jpeg;base64,/9j/4AAQ", "é"], ids=repr)
def test_invalid_base64_is_refused(function, image):
    refused(function, {**request(), "image": image}, 400, "'image'", "base64")


@pytest.mark.parametrize(
    "data", [b"hello, world", b"\x89PNG\r\n\x1a\n", bytes(1000)], ids=["text", "png-magic", "zeros"]
)
def test_bytes_that_are_not_an_image_are_refused(function, data):
    refused(function, request(image=data), 400, "'image'", "JPEG")


def test_truncated_jpeg_is_refused(function):
    refused(function, request(image=FRAMES[0][: len(FRAMES[0]) // 2]), 400, "'image'", "truncated")


def test_truncated_png_is_refused(function):
    data = encoded(PIL.Image.open(io.BytesIO(FRAMES[0])), "PNG")
    refused(function, request(image=data[: len(data) // 2]), 400, "'image'", "truncated")


def test_image_in_a_format_outside_the_allowed_list_is_refused(function):
    data = encoded(PIL.Image.open(io.BytesIO(FRAMES[0])).convert("P"), "GIF")
    refused(function, request(image=data), 400, "'image'", "PNG")


def test_decompression_bomb_over_the_default_pixel_limit_is_refused_before_decoding(function):
    bomb = png(8000, 8000)  # 64M pixels in about 64 KiB
    assert len(bomb) < 200_000 and 8000 * 8000 > Settings().max_image_pixels
    refused(function, request(image=bomb), 400, "'image'", "8000x8000", "SAM2_MAX_IMAGE_PIXELS")


def test_decompression_bomb_beyond_pillows_own_limit_is_refused(function):
    refused(function, request(image=png(100_000, 100_000, rows=False)), 400, "'image'", "SAM2_MAX_IMAGE_PIXELS")


def test_pixel_limit_is_configurable(function, limits):
    limits(max_image_pixels=FRAME_W * FRAME_H - 1)
    refused(function, request(), 400, "'image'", f"{FRAME_W}x{FRAME_H}", "SAM2_MAX_IMAGE_PIXELS")


def test_default_pixel_limit_admits_8k_frames():
    assert Settings().max_image_pixels >= 7680 * 4320
    image, _ = decode_image(b64(png(7680, 4320)), max_pixels=Settings().max_image_pixels)
    assert image.size == (7680, 4320) and image.mode == "RGB"


def test_frame_of_another_size_than_the_state_is_refused(function, started):
    other = make_frames(1, width=FRAME_H, height=FRAME_W)[0]  # same pixel count, rotated
    refused(function, request(image=other, shapes=[None, None], states=started), 400, "image", "states[0]", "size")


# --- counts ---------------------------------------------------------------------------------


def test_shapes_and_states_of_different_lengths_are_refused(function, started):
    refused(function, request(shapes=[None], states=started), 400, "'shapes'", "'states'")


def test_too_many_objects_are_refused(function, limits):
    limits(max_objects=2)
    refused(function, request(shapes=[BOX] * 3), 400, "3 objects", "SAM2_MAX_OBJECTS")


# --- shape types ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ellipse", "points", "cuboid", "skeleton", "Rectangle", None, 3, ["mask"]], ids=repr)
def test_unknown_or_unsupported_shape_type_is_refused(function, kind):
    refused(function, with_shape({"type": kind, "points": [1, 1, 9, 9]}), 400, "shapes[1].type")


def test_long_shape_type_is_not_echoed_back(function):
    error = refused(function, with_shape({"type": "x" * 100_000, "points": [1, 1, 9, 9]}), 400, "shapes[1].type")
    assert len(error) < 200


@pytest.mark.parametrize("shape", ["rectangle", 5, {"points": [1, 2, 3, 4]}], ids=repr)
def test_shape_that_is_not_an_object_with_a_type_is_refused(function, shape):
    refused(function, with_shape(shape), 400, "shapes[1]")


@pytest.mark.parametrize(
    "points", [None, "1,2,3,4", [1, 2, "3", 4], [1, 2, True, 4], [[1, 2], [3, 4]], {"x": 1}], ids=repr
)
def test_points_that_are_not_a_list_of_numbers_are_refused(function, points):
    refused(function, with_shape({"type": "rectangle", "points": points}), 400, "shapes[1].points", "numbers")


def test_number_too_large_for_a_float_is_refused(function):
    refused(function, with_shape({"type": "rectangle", "points": [1, 1, 10**400, 9]}), 400, "shapes[1].points")


# --- masks ----------------------------------------------------------------------------------


def mask(points) -> dict:
    return {"type": "mask", "points": points}


def test_mask_runs_that_do_not_add_up_to_the_box_are_refused(function):
    refused(function, with_shape(mask([0, 6, 3, 2, 1, 4, 2])), 400, "shapes[1]", "add up to 9", "holds 6")


def test_mask_with_a_negative_run_is_refused(function):
    refused(function, with_shape(mask([3, -1, 4, 1, 1, 4, 2])), 400, "shapes[1].points", "negative")


def test_mask_with_a_non_integer_run_is_refused(function):
    refused(function, with_shape(mask([0.5, 5.5, 2, 1, 4, 2])), 400, "shapes[1].points", "integers")


def test_mask_with_huge_runs_that_wrap_around_to_the_box_area_is_refused(function):
    # Summed in int64, these would wrap to exactly 6; checking each run first refuses them.
    runs = [2**62, 2**62, 2**62, 2**62 + 6]
    refused(function, with_shape(mask(runs + [2, 1, 4, 2])), 400, "shapes[1]", "run longer than its box")


@pytest.mark.parametrize(
    "box", [[-1, 0, 3, 1], [2, 1, FRAME_W, 2], [2, 1, 4, FRAME_H], [4, 1, 2, 2], [10**12, 0, 10**12, 0]], ids=repr
)
def test_mask_box_outside_the_image_is_refused(function, box):
    left, top, right, bottom = box
    area = max(right - left + 1, 1) * max(bottom - top + 1, 1)
    refused(function, with_shape(mask([0, area] + box)), 400, "shapes[1]", "not inside")


def test_empty_mask_is_refused(function):
    refused(function, with_shape(mask([6, 2, 1, 4, 2])), 400, "shapes[1]", "empty mask")


def test_mask_without_runs_is_refused(function):
    refused(function, with_shape(mask([2, 1, 4, 2])), 400, "shapes[1].points", "run lengths")


# --- polygons -------------------------------------------------------------------------------


def polygon(points) -> dict:
    return {"type": "polygon", "points": points}


def test_polygon_of_fewer_than_3_points_is_refused(function):
    refused(function, with_shape(polygon([10, 10, 30, 10])), 400, "shapes[1].points", "at least 3")


def test_polygon_with_an_odd_count_of_numbers_is_refused(function):
    refused(function, with_shape(polygon([10, 10, 30, 10, 20, 30, 5])), 400, "shapes[1].points", "pairs")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=repr)
def test_polygon_with_nan_or_infinity_is_refused(function, bad):
    refused(function, with_shape(polygon([10, 10, 30, bad, 20, 30])), 400, "shapes[1].points", "NaN")


def test_polygon_entirely_outside_the_image_is_refused(function):
    outside = polygon([FRAME_W + 10, 10, FRAME_W + 40, 10, FRAME_W + 20, 40])
    refused(function, with_shape(outside), 400, "shapes[1]", "outside")


def test_polygon_coordinates_outside_the_image_are_clipped(function):
    inside = [20, 30, FRAME_W - 1, 30, FRAME_W - 1, FRAME_H - 1, 20, FRAME_H - 1]
    outside = [20, 30, FRAME_W + 500, 30, FRAME_W + 500, FRAME_H + 500, 20, FRAME_H + 500]
    answer = function.track(FRAMES[0], shapes=[polygon(inside), polygon(outside)])
    assert answer["shapes"][0] is not None and answer["shapes"][0] == answer["shapes"][1]


# --- rectangles -----------------------------------------------------------------------------


@pytest.mark.parametrize("points", [[10, 10, 10, 40], [10, 10, 40, 10], [5, 5, 5, 5]], ids=repr)
def test_rectangle_of_zero_area_is_refused(function, points):
    refused(function, with_shape({"type": "rectangle", "points": points}), 400, "shapes[1]", "zero area")


def test_rectangle_entirely_outside_the_image_is_refused(function):
    points = [FRAME_W + 1, 10, FRAME_W + 40, 40]
    refused(function, with_shape({"type": "rectangle", "points": points}), 400, "shapes[1]", "zero area")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=repr)
def test_rectangle_with_nan_is_refused(function, bad):
    refused(function, with_shape({"type": "rectangle", "points": [10, bad, 40, 40]}), 400, "shapes[1].points", "NaN")


@pytest.mark.parametrize("points", [[10, 10, 40], [10, 10, 40, 40, 50]], ids=repr)
def test_rectangle_without_exactly_4_numbers_is_refused(function, points):
    refused(function, with_shape({"type": "rectangle", "points": points}), 400, "shapes[1].points", "[x1, y1, x2, y2]")


def test_rectangle_with_swapped_corners_is_normalised(function):
    x1, y1, x2, y2 = FIRST_BOXES[0]
    orders = [[x1, y1, x2, y2], [x2, y2, x1, y1], [x2, y1, x1, y2]]
    answer = function.track(FRAMES[0], shapes=[{"type": "rectangle", "points": p} for p in orders])
    assert answer["shapes"][0] is not None
    assert answer["shapes"][0] == answer["shapes"][1] == answer["shapes"][2]


def test_legacy_bare_point_list_is_a_rectangle(function):
    answer = function.track(FRAMES[0], shapes=[FIRST_BOXES[0], BOX])
    assert answer["shapes"][0] == answer["shapes"][1] and answer["shapes"][0]["type"] == "rectangle"


# --- states ---------------------------------------------------------------------------------


def continuing(states) -> dict:
    return request(image=FRAMES[1], shapes=[None] * len(states), states=states)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: "a state",
        lambda s: [s],
        lambda s: {k: v for k, v in s.items() if k != "tok"},
        lambda s: {**s, "v": 2},
        lambda s: {**s, "id": s["id"].upper()},
        lambda s: {**s, "id": s["id"][:-1]},
        lambda s: {**s, "id": 12345},
        lambda s: {**s, "t": -1},
        lambda s: {**s, "t": 1.5},
        lambda s: {**s, "t": True},
        lambda s: {**s, "t": 2**40},
        lambda s: {**s, "tok": "xyz"},
    ],
    ids=["text", "list", "no-tok", "version", "id-upper", "id-short", "id-int", "t-neg", "t-float", "t-bool",
         "t-huge", "tok-short"],
)
def test_state_of_the_wrong_structure_is_refused(function, started, change):
    refused(function, continuing([started[0], change(started[1])]), 400, "states[1]")


def test_state_with_an_unknown_id_is_refused(function, started):
    forged = {**started[1], "id": "0123456789abcdef0123456789abcdef"}
    refused(function, continuing([started[0], forged]), 410, "states[1]", "unknown", "re-initialize")


def test_state_with_a_forged_token_is_refused(function, started):
    forged = {**started[1], "tok": "0" * 16}
    refused(function, continuing([started[0], forged]), 409, "states[1]", "re-initialize")


def test_state_with_a_forged_frame_index_is_refused(function, started):
    forged = {**started[1], "t": 5}
    refused(function, continuing([started[0], forged]), 409, "states[1]", "re-initialize")


def test_state_of_another_object_id_with_this_token_is_refused(function, started):
    swapped = {**started[1], "id": started[0]["id"]}
    refused(function, continuing([started[0], swapped]), 409, "states[1]", "re-initialize")


def test_state_made_by_another_model_is_refused(function, tmp_path):
    """Two deployments with different weights sharing one store: neither accepts the other's states."""
    path = str(tmp_path / "other.pt")
    make_checkpoint(path, seed=1)
    tracker = load_tracker(Settings(config=CONFIG, checkpoint=path, config_overrides=OVERRIDES, device="cpu"))
    other = TrackingService(tracker, function.context.user_data.service.store, polygon_tolerance=1.0)
    image, digest = decode_image(b64(FRAMES[0]), max_pixels=10**8)
    states = other.track(image=image, frame_digest=digest, objects=[ObjectRequest(shape=BOX, state=None)])["states"]
    refused(function, continuing(states), 409, "states[0]", "different model", "re-initialize")


def test_expired_state_is_refused(function, monkeypatch):
    now = [1000.0]
    service = function.context.user_data.service
    store = EmbeddedStore(ttl_s=60, max_bytes=2**30, clock=lambda: now[0])
    monkeypatch.setattr(
        function.context.user_data, "service", TrackingService(service.tracker, store, polygon_tolerance=1.0)
    )
    states = function.track(FRAMES[0], shapes=[BOX])["states"]
    now[0] += 61
    refused(function, continuing(states), 410, "states[0]", "expired", "re-initialize")


# --- size -----------------------------------------------------------------------------------


def test_oversize_body_is_refused(function, limits):
    limits(max_body_bytes=1000)
    body = json.dumps(request()).encode()
    assert len(body) > 1000
    refused(function, body, 413, "request body", "SAM2_MAX_BODY_BYTES", content_type="application/octet-stream")


def test_limits_are_read_from_the_environment():
    env = {"SAM2_MAX_OBJECTS": "3", "SAM2_MAX_IMAGE_PIXELS": "1000", "SAM2_MAX_BODY_BYTES": "2000"}
    settings = Settings.from_env(env)
    assert (settings.max_objects, settings.max_image_pixels, settings.max_body_bytes) == (3, 1000, 2000)
    with pytest.raises(ValueError, match="SAM2_MAX_OBJECTS"):
        Settings.from_env({"SAM2_MAX_OBJECTS": "0"})


@pytest.mark.parametrize("name", ["function.yaml", "function-gpu.yaml"])
def test_body_limit_matches_the_triggers_max_request_body_size(name):
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        pytest.skip(f"no {name}")
    with open(path) as f:
        spec = yaml.safe_load(f)["spec"]
    env = {item["name"]: item.get("value") for item in spec.get("env", [])}
    limit = int(env.get("SAM2_MAX_BODY_BYTES", Settings().max_body_bytes))
    sizes = [t["attributes"]["maxRequestBodySize"] for t in spec["triggers"].values() if t.get("kind") == "http"]
    assert sizes and all(size == limit for size in sizes)


# --- all or nothing -------------------------------------------------------------------------


BAD_SECOND_OBJECT = {
    "forged token (409)": (409, lambda states: ([None, None], [states[0], {**states[1], "tok": "0" * 16}])),
    "unknown id (410)": (410, lambda states: ([None, None], [states[0], {**states[1], "id": "f" * 32}])),
    "malformed state (400)": (400, lambda states: ([None, None], [states[0], {**states[1], "t": "one"}])),
    "invalid shape (400)": (400, lambda states: ([None, mask([1, 2, 3, 4, 5])], states)),
}


PROMPTS = [mask(encode_mask(first_masks()[0])), BOX]


@pytest.fixture(scope="module")
def control(function) -> list[list]:
    """The shapes answered for frames 1 and 2 when no request is refused in between."""
    states = function.track(FRAMES[0], shapes=PROMPTS)["states"]
    answers = []
    for frame in FRAMES[1:3]:
        answer = function.track(frame, states=states)
        answers.append(answer["shapes"])
        states = answer["states"]
    return answers


@pytest.mark.parametrize("case", BAD_SECOND_OBJECT, ids=list(BAD_SECOND_OBJECT))
def test_request_refused_for_one_object_advances_no_object(function, control, case):
    status, make_bad = BAD_SECOND_OBJECT[case]
    states = function.track(FRAMES[0], shapes=PROMPTS)["states"]

    bad_shapes, bad_states = make_bad(states)
    refused(function, request(image=FRAMES[1], shapes=bad_shapes, states=bad_states), status, "[1]")
    store = function.context.user_data.service.store
    for state in states:
        assert store.read(state["id"], ["s:1", "o:1", "p:1", "m:1"]) == {}  # nothing written for frame 1

    # Both objects' next frames are exactly what they are without the refused request.
    for frame, expected in zip(FRAMES[1:3], control):
        answer = function.track(frame, states=states)
        assert answer["shapes"] == expected and all(shape is not None for shape in expected)
        states = answer["states"]
    assert [s["t"] for s in states] == [2, 2]

"""Property tests of the shape codecs; cvat_sdk.masks is the reference for mask RLE.

Whatever a caller sends as a shape, decoding returns a prompt or raises BadRequest (a 400), and
what the function answers is always a shape it would accept back.
"""

import math

import pytest

import cv2
import numpy as np
from cvat_sdk import masks as cvat
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from errors import BadRequest
from shapes import MAX_POLYGON_REACH, SHAPE_TYPES, decode_shape, encode_shape

# derandomize: CI sees the same examples on every run.
settings.register_profile(
    "shapes", max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
PROPERTY = settings.get_profile("shapes")

sizes = st.tuples(st.integers(1, 48), st.integers(1, 48))  # width, height
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
anything_numeric = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(), st.sampled_from([0, -1, 0.5, 2**63, float("nan"), float("inf")])
)


@st.composite
def frame_masks(draw, *, nonempty: bool = True):
    """(width, height, mask): noisy masks, and masks made of a few rectangles (contiguous parts)."""
    width, height = draw(sizes)
    if draw(st.booleans()):
        mask = draw(arrays(np.bool_, (height, width)))
    else:
        mask = np.zeros((height, width), dtype=bool)
        for _ in range(draw(st.integers(1, 3))):
            x1, x2 = sorted(draw(st.tuples(st.integers(0, width), st.integers(0, width))))
            y1, y2 = sorted(draw(st.tuples(st.integers(0, height), st.integers(0, height))))
            mask[y1:y2, x1:x2] = True
    if nonempty:
        assume(mask.any())
    return width, height, mask


def decode(shape, width, height):
    return decode_shape(shape, width=width, height=height, field="shapes[0]")


def decode_or_refuse(shape, width, height):
    """The decoded prompt, or None when refused; anything but BadRequest fails the test."""
    try:
        return decode(shape, width, height)
    except BadRequest as e:
        assert str(e).startswith("shapes[0]")  # the message names the field
        return None


# --- masks, against cvat_sdk.masks ----------------------------------------------------------


@PROPERTY
@given(frame_masks())
def test_mask_encoding_equals_cvat_sdk(case):
    width, height, mask = case
    points = encode_shape(mask, "mask", tolerance=1.0)["points"]
    assert points == cvat.encode_mask(mask)
    assert np.array_equal(cvat.decode_mask(points, image_width=width, image_height=height), mask)


@PROPERTY
@given(frame_masks(), st.data())
def test_mask_decoding_reads_what_cvat_sdk_writes(case, data):
    width, height, mask = case
    ys, xs = np.nonzero(mask)
    # cvat_sdk may encode any box that contains the mask, not only the tightest one.
    x1 = data.draw(st.integers(0, int(xs.min())))
    y1 = data.draw(st.integers(0, int(ys.min())))
    x2 = data.draw(st.integers(int(xs.max()) + 1, width))
    y2 = data.draw(st.integers(int(ys.max()) + 1, height))
    points = cvat.encode_mask(mask, bbox=[x1, y1, x2, y2])
    assert np.array_equal(decode({"type": "mask", "points": points}, width, height).mask, mask)


@st.composite
def mask_points(draw):
    """Mask points near the valid ones: runs that may not add up, boxes that may stick out."""
    width, height = draw(sizes)
    left, right = sorted(draw(st.tuples(st.integers(-2, width + 1), st.integers(-2, width + 1))))
    top, bottom = sorted(draw(st.tuples(st.integers(-2, height + 1), st.integers(-2, height + 1))))
    if draw(st.booleans()):
        left, right = right, left
    area = max(right - left + 1, 0) * max(bottom - top + 1, 0)
    runs = draw(st.lists(st.integers(-2, max(area, 1) + 2), max_size=12))
    if draw(st.booleans()) and area:  # make the runs add up, so the deeper checks run
        runs.append(max(area - sum(runs), 0))
    return width, height, runs + [left, top, right, bottom]


@PROPERTY
@given(mask_points())
def test_mask_decoding_agrees_with_cvat_sdk(case):
    width, height, points = case
    ours = decode_or_refuse({"type": "mask", "points": points}, width, height)
    try:
        theirs = cvat.decode_mask(points, image_width=width, image_height=height)
    except ValueError:
        theirs = None
    if ours is None:
        assert theirs is None or not theirs.any()  # an empty mask is refused: it tracks nothing
    else:
        assert theirs is not None and np.array_equal(ours.mask, theirs)


@PROPERTY
@given(sizes, st.lists(anything_numeric, max_size=12))
def test_mask_decoding_refuses_any_bad_number_with_a_400(size, points):
    decode_or_refuse({"type": "mask", "points": points}, *size)


# --- rectangles -----------------------------------------------------------------------------


@PROPERTY
@given(sizes, st.data())
def test_rectangle_round_trips_through_its_mask(size, data):
    width, height = size
    x1, x2 = sorted(data.draw(st.lists(st.integers(0, width), min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(data.draw(st.lists(st.integers(0, height), min_size=2, max_size=2, unique=True)))
    assert decode({"type": "rectangle", "points": [x1, y1, x2, y2]}, width, height).box == (x1, y1, x2, y2)
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    assert encode_shape(mask, "rectangle", tolerance=1.0)["points"] == [x1, y1, x2, y2]


@PROPERTY
@given(sizes, st.lists(finite, min_size=4, max_size=4))
def test_rectangle_corners_in_any_order_give_one_box_inside_the_frame(size, points):
    width, height = size
    x1, y1, x2, y2 = points
    prompt = decode_or_refuse({"type": "rectangle", "points": points}, width, height)
    for swapped in ([x2, y2, x1, y1], [x2, y1, x1, y2], [x1, y2, x2, y1]):
        again = decode_or_refuse({"type": "rectangle", "points": swapped}, width, height)
        assert (prompt is None and again is None) or prompt.box == again.box
    if prompt is not None:
        bx1, by1, bx2, by2 = prompt.box
        assert 0 <= bx1 < bx2 <= width and 0 <= by1 < by2 <= height
    else:  # refused only when nothing of it is inside the frame
        assert min(max(x1, x2), width) <= max(min(x1, x2), 0) or min(max(y1, y2), height) <= max(min(y1, y2), 0)


# --- polygons -------------------------------------------------------------------------------


@PROPERTY
@given(st.tuples(st.integers(2, 48), st.integers(2, 48)), st.data())
def test_polygon_of_a_box_covers_exactly_its_pixels(size, data):
    width, height = size
    x1, x2 = sorted(data.draw(st.lists(st.integers(0, width - 1), min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(data.draw(st.lists(st.integers(0, height - 1), min_size=2, max_size=2, unique=True)))
    expected = np.zeros((height, width), dtype=bool)
    expected[y1 : y2 + 1, x1 : x2 + 1] = True
    points = [x1, y1, x2, y1, x2, y2, x1, y2]
    assert np.array_equal(decode({"type": "polygon", "points": points}, width, height).mask, expected)
    # ... and the polygon answered for that mask is the same ring.
    ring = encode_shape(expected, "polygon", tolerance=1.0)["points"]
    assert np.array_equal(decode({"type": "polygon", "points": ring}, width, height).mask, expected)


def padded_fill(points, width: int, height: int) -> np.ndarray:
    """An independent rasterisation: the polygon filled on a canvas three frames wide and high,
    with the frame in the middle, then cropped to the frame."""
    xy = np.round(np.asarray(points, dtype=np.float64).reshape(-1, 2)).astype(np.int32) + [width, height]
    canvas = np.zeros((3 * height, 3 * width), dtype=np.uint8)
    cv2.fillPoly(canvas, [xy.astype(np.int32)], 1)
    return canvas[height : 2 * height, width : 2 * width].astype(bool)


@PROPERTY
@given(sizes, st.data())
def test_polygon_crossing_the_frame_edges_is_filled_then_cropped(size, data):
    # Vertices up to a frame's width or height beyond each edge, as annotators drag them.
    width, height = size
    n = data.draw(st.integers(3, 8))
    xs = data.draw(st.lists(st.integers(-width, 2 * width - 1), min_size=n, max_size=n))
    ys = data.draw(st.lists(st.integers(-height, 2 * height - 1), min_size=n, max_size=n))
    points = [v for xy in zip(xs, ys) for v in xy]
    expected = padded_fill(points, width, height)
    prompt = decode_or_refuse({"type": "polygon", "points": points}, width, height)
    if expected.any():
        assert prompt is not None and np.array_equal(prompt.mask, expected)
    else:  # no pixel inside the frame: refused
        assert prompt is None


def test_a_triangle_past_the_right_edge_keeps_its_shape():
    width, height = 160, 120
    points = [0, 0, 300, 60, 0, 119]
    mask = decode({"type": "polygon", "points": points}, width, height).mask
    assert np.array_equal(mask, padded_fill(points, width, height))
    # Moving the far vertex onto the edge, to (159, 60), would lose the pixels near the right edge
    # above and below the middle row.
    assert mask[40, 150] and mask[80, 150]


def test_a_polygon_with_no_pixel_in_the_frame_is_refused():
    # Its box overlaps the frame's corner, but the polygon itself stays outside.
    assert decode_or_refuse({"type": "polygon", "points": [-50, 30, 30, -50, -50, -50]}, 160, 120) is None


@PROPERTY
@given(sizes, st.lists(finite, min_size=6, max_size=16).filter(lambda p: len(p) % 2 == 0))
def test_polygon_vertices_anywhere_decode_or_get_a_400(size, points):
    width, height = size
    prompt = decode_or_refuse({"type": "polygon", "points": points}, width, height)
    if prompt is not None:
        assert prompt.mask.shape == (height, width) and prompt.mask.any()


@PROPERTY
@given(sizes, st.lists(anything_numeric, max_size=12))
def test_polygon_decoding_refuses_any_bad_number_with_a_400(size, points):
    decode_or_refuse({"type": "polygon", "points": points}, *size)


# --- every shape the function answers is one it accepts ---------------------------------------


@PROPERTY
@given(frame_masks(), st.sampled_from(SHAPE_TYPES), st.sampled_from([0.5, 1.0, 2.0]))
def test_every_answered_shape_is_accepted_back(case, kind, tolerance):
    width, height, mask = case
    shape = encode_shape(mask, kind, tolerance=tolerance)
    assert shape["type"] == kind and all(math.isfinite(v) for v in shape["points"])
    prompt = decode(shape, width, height)
    ys, xs = np.nonzero(mask)
    if kind == "mask":
        assert np.array_equal(prompt.mask, mask)
    elif kind == "rectangle":
        assert prompt.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    else:  # the largest part's outline: a part of the mask's bounding box, and not empty
        found_ys, found_xs = np.nonzero(prompt.mask)
        assert found_xs.min() >= xs.min() and found_xs.max() <= xs.max()
        assert found_ys.min() >= ys.min() and found_ys.max() <= ys.max()


@PROPERTY
@given(frame_masks())
def test_polygon_answered_for_one_solid_part_decodes_back_to_it(case):
    """A mask that is one filled rectangle comes back exactly, however thin it is."""
    width, height, mask = case
    ys, xs = np.nonzero(mask)
    box = np.zeros_like(mask)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    ring = encode_shape(box, "polygon", tolerance=1.0)["points"]
    assert np.array_equal(decode({"type": "polygon", "points": ring}, width, height).mask, box)


def test_empty_mask_answers_no_shape():
    assert all(encode_shape(np.zeros((5, 7), dtype=bool), kind, tolerance=1.0) is None for kind in SHAPE_TYPES)


json_values = st.recursive(
    st.none() | st.booleans() | anything_numeric | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(
    sizes,
    st.one_of(
        json_values,
        st.fixed_dictionaries({"type": st.sampled_from(SHAPE_TYPES + ("points", "")), "points": json_values}),
        st.fixed_dictionaries({"type": st.sampled_from(SHAPE_TYPES), "points": st.lists(anything_numeric)}),
    ),
)
def test_any_json_as_a_shape_decodes_or_gets_a_400(size, shape):
    prompt = decode_or_refuse(shape, *size)
    if prompt is not None and prompt.mask is not None:
        assert prompt.mask.shape == (size[1], size[0]) and prompt.mask.any()


def test_a_polygon_vertex_far_outside_the_frame_is_refused():
    inside = [10, 10, 100, 10, 100 + MAX_POLYGON_REACH, 60]
    assert decode({"type": "polygon", "points": inside}, 160, 120).mask.any()
    with pytest.raises(BadRequest, match=f"more than {MAX_POLYGON_REACH} pixels outside"):
        decode({"type": "polygon", "points": [10, 10, 100, 10, 160 + MAX_POLYGON_REACH, 60]}, 160, 120)

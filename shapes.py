"""CVAT shapes <-> pixel masks and boxes.

Encodings (CVAT, pixel coordinates, x right, y down):
- rectangle: [x1, y1, x2, y2]
- polygon:   [x1, y1, x2, y2, ...], one ring of at least 3 points, no holes
- mask:      [run lengths..., left, top, right, bottom]; right/bottom inclusive; the runs cover
             the box row by row, alternate background/foreground and start with background.

Output policy: a mask comes back as a mask, a rectangle as the mask's bounding box, and a polygon
as the outer boundary of the mask's largest connected part, simplified with Douglas-Peucker at
`tolerance` pixels. A polygon cannot carry holes or several parts, so those are dropped.
"""

import dataclasses
import reprlib
from typing import Any, Optional

import cv2
import numpy as np

from errors import BadRequest

SHAPE_TYPES = ("mask", "polygon", "rectangle")


# Polygon vertices further than this outside the frame are refused. A polygon is filled on a
# canvas that holds all of it (OpenCV clips a polygon that overflows its canvas by moving its
# edges, which changes pixels well inside), so this bounds that canvas: for an 8K frame, about
# 9700 x 6400 bytes, one polygon at a time.
MAX_POLYGON_REACH = 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prompt:
    """A validated input shape. Rectangles keep their box; masks and polygons keep their compact
    form and are turned into pixels only when the object is started (`mask`), one object at a
    time, so a request's prompts never all hold full-frame arrays at once."""

    type: str  # the CVAT shape type, also the type of every output shape for this object
    width: int
    height: int
    box: Optional[tuple[float, float, float, float]] = None  # rectangle: x1 < x2, y1 < y2, in the frame
    polygon: Optional[np.ndarray] = None  # polygon: [N, 2] int32 vertices, possibly outside the frame
    runs: Optional[np.ndarray] = None  # mask: run lengths over `mask_box`, starting with background
    mask_box: Optional[tuple[int, int, int, int]] = None  # mask: left, top, right, bottom (inclusive)

    @property
    def mask(self) -> Optional[np.ndarray]:
        """The prompt's pixels as a [height, width] bool array (None for a rectangle)."""
        if self.polygon is not None:
            pixels, left, top = _polygon_in_frame(self.polygon, width=self.width, height=self.height)
            mask = np.zeros((self.height, self.width), dtype=bool)
            mask[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
            return mask
        if self.runs is None:
            return None
        left, top, right, bottom = self.mask_box
        values = np.zeros(self.runs.size, dtype=bool)
        values[1::2] = True  # runs alternate, starting with background
        mask = np.zeros((self.height, self.width), dtype=bool)
        mask[top : bottom + 1, left : right + 1] = np.repeat(values, self.runs).reshape(bottom - top + 1, right - left + 1)
        return mask


def _numbers(points: Any, field: str) -> np.ndarray:
    if not isinstance(points, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in points
    ):
        raise BadRequest(f"{field}.points must be a list of numbers")
    try:
        values = np.asarray(points, dtype=np.float64)
    except OverflowError:  # an integer too long for a float, e.g. 10**400
        raise BadRequest(f"{field}.points holds a number out of range") from None
    if not np.isfinite(values).all():
        raise BadRequest(f"{field}.points must not contain NaN or infinity")
    return values


def decode_shape(shape: Any, *, width: int, height: int, field: str) -> Prompt:
    """Validate one CVAT shape and turn it into a prompt for a width x height frame."""
    if isinstance(shape, list):  # legacy tracker interface: bare rectangle points
        shape = {"type": "rectangle", "points": shape}
    if not isinstance(shape, dict):
        raise BadRequest(f"{field} must be an object with 'type' and 'points'")
    kind = shape.get("type")
    if kind not in SHAPE_TYPES:
        raise BadRequest(f"{field}.type must be one of {', '.join(SHAPE_TYPES)}, got {reprlib.repr(kind)}")
    points = _numbers(shape.get("points"), field)
    size = {"type": kind, "width": width, "height": height}
    if kind == "rectangle":
        return Prompt(**size, box=_decode_rectangle(points, width=width, height=height, field=field))
    if kind == "polygon":
        return Prompt(**size, polygon=_decode_polygon(points, width=width, height=height, field=field))
    runs, box = _decode_mask(points, width=width, height=height, field=field)
    return Prompt(**size, runs=runs, mask_box=box)


def _decode_rectangle(points: np.ndarray, *, width: int, height: int, field: str):
    if points.size != 4:
        raise BadRequest(f"{field}.points of a rectangle must be [x1, y1, x2, y2]")
    x1, x2 = sorted(np.clip(points[0::2], 0, width).tolist())
    y1, y2 = sorted(np.clip(points[1::2], 0, height).tolist())
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        raise BadRequest(f"{field} is a rectangle of zero area inside the frame")
    return (x1, y1, x2, y2)


def _decode_polygon(points: np.ndarray, *, width: int, height: int, field: str) -> np.ndarray:
    """The polygon's vertices, refused if it has no pixel inside the frame.

    The prompt is the polygon filled as if on an unbounded plane, then cropped to the frame:
    vertices past the frame's edge (annotators often drag them there) are not moved, since that
    would change the polygon's shape.
    """
    if points.size % 2 or points.size < 6:
        raise BadRequest(f"{field}.points of a polygon must hold at least 3 (x, y) pairs")
    reach = MAX_POLYGON_REACH
    xs, ys = points[0::2], points[1::2]
    if xs.min() < -reach or ys.min() < -reach or xs.max() > width - 1 + reach or ys.max() > height - 1 + reach:
        raise BadRequest(f"{field} has a polygon vertex more than {reach} pixels outside the {width}x{height} frame")
    xy = np.round(points.reshape(-1, 2)).astype(np.int32)
    if not _polygon_in_frame(xy, width=width, height=height)[0].any():
        raise BadRequest(f"{field} is a polygon with no pixel inside the {width}x{height} frame (it lies outside)")
    return xy


def _polygon_in_frame(xy: np.ndarray, *, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """(pixels, left, top): the polygon's pixels within the frame, over the part of the frame
    that its bounding box covers, whose top-left corner is (left, top)."""
    origin = xy.min(axis=0)
    size = xy.max(axis=0) - origin + 1
    canvas = np.zeros((size[1], size[0]), dtype=np.uint8)  # holds the whole polygon
    cv2.fillPoly(canvas, [xy - origin], 1)
    left, top = max(int(origin[0]), 0), max(int(origin[1]), 0)
    right, bottom = min(int(origin[0] + size[0]), width), min(int(origin[1] + size[1]), height)
    if left >= right or top >= bottom:
        return np.zeros((0, 0), dtype=bool), 0, 0
    crop = canvas[top - origin[1] : bottom - origin[1], left - origin[0] : right - origin[0]]
    return crop.astype(bool), left, top


def _decode_mask(points: np.ndarray, *, width: int, height: int, field: str):
    """Validated (run lengths, (left, top, right, bottom)) of a CVAT mask; no pixel is made."""
    if points.size < 5:
        raise BadRequest(f"{field}.points of a mask must be run lengths then left, top, right, bottom")
    if not (points == np.floor(points)).all():
        raise BadRequest(f"{field}.points of a mask must be integers")
    left, top, right, bottom = (int(v) for v in points[-4:])
    if not (0 <= left <= right < width and 0 <= top <= bottom < height):
        raise BadRequest(
            f"{field} mask box [{left}, {top}, {right}, {bottom}] is not inside the {width}x{height} frame"
        )
    if (points[:-4] < 0).any():
        raise BadRequest(f"{field}.points of a mask must not hold negative run lengths")
    box_w, box_h = right - left + 1, bottom - top + 1
    # Checked before the sum, which a few huge runs could otherwise wrap around to the box area.
    if (points[:-4] > box_w * box_h).any():
        raise BadRequest(f"{field} mask has a run longer than its box of {box_w * box_h} pixels")
    runs = points[:-4].astype(np.int64)
    if runs.sum() != box_w * box_h:
        raise BadRequest(
            f"{field} mask runs add up to {int(runs.sum())}, but its box holds {box_w * box_h} pixels"
        )
    if not runs[1::2].any():  # the odd runs are the foreground
        raise BadRequest(f"{field} is an empty mask")
    return runs, (left, top, right, bottom)


def encode_shape(mask: np.ndarray, kind: str, *, tolerance: float) -> Optional[dict]:
    """A [height, width] bool mask as a CVAT shape of `kind`; None when the mask is empty."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if ys.size == 0:
        return None
    left, right, top, bottom = int(xs[0]), int(xs[-1]), int(ys[0]), int(ys[-1])
    if kind == "rectangle":
        points = [left, top, right + 1, bottom + 1]  # pixel edges, so one pixel has area 1
    elif kind == "polygon":
        points = _mask_to_polygon(mask, tolerance=tolerance)
    else:
        points = encode_mask(mask[top : bottom + 1, left : right + 1]) + [left, top, right, bottom]
    return {"type": kind, "points": points}


def encode_mask(crop: np.ndarray) -> list[int]:
    """Run lengths of a bool crop, row-major, starting with a (possibly empty) background run."""
    flat = crop.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0] + runs if flat[0] else runs


def _mask_to_polygon(mask: np.ndarray, *, tolerance: float) -> list[float]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    largest = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    ring = cv2.approxPolyDP(largest, tolerance, True).reshape(-1, 2)
    if len(ring) < 3:
        # A part one or two pixels thin simplifies to a line; send its bounding box instead, with
        # corners as pixel indices like the contour's, so the ring decodes back to those pixels.
        x, y, w, h = cv2.boundingRect(largest)
        ring = np.array([[x, y], [x + w - 1, y], [x + w - 1, y + h - 1], [x, y + h - 1]])
    return [float(v) for v in ring.ravel()]


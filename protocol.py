"""CVAT's tracker request: validated before any model or state work.

Body: {"image": base64 JPEG/PNG, "shapes": [shape or null, ...], "states": [state or null, ...]}.
- initialising: states == [] and one shape per object;
- continuing:   states from the previous response and shapes == [null] * len(states);
- both given:   a shape (re)starts its object, a null shape continues from the state.
"""

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import io
import json
import re
import warnings
from typing import Any, Optional

import PIL.Image

from config import Settings
from errors import BadRequest, PayloadTooLarge
from state_codec import FORMAT_VERSION
from tracking import ObjectRequest, RequestStats, StateRef

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
# CVAT sends JPEG or PNG frames, or an image task's original files; Pillow's rarer decoders
# (PSD, ICNS, ...) are left out on purpose, since every decoder is attack surface. "JPEG" also
# opens the multi-picture JPEGs (MPO) that cameras write.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackRequest:
    image: PIL.Image.Image  # decoded, RGB-convertible
    frame_digest: bytes  # sha256 of the encoded frame, for idempotent retries
    objects: list[ObjectRequest]


def parse_body(body: Any, *, max_bytes: int) -> dict:
    """The JSON object of a request; Nuclio hands it over as a dict, bytes or str."""
    if isinstance(body, (bytes, bytearray, str)):
        size = len(body.encode()) if isinstance(body, str) else len(body)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body is {size} bytes; the limit is {max_bytes} (SAM2_MAX_BODY_BYTES)")
        if not body:
            raise BadRequest("request body is empty; send CVAT's JSON with 'image', 'shapes' and 'states'")
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, an over-long integer
            raise BadRequest(f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object with 'image', 'shapes' and 'states'")
    return body


def parse_request(payload: dict, settings: Settings, stats: Optional[RequestStats] = None) -> TrackRequest:
    """The request, validated and its image decoded (timed in `stats`, when given)."""
    shapes, states = payload.get("shapes"), payload.get("states", [])
    if shapes is None and isinstance(states, list) and states:
        shapes = [None] * len(states)  # continuing: some clients leave "shapes" out
    if shapes is None:
        raise BadRequest("'shapes' is missing; send one shape per object to initialise, or 'states' to continue")
    if not isinstance(shapes, list):
        raise BadRequest("'shapes' must be a list (one shape or null per object)")
    if states is None:
        states = []
    if not isinstance(states, list):
        raise BadRequest("'states' must be a list (one state per object, or empty to initialise)")
    if states and len(states) != len(shapes):
        raise BadRequest(f"'shapes' has {len(shapes)} entries but 'states' has {len(states)}; they must match")
    if not shapes:
        raise BadRequest("'shapes' and 'states' are both empty; there is no object to track")
    if len(shapes) > settings.max_objects:
        raise BadRequest(f"request has {len(shapes)} objects; the limit is {settings.max_objects} (SAM2_MAX_OBJECTS)")
    objects = []
    for i, shape in enumerate(shapes):
        state = states[i] if states else None
        if shape is None and state is None:
            raise BadRequest(f"shapes[{i}] is null and there is no states[{i}] to continue from")
        objects.append(ObjectRequest(shape=shape, state=None if shape is not None else parse_state(state, i)))
    with stats.timed("decode") if stats is not None else contextlib.nullcontext():
        image, digest = decode_image(payload.get("image"), max_pixels=settings.max_image_pixels)
    return TrackRequest(image=image, frame_digest=digest, objects=objects)


def parse_state(state: Any, index: int) -> StateRef:
    """A state this function issued (see tracking.StateRef); anything else is refused."""
    field = f"states[{index}]"
    if not isinstance(state, dict) or state.get("v") != FORMAT_VERSION:
        raise BadRequest(f"{field} is not a state issued by this tracker (version {FORMAT_VERSION}); re-initialize")
    sid, t, tok = state.get("id"), state.get("t"), state.get("tok")
    if not (isinstance(sid, str) and _HEX32.fullmatch(sid)):
        raise BadRequest(f"{field}.id must be 32 lowercase hex digits")
    if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31):
        raise BadRequest(f"{field}.t must be a non-negative integer")
    if not (isinstance(tok, str) and _HEX16.fullmatch(tok)):
        raise BadRequest(f"{field}.tok must be 16 lowercase hex digits")
    return StateRef(id=sid, t=t, tok=tok)


def decode_image(value: Any, *, max_pixels: int) -> tuple[PIL.Image.Image, bytes]:
    """The frame as an RGB image, and the sha256 of its encoded bytes."""
    if not isinstance(value, str) or not value:
        raise BadRequest("'image' must be a base64-encoded JPEG or PNG string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("'image' is not valid base64") from None
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning fires at 89M pixels; the limit enforced is ours, below.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size  # read from the header, before any pixel is decoded
    except PIL.Image.DecompressionBombError:  # a header claiming over 2 * 89M pixels
        raise BadRequest(
            f"'image' claims over {2 * PIL.Image.MAX_IMAGE_PIXELS} pixels, a decompression bomb; "
            f"the limit is {max_pixels} (SAM2_MAX_IMAGE_PIXELS)"
        ) from None
    except Exception as e:  # Pillow raises many types for bytes that are no image
        raise BadRequest(f"'image' is not a {', '.join(IMAGE_FORMATS)} image ({type(e).__name__})") from None
    if width * height > max_pixels:
        raise BadRequest(
            f"'image' is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (SAM2_MAX_IMAGE_PIXELS)"
        )
    try:
        image = image.convert("RGB")  # decodes every pixel, so a broken file fails here, not in the model
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, EOFError, struct.error...
        raise BadRequest(f"'image' is truncated or corrupt ({e})") from None
    return image, hashlib.sha256(data).digest()

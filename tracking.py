"""One tracking request: the SAM2 core on one side, the state store on the other.

Each object is its own session in the store. The prompt frame has index 0; every later frame the
object is tracked on gets the next index. Per session (all fields write-once, see state_store):

    hdr       format, model fingerprint, frame size, shape type   (state_codec.encode_header)
    cond      the prompt frame's memory and object pointer
    s:<t>     the token of frame t: a digest of the previous token and frame t's bytes
    p:<t>     frame t's object pointer          (kept for the last `pointer_frames` frames)
    m:<t>     frame t's memory                  (kept for the last `memory_frames` frames)
    o:<t>     the shape answered for frame t    (kept for the latest frame, to answer retries)

The state CVAT carries is {"v", "id", "t", "tok"}: which session, which frame, and that frame's
token. Tokens make a step idempotent (the same request gives the same token, so a retry finds
its answer stored) and let `commit` refuse a different request racing for the same next frame.
"""

import dataclasses
import hashlib
import secrets
from typing import Optional

from errors import BadRequest, StateConflict, StateNotFound
from model_handler import FrameMemory, Sam2Tracker
from shapes import Prompt, decode_shape, encode_shape
from state_codec import MemoryCodec, decode_header, decode_output, encode_header, encode_output
from state_store import StateStore

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateRef:
    """The state CVAT carries for one object between requests."""

    id: str  # session id: 128 random bits, hex
    t: int  # index of the last frame tracked (0: the prompt frame)
    tok: str  # token of that frame

    def to_json(self) -> dict:
        return {"v": STATE_VERSION, "id": self.id, "t": self.t, "tok": self.tok}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectRequest:
    shape: Optional[object]  # a raw CVAT shape (validated against the frame size later) or None
    state: Optional[StateRef]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Pending:
    """An object validated and loaded, ready to be computed and committed."""

    prompt: Optional[Prompt] = None  # set for a new object
    ref: Optional[StateRef] = None  # set for a continued object
    shape_type: str = ""
    prompt_memory: Optional[FrameMemory] = None  # the prompt frame's memory, decoded
    recent: Optional[dict] = None  # frame index -> FrameMemory, decoded (see Sam2Tracker.window)
    next_ref: Optional[StateRef] = None  # set for a continued object: the state it answers with
    replay: Optional[dict] = None  # {"shape": ...} already committed for this exact request


def _next_token(tok: str, frame_digest: bytes) -> str:
    return hashlib.sha256(tok.encode() + frame_digest).hexdigest()[:16]


class TrackingService:
    def __init__(self, tracker: Sam2Tracker, store: StateStore, *, polygon_tolerance: float):
        self.tracker = tracker
        self.store = store
        self.codec = MemoryCodec.for_tracker(tracker)
        self.polygon_tolerance = polygon_tolerance

    def track(self, *, image, frame_digest: bytes, objects: list[ObjectRequest]) -> dict:
        """Answer one CVAT request: {"shapes": [...], "states": [...]}, one entry per object.

        Every object is validated and its state loaded before any model work, so an invalid
        object leaves every other object's state untouched.
        """
        width, height = image.size
        pending = [
            self._prepare(obj, index=i, width=width, height=height, frame_digest=frame_digest)
            for i, obj in enumerate(objects)
        ]
        frame = None
        shapes, states = [], []
        for item in pending:
            if item.replay is not None:
                shape, ref = item.replay["shape"], item.next_ref
            else:
                frame = frame or self.tracker.preprocess(image)  # once per request, if needed
                if item.prompt is not None:
                    shape, ref = self._start(item, frame)
                else:
                    shape, ref = self._advance(item, frame)
            shapes.append(shape)
            states.append(ref.to_json())
        return {"shapes": shapes, "states": states}

    def _prepare(self, obj: ObjectRequest, *, index: int, width: int, height: int, frame_digest: bytes) -> _Pending:
        if obj.shape is not None:  # a shape (re)starts the object, whatever state came with it
            prompt = decode_shape(obj.shape, width=width, height=height, field=f"shapes[{index}]")
            return _Pending(prompt=prompt, shape_type=prompt.type)
        ref = obj.state
        new = ref.t + 1
        names = ["hdr", "cond", f"s:{ref.t}", f"s:{new}", f"o:{new}"]
        pointer_frames, memory_frames = self.tracker.window(new)
        names += [f"p:{t}" for t in pointer_frames] + [f"m:{t}" for t in memory_frames]
        try:
            fields = self.store.read(ref.id, names)
            header = decode_header(fields["hdr"], fingerprint=self.tracker.fingerprint) if "hdr" in fields else None
        except (StateNotFound, StateConflict) as e:  # unknown, expired or another model's: name the object
            raise type(e)(f"states[{index}]: {e}") from None
        if header is None or "cond" not in fields:
            raise StateConflict(f"states[{index}] is incomplete in the store; re-initialize the object")
        if (header["width"], header["height"]) != (width, height):
            raise BadRequest(
                f"image is {width}x{height}, but states[{index}] was initialised on a "
                f"{header['width']}x{header['height']} frame; frames of one task must have one size"
            )
        if fields.get(f"s:{ref.t}") != ref.tok.encode():
            raise StateConflict(f"states[{index}] does not match the stored tracking state; re-initialize the object")
        next_ref = StateRef(id=ref.id, t=new, tok=_next_token(ref.tok, frame_digest))
        stored_next = fields.get(f"s:{new}")
        if stored_next is not None:
            if stored_next != next_ref.tok.encode() or f"o:{new}" not in fields:
                raise StateConflict(
                    f"states[{index}] was already advanced by another request; re-initialize the object"
                )
            replay = {"shape": decode_output(fields[f"o:{new}"])}
            return _Pending(ref=ref, next_ref=next_ref, shape_type=header["type"], replay=replay)
        # Decode now, so a corrupt stored frame fails the request before any object advances.
        recent = {}
        try:
            for t in pointer_frames:
                if f"p:{t}" not in fields or (t in memory_frames and f"m:{t}" not in fields):
                    raise StateConflict(f"lost frame {t} in the store; re-initialize the object")
                mem = fields.get(f"m:{t}")
                recent[t] = FrameMemory(
                    maskmem=None if mem is None else self.codec.decode_maskmem(mem),
                    obj_ptr=self.codec.decode_pointer(fields[f"p:{t}"]),
                )
            prompt_memory = self.codec.decode_prompt(fields["cond"])
        except (StateNotFound, StateConflict) as e:
            raise type(e)(f"states[{index}]: {e}") from None
        return _Pending(
            ref=ref, next_ref=next_ref, shape_type=header["type"], prompt_memory=prompt_memory, recent=recent
        )

    def _start(self, item: _Pending, frame) -> tuple[Optional[dict], StateRef]:
        prompt = item.prompt
        if prompt.box is not None:
            step = self.tracker.init_with_box(frame, prompt.box)
        else:
            step = self.tracker.init_with_mask(frame, prompt.mask)
        shape = encode_shape(step.mask, prompt.type, tolerance=self.polygon_tolerance)
        ref = StateRef(id=secrets.token_hex(16), t=0, tok=secrets.token_hex(8))
        header = encode_header(
            fingerprint=self.tracker.fingerprint, width=frame.width, height=frame.height, shape_type=prompt.type
        )
        self.store.create(
            ref.id,
            {
                "hdr": header,
                "cond": self.codec.encode_prompt(step.memory),
                "s:0": ref.tok.encode(),
                "o:0": encode_output(shape),
            },
        )
        return shape, ref

    def _advance(self, item: _Pending, frame) -> tuple[Optional[dict], StateRef]:
        ref, new_ref = item.ref, item.next_ref
        new = new_ref.t
        step = self.tracker.track(frame, index=new, prompt=item.prompt_memory, recent=item.recent)
        shape = encode_shape(step.mask, item.shape_type, tolerance=self.polygon_tolerance)
        # Drop what no later frame reads: the oldest memory and pointer, and the previous answer.
        stale = [f"o:{ref.t}", f"m:{new - self.tracker.memory_frames}"]
        oldest_ptr = new - self.tracker.pointer_frames
        stale += [f"p:{oldest_ptr}", f"s:{oldest_ptr}"]
        self.store.commit(
            ref.id,
            guard=(f"s:{new}", new_ref.tok.encode()),
            put={
                f"p:{new}": self.codec.encode_pointer(step.memory),
                f"m:{new}": self.codec.encode_maskmem(step.memory),
                f"o:{new}": encode_output(shape),
            },
            delete=stale,  # names of frames before 0 simply do not exist
        )
        return shape, new_ref

"""One tracking request: the SAM2 core on one side, the state store on the other.

Each object is its own session in the store. The prompt frame has index 0; every later frame the
object is tracked on gets the next index. Per session (all fields write-once, see state_store):

    hdr       format, model fingerprint, frame size, shape type   (state_codec.encode_header)
    cond      the prompt frame's memory and object pointer
    s:<t>     the token of frame t: a digest of the previous token and frame t's bytes
    p:<t>     frame t's object pointer          (kept while a later frame reads it)
    m:<t>     frame t's memory                  (kept while a later frame reads it)
    o:<t>     the shape answered for frame t    (kept for the latest frame, to answer retries)

The state CVAT carries is {"v", "id", "t", "tok"}: which session, which frame, and that frame's
token. Tokens make a step idempotent (the same request gives the same token, so a retry finds
its answer stored) and let `commit` refuse a different request racing for the same next frame.

A request runs in three phases, so that a failure leaves as little as possible behind:
1. validate every shape and state reference, without touching the store;
2. check every continued object's stored header and tokens (small fields); then, one object at a
   time, decode its memories and compute its answer, so that memory stays bounded; nothing is
   written;
3. write every object's new frame. If a write fails, the sessions this request started are
   deleted again; objects already advanced answer a retry of the same request from the store.
"""

import contextlib
import dataclasses
import hashlib
import secrets
import time
from typing import Optional, Union

from errors import BadRequest, StateConflict, StateNotFound
from model_handler import Frame, FrameMemory, Sam2Tracker
from shapes import Prompt, decode_shape, encode_shape
from state_codec import FORMAT_VERSION, MemoryCodec, decode_header, decode_output, encode_header, encode_output
from state_store import StateStore

@dataclasses.dataclass(frozen=True, kw_only=True)
class StateRef:
    """The state CVAT carries for one object between requests."""

    id: str  # session id: 128 random bits, hex
    t: int  # index of the last frame tracked (0: the prompt frame)
    tok: str  # token of that frame

    def to_json(self) -> dict:
        return {"v": FORMAT_VERSION, "id": self.id, "t": self.t, "tok": self.tok}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectRequest:
    shape: Optional[object]  # a raw CVAT shape (validated against the frame size later) or None
    state: Optional[StateRef]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Start:
    """A new object: its prompt, validated."""

    prompt: Prompt


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Continue:
    """A continued object: where it is, and the state it will answer with."""

    ref: StateRef
    next_ref: StateRef


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Answer:
    """One object's answer, and what phase 3 must write for it (nothing for a replay)."""

    shape: Optional[dict]
    ref: StateRef
    create: Optional[dict] = None  # fields of a new session
    commit: Optional[dict] = None  # keyword arguments of StateStore.commit


@dataclasses.dataclass(kw_only=True)
class RequestStats:
    """What one request did and where its time went, for the one log line per request (main.py).

    Times are wall-clock seconds per phase, summed over the request's objects. On CUDA each phase
    ends at a point that waits for the GPU anyway (the image encoder explicitly, at the end of
    `Sam2Tracker.preprocess`; an object's model work when its mask is copied to the host), so
    GPU work is counted in the phase that queued it. Counts are set once every object is answered.
    """

    new: int = 0  # objects started from a shape
    continued: int = 0  # objects tracked one frame further
    replayed: int = 0  # objects of a retried request, answered from the store
    width: int = 0  # the frame's size, once decoded
    height: int = 0
    decode: float = 0.0  # the image: base64, JPEG/PNG decoding to RGB, its digest
    encoder: float = 0.0  # resize, normalisation and the image encoder, once per request
    model: float = 0.0  # every object's SAM2 step (prompt or tracking), memory encoding included
    codec: float = 0.0  # memories and stored answers to and from bytes
    store_read: float = 0.0
    store_write: float = 0.0
    shapes: float = 0.0  # CVAT shapes to prompts and masks to CVAT shapes

    @contextlib.contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, phase, getattr(self, phase) + time.perf_counter() - start)


def _next_token(tok: str, frame_digest: bytes) -> str:
    return hashlib.sha256(tok.encode() + frame_digest).hexdigest()[:16]


class TrackingService:
    def __init__(self, tracker: Sam2Tracker, store: StateStore, *, polygon_tolerance: float):
        self.tracker = tracker
        self.store = store
        self.codec = MemoryCodec.for_tracker(tracker)
        self.polygon_tolerance = polygon_tolerance

    def track(self, *, image, frame_digest: bytes, objects: list[ObjectRequest],
              stats: Optional[RequestStats] = None) -> dict:
        """Answer one CVAT request: {"shapes": [...], "states": [...]}, one entry per object.

        `stats`, when given, receives the request's counts and phase times."""
        stats = RequestStats() if stats is None else stats
        width, height = image.size
        stats.width, stats.height = width, height
        with stats.timed("shapes"):
            todo = [self._validate(obj, index=i, width=width, height=height, frame_digest=frame_digest)
                    for i, obj in enumerate(objects)]
        # Every continued object's state is checked before any model work; then one object's
        # memories at a time are decoded, used and dropped.
        checked = {i: self._check(item, stats, index=i, width=width, height=height)
                   for i, item in enumerate(todo) if isinstance(item, _Continue)}
        frame = None  # encoded once per request, and only if some object needs the model
        answers: list[_Answer] = []
        for i, item in enumerate(todo):
            if isinstance(item, _Start):
                frame = frame or self._preprocess(image, stats)
                answers.append(self._start(item.prompt, frame, stats))
            elif isinstance(checked[i], _Answer):  # a retry of a step already written
                answers.append(checked[i])
            else:
                prompt, recent = self._memories(item, stats, index=i)
                frame = frame or self._preprocess(image, stats)
                answers.append(self._advance(item, checked[i], prompt, recent, frame, stats))
        with stats.timed("store_write"):
            self._write(answers)
        stats.new = sum(a.create is not None for a in answers)
        stats.continued = sum(a.commit is not None for a in answers)
        stats.replayed = len(answers) - stats.new - stats.continued
        return {"shapes": [a.shape for a in answers], "states": [a.ref.to_json() for a in answers]}

    def _preprocess(self, image, stats: RequestStats) -> Frame:
        with stats.timed("encoder"):
            return self.tracker.preprocess(image)

    # --- phase 1: validation, no store access -----------------------------------------------

    def _validate(self, obj: ObjectRequest, *, index: int, width: int, height: int, frame_digest: bytes):
        if obj.shape is not None:  # a shape (re)starts the object, whatever state came with it
            return _Start(prompt=decode_shape(obj.shape, width=width, height=height, field=f"shapes[{index}]"))
        ref = obj.state
        return _Continue(ref=ref, next_ref=StateRef(id=ref.id, t=ref.t + 1, tok=_next_token(ref.tok, frame_digest)))

    # --- phase 2: read, check and compute; nothing is written --------------------------------

    def _start(self, prompt: Prompt, frame: Frame, stats: RequestStats) -> _Answer:
        with stats.timed("model"):
            if prompt.box is not None:
                step = self.tracker.init_with_box(frame, prompt.box)
            else:
                step = self.tracker.init_with_mask(frame, prompt.mask)
        with stats.timed("shapes"):
            shape = encode_shape(step.mask, prompt.type, tolerance=self.polygon_tolerance)
        ref = StateRef(id=secrets.token_hex(16), t=0, tok=secrets.token_hex(8))
        with stats.timed("codec"):
            header = encode_header(
                fingerprint=self.tracker.fingerprint, width=frame.width, height=frame.height, shape_type=prompt.type
            )
            fields = {"hdr": header, "cond": self.codec.encode_prompt(step.memory), "s:0": ref.tok.encode(),
                      "o:0": encode_output(shape)}
        return _Answer(shape=shape, ref=ref, create=fields)

    def _check(
        self, item: _Continue, stats: RequestStats, *, index: int, width: int, height: int
    ) -> Union[_Answer, str]:
        """The object's stored header and tokens checked: its shape type, or the stored answer of a
        retried step. Small fields only, so every object is checked before any model work."""
        ref, next_ref = item.ref, item.next_ref
        new = next_ref.t
        with _naming(index):
            with stats.timed("store_read"):
                fields = self.store.read(ref.id, ["hdr", f"s:{ref.t}", f"s:{new}", f"o:{new}"])
            if "hdr" not in fields:
                raise StateConflict("it is incomplete in the store; re-initialize the object")
            header = decode_header(fields["hdr"], fingerprint=self.tracker.fingerprint)
            if (header["width"], header["height"]) != (width, height):
                raise BadRequest(
                    f"image is {width}x{height}, but it was initialised on a {header['width']}x{header['height']} "
                    "frame; frames of one task must have one size"
                )
            if fields.get(f"s:{ref.t}") != ref.tok.encode():
                raise StateConflict("it does not match the stored tracking state; re-initialize the object")
            stored_next = fields.get(f"s:{new}")
            if stored_next is None:
                return header["type"]
            if stored_next != next_ref.tok.encode() or f"o:{new}" not in fields:
                raise StateConflict("it was already advanced by another request; re-initialize the object")
            return _Answer(shape=decode_output(fields[f"o:{new}"], shape_type=header["type"]), ref=next_ref)

    def _memories(
        self, item: _Continue, stats: RequestStats, *, index: int
    ) -> tuple[FrameMemory, dict[int, FrameMemory]]:
        """The prompt frame's memory and the recent frames' memories the next frame reads, decoded."""
        new = item.next_ref.t
        pointer_frames, memory_frames = self.tracker.window(new)
        names = ["cond"] + [f"p:{t}" for t in pointer_frames] + [f"m:{t}" for t in memory_frames]
        with _naming(index):
            with stats.timed("store_read"):
                fields = self.store.read(item.ref.id, names)
            if "cond" not in fields:
                raise StateConflict("it is incomplete in the store; re-initialize the object")
            with stats.timed("codec"):
                recent = {}
                for t in pointer_frames:
                    if f"p:{t}" not in fields or (t in memory_frames and f"m:{t}" not in fields):
                        raise StateConflict(f"frame {t} is lost in the store; re-initialize the object")
                    mem = fields.get(f"m:{t}")
                    recent[t] = FrameMemory(
                        maskmem=None if mem is None else self.codec.decode_maskmem(mem),
                        obj_ptr=self.codec.decode_pointer(fields[f"p:{t}"]),
                    )
                return self.codec.decode_prompt(fields["cond"]), recent

    def _advance(self, item: _Continue, shape_type: str, prompt: FrameMemory, recent: dict, frame: Frame,
                 stats: RequestStats) -> _Answer:
        new = item.next_ref.t
        with stats.timed("model"):
            step = self.tracker.track(frame, index=new, prompt=prompt, recent=recent)
        with stats.timed("shapes"):
            shape = encode_shape(step.mask, shape_type, tolerance=self.polygon_tolerance)
        # Drop what no later frame reads, and the previous answer (kept only to answer retries).
        (pointers, memories), (later_pointers, later_memories) = self.tracker.window(new), self.tracker.window(new + 1)
        stale = [f"o:{new - 1}"]
        stale += [f"{kind}:{t}" for t in pointers if t not in later_pointers for kind in ("p", "s")]
        stale += [f"m:{t}" for t in memories if t not in later_memories]
        with stats.timed("codec"):
            put = {
                f"p:{new}": self.codec.encode_pointer(step.memory),
                f"m:{new}": self.codec.encode_maskmem(step.memory),
                f"o:{new}": encode_output(shape),
            }
        commit = {"guard": (f"s:{new}", item.next_ref.tok.encode()), "put": put, "delete": stale}
        return _Answer(shape=shape, ref=item.next_ref, commit=commit)

    # --- phase 3: write ------------------------------------------------------------------------

    def _write(self, answers: list[_Answer]) -> None:
        started = []  # sessions this request may have created, the one whose write failed included
        try:
            for index, answer in enumerate(answers):
                if answer.create is not None:
                    started.append(answer.ref.id)
                    self.store.create(answer.ref.id, answer.create)
                elif answer.commit is not None:
                    with _naming(index):
                        self.store.commit(answer.ref.id, **answer.commit)
        except BaseException:
            # A retry starts new sessions for these objects: delete the ones started here, so
            # they neither linger until their TTL nor push live sessions out of a bounded store.
            # One call for all of them, so a store that hangs costs one more timeout, not one each.
            if started:
                try:
                    self.store.delete(*started)
                except Exception:  # the store failing is likely why we are here; the TTL ends them
                    pass
            raise


@contextlib.contextmanager
def _naming(index: int):
    """Errors about one object's state say which object: states[index]."""
    try:
        yield
    except (StateNotFound, StateConflict, BadRequest) as e:
        raise type(e)(f"states[{index}]: {e}") from None

"""Tracking state <-> bytes: msgpack maps with tensors as raw bytes plus dtype and shape.

Nothing here can execute code: msgpack yields plain values, and every tensor's dtype, shape and
byte count is checked against what the model expects before a tensor is built from the bytes.
A header records the format version and the model's fingerprint, so a state made by another
model or by another format version is refused instead of silently producing garbage.
"""

import math
from typing import Any, Optional

import msgpack
import torch

from errors import StateConflict, StateNotFound
from model_handler import FrameMemory

# Of the stored state and of the reference CVAT carries (tracking.StateRef): they change together.
FORMAT_VERSION = 1

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class StateCorrupt(StateNotFound):
    """Stored bytes that do not decode; the object has to be initialised again."""


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=64 * 2**20)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise StateCorrupt(f"stored {what} is unreadable ({e}); re-initialize the object") from e


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # msgpack has booleans too


def encode_header(*, fingerprint: str, width: int, height: int, shape_type: str) -> bytes:
    return _pack(
        {"format": FORMAT_VERSION, "model": fingerprint, "width": width, "height": height, "type": shape_type}
    )


def decode_header(data: bytes, *, fingerprint: str) -> dict:
    """Return {width, height, type}; refuse states of another format or model."""
    header = _unpack(data, "state header")
    if not isinstance(header, dict) or not _is_int(header.get("format")):
        raise StateCorrupt("stored state header is malformed; re-initialize the object")
    if header["format"] != FORMAT_VERSION:
        raise StateConflict(
            f"tracking state has format {header['format']}, this function reads format {FORMAT_VERSION}; "
            "re-initialize the object"
        )
    if header.get("model") != fingerprint:
        raise StateConflict("tracking state was made by a different model; re-initialize the object")
    width, height, shape_type = header.get("width"), header.get("height"), header.get("type")
    if not (
        _is_int(width) and _is_int(height) and width > 0 and height > 0
        and shape_type in ("mask", "polygon", "rectangle")
    ):
        raise StateCorrupt("stored state header is malformed; re-initialize the object")
    return {"width": width, "height": height, "type": shape_type}


def _encode_tensor(tensor: torch.Tensor) -> dict:
    tensor = tensor.detach().contiguous().cpu()
    # numpy has no bfloat16, so the bytes are taken through a same-size integer view.
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data": raw.numpy().tobytes()}


def _decode_tensor(value: Any, *, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], what: str) -> torch.Tensor:
    """Build a tensor only from bytes whose dtype, shape and length are all as expected."""
    name = value.get("dtype") if isinstance(value, dict) else None
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype not in dtypes:
        names = ", ".join(_DTYPE_NAMES[d] for d in dtypes)
        raise StateCorrupt(f"stored {what} is not a tensor of dtype {names}; re-initialize the object")
    data = value.get("data")
    if value.get("shape") != list(shape) or not isinstance(data, bytes):
        raise StateCorrupt(f"stored {what} does not have the shape {list(shape)}; re-initialize the object")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise StateCorrupt(f"stored {what} has {len(data)} bytes, expected {expected}; re-initialize the object")
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


# Memories are always stored as bfloat16, as the official predictor keeps them. Pointers keep the
# model's output dtype: float32, or bfloat16 under CUDA autocast.
_MEM_DTYPES = (torch.bfloat16,)
_PTR_DTYPES = (torch.float32, torch.bfloat16)


class MemoryCodec:
    """Encodes one frame's memory; knows the tensor shapes of the loaded model."""

    def __init__(self, *, mem_shape: tuple[int, ...], ptr_shape: tuple[int, ...]):
        self.mem_shape = mem_shape  # e.g. (1, 64, 64, 64) at image size 1024
        self.ptr_shape = ptr_shape  # e.g. (1, 256)

    @classmethod
    def for_tracker(cls, tracker) -> "MemoryCodec":
        side = tracker.image_size // tracker.model.backbone_stride
        return cls(mem_shape=(1, tracker.model.mem_dim, side, side), ptr_shape=(1, tracker.model.hidden_dim))

    def encode_maskmem(self, memory: FrameMemory) -> bytes:
        return _pack(_encode_tensor(memory.maskmem))

    def encode_pointer(self, memory: FrameMemory) -> bytes:
        return _pack(_encode_tensor(memory.obj_ptr))

    def encode_prompt(self, memory: FrameMemory) -> bytes:
        return _pack({"mem": _encode_tensor(memory.maskmem), "ptr": _encode_tensor(memory.obj_ptr)})

    def decode_maskmem(self, data: bytes) -> torch.Tensor:
        return _decode_tensor(_unpack(data, "memory"), shape=self.mem_shape, dtypes=_MEM_DTYPES, what="memory")

    def decode_pointer(self, data: bytes) -> torch.Tensor:
        return _decode_tensor(_unpack(data, "object pointer"), shape=self.ptr_shape, dtypes=_PTR_DTYPES, what="object pointer")

    def decode_prompt(self, data: bytes) -> FrameMemory:
        value = _unpack(data, "prompt memory")
        if not isinstance(value, dict):
            raise StateCorrupt("stored prompt memory is malformed; re-initialize the object")
        return FrameMemory(
            maskmem=_decode_tensor(value.get("mem"), shape=self.mem_shape, dtypes=_MEM_DTYPES, what="prompt memory"),
            obj_ptr=_decode_tensor(value.get("ptr"), shape=self.ptr_shape, dtypes=_PTR_DTYPES, what="prompt pointer"),
        )


def encode_output(shape: Optional[dict]) -> bytes:
    return _pack(shape)


def decode_output(data: bytes, *, shape_type: str) -> Optional[dict]:
    """A stored answer: None (the object was not found) or a shape of the object's type."""
    value = _unpack(data, "output shape")
    if value is None:
        return None
    points = value.get("points") if isinstance(value, dict) else None
    if not (
        isinstance(value, dict) and set(value) == {"type", "points"} and value["type"] == shape_type
        and isinstance(points, list)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in points)
    ):
        raise StateCorrupt("stored output shape is malformed; re-initialize the object")
    return value

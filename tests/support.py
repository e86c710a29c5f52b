"""What the tests and the benchmarks share: a random-weight SAM2, synthetic frames, the function
in-process, and the official predictor as the oracle.

No network: the model is built from sam2's real tiny config with seeded random weights, saved as
a `{"model": state_dict}` checkpoint and loaded back through the project's own loading path.
"""

import base64
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np
import PIL.Image
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
OVERRIDES = ("++model.image_size=256",)
FRAME_W, FRAME_H = 160, 120  # not square and not the model size, so every resize path runs
FIRST_BOXES = [[22, 32, 58, 68], [96, 56, 124, 84]]
NO_CUDA = "no CUDA device here: run scripts/gpu-check.sh on a machine with an NVIDIA GPU"


def make_checkpoint(
    path: str, *, config: str = CONFIG, seed: int = 0, obj_score_bias: float = 10.0, obj_score_gain: float = 1.0
) -> None:
    """Save a seeded random-weight SAM2 whose object-score head says "present" (by default).

    `obj_score_gain` scales the head's last layer, so that the small differences random weights
    make between frames become a clear sign change (see DISAPPEARING in test_exactness.py)."""
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(seed)
    model = build_sam2_video_predictor(config, None, device="cpu", hydra_overrides_extra=list(OVERRIDES))
    # Random weights call every object absent; a high bias on the last layer of the
    # object-score head keeps objects present so the masks are not trivially empty.
    head = model.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.weight.mul_(obj_score_gain)
        last.bias.fill_(obj_score_bias)
    torch.save({"model": model.state_dict()}, path)


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_frames(count: int, *, seed: int = 0, width: int = FRAME_W, height: int = FRAME_H) -> list[bytes]:
    """JPEG frames of two blobs drifting over a textured background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        img = background.copy()
        for cx, cy, r, color in ((40 + 2 * i, 50, 18, (230, 60, 40)), (110 - i, 70 + i, 14, (40, 200, 230))):
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = color
        frames.append(jpeg(img))
    return frames


def first_masks(width: int = FRAME_W, height: int = FRAME_H) -> list[np.ndarray]:
    """Prompt masks for the two blobs of `make_frames` on frame 0."""
    yy, xx = np.mgrid[0:height, 0:width]
    return [
        (xx - 40) ** 2 + (yy - 50) ** 2 <= 18 * 18,
        (xx - 110) ** 2 + (yy - 70) ** 2 <= 14 * 14,
    ]


def grid_masks(count: int, *, width: int, height: int) -> list[np.ndarray]:
    """`count` disjoint round prompt masks on a grid, for any number of objects."""
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    cw, ch = width / cols, height / rows
    r = 0.35 * min(cw, ch)
    yy, xx = np.mgrid[0:height, 0:width]
    return [
        (xx - (k % cols + 0.5) * cw) ** 2 + (yy - (k // cols + 0.5) * ch) ** 2 <= r * r for k in range(count)
    ]


def body(image: bytes, *, shapes=None, states=None) -> dict:
    """CVAT's request: initialising with `shapes`, or continuing from `states`."""
    n = len(states) if states else len(shapes)
    return {"image": base64.b64encode(image).decode(), "shapes": shapes or [None] * n, "states": states or []}


def model_env(checkpoint: str, *, device: str = "cpu", overrides: Sequence[str] = OVERRIDES) -> dict:
    return {
        "SAM2_CONFIG": CONFIG,
        "SAM2_CHECKPOINT": checkpoint,
        "SAM2_CONFIG_OVERRIDES": " ".join(overrides),
        "SAM2_DEVICE": device,
    }


def _at_its_level(record: logging.LogRecord) -> bool:
    # nuclio_sdk's Logger hands every record to the handlers whatever its level: keep the
    # function's line per request (INFO) out of test and benchmark output unless a test asks for
    # it (caplog.set_level(logging.INFO, logger="nuclio_sdk")).
    return record.levelno >= logging.getLogger("nuclio_sdk").getEffectiveLevel()


class Function:
    """The Nuclio function in-process: init_context once, then handler per event."""

    def __init__(self, env: dict):
        import nuclio_sdk

        import main

        self.main = main
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.context = nuclio_sdk.Context(logger=nuclio_sdk.Logger(logging.WARNING))
            logging.getLogger("nuclio_sdk").addFilter(_at_its_level)
            main.init_context(self.context)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def call(self, payload, *, content_type="application/json", method="POST"):
        """Send one event; return (status, decoded JSON body) as Nuclio would answer."""
        import nuclio_sdk

        if not isinstance(payload, (bytes, str)):
            payload = json.dumps(payload).encode()
        if content_type == "application/json" and method == "POST":
            payload = json.loads(payload)  # Nuclio's wrapper decodes exactly this content type
        event = nuclio_sdk.Event(body=payload, content_type=content_type, method=method, path="/")
        output = self.main.handler(self.context, event)
        response = nuclio_sdk.Response.from_entrypoint_output(json.dumps, output)
        assert response["content_type"] == "application/json"
        return response["status_code"], json.loads(response["body"])

    def track(self, image: bytes, *, shapes=None, states=None):
        status, answer = self.call(body(image, shapes=shapes, states=states))
        assert status == 200, answer
        return answer


def autocast(device: str):
    """The precision the official demos use: bf16 autocast on CUDA, plain fp32 on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def official_masks(
    checkpoint: str,
    frames: list[bytes],
    *,
    masks=None,
    boxes=None,
    device: str = "cpu",
    overrides: Sequence[str] = OVERRIDES,
) -> list[list[np.ndarray]]:
    """Per frame, per object bool masks of the official SAM2VideoPredictor: init_state, the prompts
    on frame 0 (masks first, then boxes), propagate_in_video. An absent object's mask is empty."""
    from sam2.build_sam import build_sam2_video_predictor

    predictor = build_sam2_video_predictor(CONFIG, checkpoint, device=device, hydra_overrides_extra=list(overrides))
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode(), autocast(device):
        for i, data in enumerate(frames):
            with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
                f.write(data)
        state = predictor.init_state(video_path=folder)
        for obj_id, mask in enumerate(masks or []):
            predictor.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=mask)
        for obj_id, box in enumerate(boxes or [], start=len(masks or [])):
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, box=box)
        result = [None] * len(frames)
        for frame_idx, _, video_res_masks in predictor.propagate_in_video(state):
            result[frame_idx] = [(m[0] > 0).cpu().numpy() for m in video_res_masks]
    return result


def answer_mask(shape: Optional[dict], *, width: int, height: int) -> np.ndarray:
    """The pixels of one answered shape, decoded by CVAT's own mask codec (None: no pixel)."""
    from cvat_sdk.masks import decode_mask

    if shape is None:
        return np.zeros((height, width), dtype=bool)
    assert shape["type"] == "mask", shape["type"]
    return decode_mask(shape["points"], image_width=width, image_height=height)


def mask_shape(mask: np.ndarray) -> dict:
    from cvat_sdk.masks import encode_mask

    return {"type": "mask", "points": encode_mask(mask)}


def run_function(function: Function, frames: list[bytes], first_shapes: list) -> list[list]:
    """Track `first_shapes` from frames[0] through every frame, one request per frame."""
    answer = function.track(frames[0], shapes=first_shapes)
    results = [answer["shapes"]]
    states = answer["states"]
    for frame in frames[1:]:
        answer = function.track(frame, states=states)
        results.append(answer["shapes"])
        states = answer["states"]
    return results


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def bounding_box(mask: np.ndarray) -> list[int]:
    """The rectangle the function answers for `mask`: [x1, y1, x2, y2] in pixel edges."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def assert_same_masks(ours: list[list[np.ndarray]], official: list[list[np.ndarray]]) -> None:
    """Identical masks on every frame, and a comparison that is not vacuous."""
    assert len(ours) == len(official)
    for frame_idx, (got_frame, expected_frame) in enumerate(zip(ours, official)):
        assert len(got_frame) == len(expected_frame)
        for obj, (got, expected) in enumerate(zip(got_frame, expected_frame)):
            assert np.array_equal(got, expected), (frame_idx, obj, int((got != expected).sum()), iou(got, expected))
    # The objects are found and their masks change over the video.
    areas = [[int(m.sum()) for m in frame] for frame in official]
    assert any(a > 0 for frame in areas for a in frame)
    assert len({tuple(a) for a in areas}) > 1


def start_up_failure(env: dict, caplog) -> str:
    """Run init_context with `env`; it must exit 1 after logging one line. That line's error."""
    import nuclio_sdk
    import pytest

    import main as main_module

    caplog.set_level(logging.DEBUG, logger="nuclio_sdk")
    saved = dict(os.environ)
    os.environ.update({"HF_HUB_OFFLINE": "1", **env})  # were the store let through: fail fast
    try:
        with pytest.raises(SystemExit) as stopped:
            main_module.init_context(nuclio_sdk.Context(logger=nuclio_sdk.Logger(logging.DEBUG)))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert stopped.value.code == 1
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].getMessage() == "could not start the tracker"
    error = errors[0].__dict__["with"]["error"]
    assert "Traceback" not in error and "\n" not in error
    return error

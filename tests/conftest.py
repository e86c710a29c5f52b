"""Shared fixtures: a small random-weight SAM2 checkpoint and synthetic video frames.

No network: the model is built from sam2's real tiny config with seeded random weights, saved as
a `{"model": state_dict}` checkpoint and loaded back through the project's own loading path.
"""

import base64
import io
import json
import logging
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import Settings  # noqa: E402
from model_handler import load_tracker  # noqa: E402

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
OVERRIDES = ("++model.image_size=256",)
FRAME_W, FRAME_H = 160, 120  # not square and not the model size, so every resize path runs


def make_checkpoint(path: str, *, seed: int = 0, obj_score_bias: float = 10.0) -> None:
    """Save a seeded random-weight SAM2 whose object-score head says "present"."""
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(seed)
    model = build_sam2_video_predictor(
        CONFIG, None, device="cpu", hydra_overrides_extra=list(OVERRIDES)
    )
    # Random weights call every object absent; a high bias on the last layer of the
    # object-score head keeps objects present so the masks are not trivially empty.
    head = model.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(obj_score_bias)
    torch.save({"model": model.state_dict()}, path)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("model") / "sam2_random.pt")
    make_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def settings(checkpoint) -> Settings:
    return Settings(config=CONFIG, checkpoint=checkpoint, config_overrides=OVERRIDES, device="cpu")


@pytest.fixture(scope="session")
def tracker(settings):
    return load_tracker(settings)


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
        buf = io.BytesIO()
        PIL.Image.fromarray(img).save(buf, format="JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames


def first_masks(width: int = FRAME_W, height: int = FRAME_H) -> list[np.ndarray]:
    """Prompt masks for the two blobs of `make_frames` on frame 0."""
    yy, xx = np.mgrid[0:height, 0:width]
    return [
        (xx - 40) ** 2 + (yy - 50) ** 2 <= 18 * 18,
        (xx - 110) ** 2 + (yy - 70) ** 2 <= 14 * 14,
    ]


FIRST_BOXES = [[22, 32, 58, 68], [96, 56, 124, 84]]


class Function:
    """The Nuclio function in-process: init_context once, then handler per event."""

    def __init__(self, env: dict, monkeypatch=None):
        import nuclio_sdk

        import main

        self.main = main
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.context = nuclio_sdk.Context(logger=nuclio_sdk.Logger(logging.WARNING))
            main.init_context(self.context)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def call(self, body, *, content_type="application/json", method="POST"):
        """Send one event; return (status, decoded JSON body) as Nuclio would answer."""
        import nuclio_sdk

        if not isinstance(body, (bytes, str)):
            body = json.dumps(body).encode()
        if content_type == "application/json" and method == "POST":
            body = json.loads(body)  # Nuclio's wrapper decodes exactly this content type
        event = nuclio_sdk.Event(body=body, content_type=content_type, method=method, path="/")
        output = self.main.handler(self.context, event)
        response = nuclio_sdk.Response.from_entrypoint_output(json.dumps, output)
        assert response["content_type"] == "application/json"
        return response["status_code"], json.loads(response["body"])

    def track(self, image: bytes, *, shapes=None, states=None):
        n = len(states) if states else len(shapes)
        body = {
            "image": base64.b64encode(image).decode(),
            "shapes": shapes if shapes is not None else [None] * n,
            "states": states or [],
        }
        status, answer = self.call(body)
        assert status == 200, answer
        return answer


def model_env(checkpoint: str) -> dict:
    return {
        "SAM2_CONFIG": CONFIG,
        "SAM2_CHECKPOINT": checkpoint,
        "SAM2_CONFIG_OVERRIDES": " ".join(OVERRIDES),
        "SAM2_DEVICE": "cpu",
    }


@pytest.fixture(scope="session")
def function(checkpoint) -> Function:
    """The function with the embedded store (no CVAT_FUNCTIONS_REDIS_HOST)."""
    env = model_env(checkpoint)
    env["CVAT_FUNCTIONS_REDIS_HOST"] = ""
    return Function(env)

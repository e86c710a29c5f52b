"""The official SAM2VideoPredictor run on the same frames: the reference every test compares to."""

import os
import tempfile

import numpy as np
import torch

from conftest import CONFIG, OVERRIDES


def official_masks(checkpoint: str, frames: list[bytes], *, masks=None, boxes=None) -> list[list[np.ndarray]]:
    """Per frame, per object bool masks from init_state + prompts on frame 0 + propagate_in_video."""
    from sam2.build_sam import build_sam2_video_predictor

    predictor = build_sam2_video_predictor(
        CONFIG, checkpoint, device="cpu", hydra_overrides_extra=list(OVERRIDES)
    )
    with tempfile.TemporaryDirectory() as folder:
        for i, data in enumerate(frames):
            with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
                f.write(data)
        with torch.inference_mode():
            state = predictor.init_state(video_path=folder)
            for obj_id, mask in enumerate(masks or []):
                predictor.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=mask)
            for obj_id, box in enumerate(boxes or []):
                predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, box=box)
            result = [None] * len(frames)
            for frame_idx, _, video_res_masks in predictor.propagate_in_video(state):
                result[frame_idx] = [(m[0] > 0).cpu().numpy() for m in video_res_masks]
    return result

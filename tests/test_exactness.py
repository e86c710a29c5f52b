"""The function's masks equal the official SAM2VideoPredictor's, frame for frame.

Every scenario runs on the CPU (fp32) and, where a GPU is present, on CUDA, where both sides run
under bf16 autocast as the official demos do (scripts/gpu-check.sh). The function is driven
through `main.handler` with the embedded store, so the masks pass through the real protocol,
state codec and store. Masks answered as rectangles or polygons are read where the function
turns them into shapes (`tracking.encode_shape`), so box and polygon prompts are compared pixel
for pixel too.
"""

import io

import numpy as np
import PIL.Image
import pytest
import torch

import tracking
from model_handler import FrameMemory
from shapes import decode_shape
from support import (
    FIRST_BOXES, FRAME_H, FRAME_W, NO_CUDA, Function, answer_mask, assert_same_masks, bounding_box, first_masks, jpeg,
    grid_masks, make_checkpoint, make_frames, mask_shape, model_env, official_masks, run_function,
)

FRAMES = 24  # past the 16-frame pointer window and the 7-frame memory window

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)),
]


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def handler_on(checkpoint, device):
    """The function on `device`, loaded once per device."""
    env = {**model_env(checkpoint, device=device), "CVAT_FUNCTIONS_REDIS_HOST": ""}
    return Function(env)


@pytest.fixture(scope="module")
def frames():
    return make_frames(FRAMES)


@pytest.fixture
def answered_masks(monkeypatch):
    """Every mask the function turns into a shape, in order, whatever the shape type."""
    seen = []
    encode = tracking.encode_shape

    def recording(mask, kind, **kwargs):
        seen.append(mask.copy())
        return encode(mask, kind, **kwargs)

    monkeypatch.setattr(tracking, "encode_shape", recording)
    return seen


def per_frame(flat: list, objects: int) -> list:
    assert len(flat) == FRAMES * objects
    return [flat[i : i + objects] for i in range(0, len(flat), objects)]


FOUR_MASKS = first_masks() + grid_masks(4, width=FRAME_W, height=FRAME_H)[2:]


@pytest.fixture(scope="module")
def official_four(checkpoint, frames, device):
    return official_masks(checkpoint, frames, masks=FOUR_MASKS, device=device)


def test_mask_prompts_four_objects(handler_on, frames, official_four):
    ours = run_function(handler_on, frames, [mask_shape(m) for m in FOUR_MASKS])
    got = [[answer_mask(s, width=FRAME_W, height=FRAME_H) for s in shapes] for shapes in ours]
    assert_same_masks(got, official_four)


def test_box_prompts(handler_on, checkpoint, frames, device, answered_masks):
    ours = run_function(handler_on, frames, [{"type": "rectangle", "points": b} for b in FIRST_BOXES])
    assert all(s["type"] == "rectangle" for shapes in ours for s in shapes)
    official = official_masks(checkpoint, frames, boxes=FIRST_BOXES, device=device)
    assert_same_masks(per_frame(answered_masks, 2), official)
    # The rectangles answered are those masks' bounding boxes.
    assert [[s["points"] for s in shapes] for shapes in ours] == [[bounding_box(m) for m in f] for f in official]


def test_polygon_prompts(handler_on, checkpoint, frames, device, answered_masks):
    polygons = [[22, 50, 40, 30, 58, 48, 44, 70], [96, 60, 124, 56, 116, 86]]
    shapes = [{"type": "polygon", "points": p} for p in polygons]
    ours = run_function(handler_on, frames, shapes)
    assert all(s is None or s["type"] == "polygon" for f in ours for s in f)
    # The official predictor has no polygon prompt: it gets the polygon's pixels as a mask.
    masks = [decode_shape(s, width=FRAME_W, height=FRAME_H, field="s").mask for s in shapes]
    assert_same_masks(per_frame(answered_masks, 2), official_masks(checkpoint, frames, masks=masks, device=device))


def test_prompt_mask_with_small_holes(handler_on, checkpoint, frames, device, monkeypatch):
    # Holes of a few low-resolution pixels are what fill_hole_area=8 fills (sam2's CUDA extension).
    mask = np.zeros((FRAME_H, FRAME_W), dtype=bool)
    mask[25:80, 15:70] = True
    for y, x, size in [(35, 25, 2), (40, 50, 5), (60, 30, 5), (70, 60, 2), (50, 40, 5)]:
        mask[y : y + size, x : x + size] = False
    ours = run_function(handler_on, frames, [mask_shape(mask)])
    got = [[answer_mask(s, width=FRAME_W, height=FRAME_H) for s in shapes] for shapes in ours]
    official = official_masks(checkpoint, frames, masks=[mask], device=device)
    assert_same_masks(got, official)
    if device == "cuda":  # where the extension is built: hole filling took part, and mattered
        import sam2.sam2_video_predictor

        assert handler_on.context.user_data.service.tracker._fill_holes
        monkeypatch.setattr(sam2.sam2_video_predictor, "fill_holes_in_mask_scores", lambda masks, area: masks)
        unfilled = official_masks(checkpoint, frames, masks=[mask], device=device)
        assert any(not np.array_equal(a[0], b[0]) for a, b in zip(unfilled, official))


# An object that leaves and comes back. The frames show a disc on frames 0-7 and 14-23 and a flat
# grey picture in between. The checkpoint's object-score head is scaled so that random weights
# score the disc frames above 0 and the grey frames below (measured on the CPU: margins of 0.8
# or more), so SAM2 calls the object absent in the middle: its no-object pointer and memory
# paths run, and then the object is found again.
DISAPPEARING = {"obj_score_gain": 100.0, "obj_score_bias": -19.6}
GONE = range(8, 14)


def disappearing_frames() -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(0)
    background = rng.integers(0, 80, size=(FRAME_H, FRAME_W, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W]
    frames = []
    for i in range(FRAMES):
        img = background.copy()
        if i in GONE:
            img[:] = 128
        else:
            img[(xx - 50 - i) ** 2 + (yy - 60) ** 2 <= 25**2] = (230, 60, 40)
        frames.append(jpeg(img))
    return frames, (xx - 50) ** 2 + (yy - 60) ** 2 <= 25**2


@pytest.fixture(scope="module")
def disappearing_checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("model") / "sam2_disappearing.pt")
    make_checkpoint(path, **DISAPPEARING)
    return path


def test_object_that_disappears_and_comes_back(disappearing_checkpoint, device):
    frames, prompt = disappearing_frames()
    official = official_masks(disappearing_checkpoint, frames, masks=[prompt], device=device)
    present = [bool(f[0].any()) for f in official]
    # The scenario really happens: present, absent for the whole gap, present again.
    assert present == [i not in GONE for i in range(FRAMES)], present

    function = Function({**model_env(disappearing_checkpoint, device=device), "CVAT_FUNCTIONS_REDIS_HOST": ""})
    ours = run_function(function, frames, [mask_shape(prompt)])
    assert [shapes[0] is None for shapes in ours] == [i in GONE for i in range(FRAMES)]
    got = [[answer_mask(s, width=FRAME_W, height=FRAME_H) for s in shapes] for shapes in ours]
    assert_same_masks(got, official)


def track_with_core(tracker, frames, *, masks):
    """Masks from Sam2Tracker directly, each object given the frames `tracker.window` names."""
    first = tracker.preprocess(PIL.Image.open(io.BytesIO(frames[0])))
    prompts = [tracker.init_with_mask(first, m) for m in masks]
    objects = [{"prompt": p.memory, "recent": {}, "masks": [p.mask]} for p in prompts]
    for index in range(1, len(frames)):
        frame = tracker.preprocess(PIL.Image.open(io.BytesIO(frames[index])))
        pointer_frames, memory_frames = tracker.window(index)
        for obj in objects:
            recent = {
                t: FrameMemory(maskmem=m.maskmem if t in memory_frames else None, obj_ptr=m.obj_ptr)
                for t, m in obj["recent"].items()
                if t in pointer_frames
            }
            step = tracker.track(frame, index=index, prompt=obj["prompt"], recent=recent)
            obj["recent"][index] = step.memory
            obj["masks"].append(step.mask)
    return [[obj["masks"][i] for obj in objects] for i in range(len(frames))]


def test_comparison_catches_a_shorter_memory_window(tracker, checkpoint, frames):
    # The core with the official window gives the official masks. With the model attending 3
    # earlier memories instead of 6 (pointers unchanged), the masks must differ: the comparisons
    # in this file can tell a port with a shorter memory from the official predictor.
    official = official_masks(checkpoint, frames, masks=first_masks())
    assert_same_masks(track_with_core(tracker, frames, masks=first_masks()), official)
    full = tracker.model.num_maskmem
    tracker.model.num_maskmem = 4  # the prompt frame and 3 previous frames
    try:
        shorter = track_with_core(tracker, frames, masks=first_masks())
    finally:
        tracker.model.num_maskmem = full
    differing = sum(int((a != b).sum()) for f, g in zip(shorter, official) for a, b in zip(f, g))
    assert differing > 0

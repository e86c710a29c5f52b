"""The cvat-cli agent function: cvat-sdk's tracking interface on the same SAM2 core, just as exact.

Sessions are driven the way cvat-cli's agent drives them: one `preprocess_image` per frame,
`init_tracking_state` once per shape on the first frame, then `track` per state on every later
frame. The agent answers nothing for the first frame, so comparisons start at frame 1.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image
import pytest
from cvat_sdk.masks import decode_mask, encode_mask

import cvat_agent_function
from support import (
    CONFIG, FIRST_BOXES, FRAME_H, FRAME_W, OVERRIDES, ROOT, assert_same_masks, bounding_box, first_masks,
    make_checkpoint, make_frames,
)
from errors import BadRequest
from model_handler import Frame
from support import official_masks

FRAMES = 20
FUNCTION_FILE = Path(ROOT) / "cvat_agent_function.py"


class _Context(cvataa.TrackingFunctionContext):
    pass


class _ShapeContext(cvataa.TrackingFunctionShapeContext):
    def __init__(self, shape_type: str):
        self._shape_type = shape_type

    @property
    def original_shape_type(self) -> str:
        return self._shape_type


def drive(function, frames: list[bytes], shapes: list[cvataa.TrackableShape]):
    """Run a session as the agent does; return (per later frame, per object shape-or-None; states)."""
    images = [PIL.Image.open(io.BytesIO(data)) for data in frames]
    pp_image = function.preprocess_image(_Context(), images[0])
    states = [function.init_tracking_state(_ShapeContext(s.type), pp_image, s) for s in shapes]
    results = []
    for image in images[1:]:
        pp_image = function.preprocess_image(_Context(), image)
        results.append([function.track(_ShapeContext(s.type), pp_image, st) for s, st in zip(shapes, states)])
    return results, states


def run_nuclio(function, frames: list[bytes], shapes: list[dict]) -> list[list]:
    """The Nuclio handler on the same frames; its answers for frames 1.. (frame 0 is the prompt)."""
    answer = function.track(frames[0], shapes=shapes)
    results = []
    for frame in frames[1:]:
        answer = function.track(frame, states=answer["states"])
        results.append(answer["shapes"])
    return results


def to_mask(shape) -> np.ndarray:
    if shape is None:
        return np.zeros((FRAME_H, FRAME_W), dtype=bool)
    shape = shape if isinstance(shape, dict) else {"type": shape.type, "points": shape.points}
    assert shape["type"] == "mask"
    return decode_mask(shape["points"], image_width=FRAME_W, image_height=FRAME_H)


def mask_shapes() -> list[cvataa.TrackableShape]:
    return [cvataa.TrackableShape(type="mask", points=encode_mask(m)) for m in first_masks()]


def model_parameters(checkpoint: str) -> dict:
    """What `-p config=str:... -p checkpoint=str:...` etc. hand to `create`."""
    return {"config": CONFIG, "checkpoint": checkpoint, "config_overrides": " ".join(OVERRIDES), "device": "cpu"}


@pytest.fixture(scope="module")
def agent_function(checkpoint):
    return cvat_agent_function.create(**model_parameters(checkpoint))


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    return make_frames(FRAMES)


@pytest.fixture(scope="module")
def mask_session(agent_function, frames):
    return drive(agent_function, frames, mask_shapes())


@pytest.fixture(scope="module")
def official_from_masks(checkpoint, frames):
    return official_masks(checkpoint, frames, masks=first_masks())[1:]


def test_cvat_registers_a_tracker_of_masks_polygons_and_rectangles():
    # What cvat-cli's agent tells CVAT about the function when it registers it.
    pytest.importorskip("cvat_cli")
    from cvat_cli._internal import agent

    driver = agent.get_function_driver_class(cvat_agent_function.spec)
    assert driver.FUNCTION_KIND == "tracker"
    assert driver.get_remote_function_fields(cvat_agent_function.spec) == {
        "supported_shape_types": ["mask", "polygon", "rectangle"]
    }


def test_mask_prompts_match_official_predictor(mask_session, official_from_masks):
    results, _ = mask_session
    assert all(shape.type == "mask" for frame in results for shape in frame)
    assert_same_masks([[to_mask(s) for s in frame] for frame in results], official_from_masks)


def test_mask_prompts_match_nuclio_handler(mask_session, function, frames, official_from_masks):
    results, _ = mask_session
    nuclio = run_nuclio(function, frames, [{"type": "mask", "points": encode_mask(m)} for m in first_masks()])
    assert [[{"type": s.type, "points": s.points} for s in frame] for frame in results] == nuclio
    assert_same_masks([[to_mask(s) for s in frame] for frame in nuclio], official_from_masks)


def test_box_prompts_give_rectangles_around_the_official_masks(agent_function, checkpoint, frames, monkeypatch):
    seen = []  # every mask the function encodes, in call order: per frame, per object

    def spy(mask, kind, **kwargs):
        seen.append(mask)
        return encode_shape(mask, kind, **kwargs)

    encode_shape = cvat_agent_function.encode_shape
    monkeypatch.setattr(cvat_agent_function, "encode_shape", spy)
    shapes = [cvataa.TrackableShape(type="rectangle", points=box) for box in FIRST_BOXES]
    results, _ = drive(agent_function, frames, shapes)

    official = official_masks(checkpoint, frames, boxes=FIRST_BOXES)[1:]
    assert_same_masks([seen[i : i + 2] for i in range(0, len(seen), 2)], official)
    assert all(shape.type == "rectangle" for frame in results for shape in frame)
    assert [[s.points for s in frame] for frame in results] == [[bounding_box(m) for m in f] for f in official]


def test_polygon_prompts_give_the_nuclio_handlers_polygons(agent_function, function, frames):
    polygons = [[22, 40, 40, 30, 58, 45, 50, 68, 28, 64], [98, 60, 120, 58, 122, 82, 100, 80]]
    shapes = [cvataa.TrackableShape(type="polygon", points=p) for p in polygons]
    results, _ = drive(agent_function, frames[:4], shapes)
    nuclio = run_nuclio(function, frames[:4], [{"type": "polygon", "points": p} for p in polygons])
    assert [[{"type": s.type, "points": s.points} for s in frame] for frame in results] == nuclio
    assert all(shape.type == "polygon" and len(shape.points) >= 6 for frame in results for shape in frame)


def test_state_keeps_only_the_window_the_next_frame_reads(mask_session, agent_function):
    _, states = mask_session
    tracker = agent_function._tracker
    for state in states:
        window = state.window
        assert window.index == FRAMES - 1
        pointers, memories = tracker.window(window.index + 1)
        assert list(window.recent) == list(pointers)  # the last 15 frames' pointers
        assert [t for t, m in window.recent.items() if m.maskmem is not None] == list(memories)  # the last 6
        assert len(pointers) == tracker.pointer_frames and len(memories) == tracker.memory_frames


def test_a_lost_object_is_none_and_tracking_goes_on(tmp_path, frames):
    checkpoint = str(tmp_path / "absent.pt")
    make_checkpoint(checkpoint, obj_score_bias=-10.0)  # SAM2 calls every object absent
    function = cvat_agent_function.create(**model_parameters(checkpoint))
    results, states = drive(function, frames[:3], mask_shapes())
    assert results == [[None, None]] * 2
    assert [state.window.index for state in states] == [2, 2]


def test_an_invalid_shape_is_refused_naming_it(agent_function):
    # Refused while decoding, before any model work, so the frame needs no features.
    pp_image = Frame(width=FRAME_W, height=FRAME_H, vision_feats=[], vision_pos_embeds=[], feat_sizes=[])
    shape = cvataa.TrackableShape(type="polygon", points=[10, 10, 20, 20])
    with pytest.raises(BadRequest, match="shape.points of a polygon"):
        agent_function.init_tracking_state(_ShapeContext("polygon"), pp_image, shape)


def test_an_unknown_parameter_is_refused():
    with pytest.raises(TypeError, match="modelid"):
        cvat_agent_function.create(modelid="facebook/sam2.1-hiera-tiny")


def test_function_file_loads_from_another_directory(tmp_path):
    # `cvat-cli ... --function-file` runs from anywhere, with the project root not on sys.path.
    code = (
        "import importlib.util as u, sys\n"
        f"s = u.spec_from_file_location('__cvat_function__', {str(FUNCTION_FILE)!r})\n"
        "m = u.module_from_spec(s); s.loader.exec_module(m)\n"
        "print(sorted(m.spec.supported_shape_types), callable(m.create))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['mask', 'polygon', 'rectangle'] True"


def test_cvat_cli_agent_worker_tracks_like_the_interface(checkpoint, frames, mask_session):
    """cvat-cli's own loader (`--function-file`, `-p`) and agent worker jobs, in-process."""
    pytest.importorskip("cvat_cli")
    from cvat_cli._internal import agent, agent_driver_tracking
    from cvat_cli._internal.common import FunctionLoader
    from cvat_cli._internal.parsers import parse_function_parameter

    options = [f"{name}=str:{value}" for name, value in model_parameters(checkpoint).items()]
    loader = FunctionLoader(None, FUNCTION_FILE, dict(map(parse_function_parameter, options)))
    ids = iter(f"state-{i}" for i in range(100))
    agent._worker_init(loader, lambda: next(ids))

    driver = agent.get_function_driver_class(cvat_agent_function.spec)
    assert driver.FUNCTION_KIND == "tracker"
    assert driver.get_remote_function_fields(cvat_agent_function.spec) == {
        "supported_shape_types": ["mask", "polygon", "rectangle"]
    }

    images = [PIL.Image.open(io.BytesIO(data)) for data in frames[:4]]
    states = agent_driver_tracking._worker_job_init_tracking(1, images[0], mask_shapes())
    results = [agent_driver_tracking._worker_job_track(1, image, states) for image in images[1:]]
    expected, _ = mask_session
    assert results == expected[:3]

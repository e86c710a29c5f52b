"""The SAM2 tracker as a cvat-sdk auto-annotation tracking function, for `cvat-cli` agents.

For CVAT Online (and Enterprise 2.42+) where Nuclio cannot be deployed:

    cvat-cli function create-native "SAM2 tracker" --function-file cvat_agent_function.py -p model_id=str:facebook/sam2.1-hiera-tiny
    cvat-cli function run-agent <function id> --function-file cvat_agent_function.py -p model_id=str:facebook/sam2.1-hiera-tiny

cvat-cli calls `create(**parameters)`, then per request `preprocess_image` once per frame and
`init_tracking_state` or `track` once per object. The agent keeps each object's state in its own
memory (cvat-cli's design), so there is no state store here: the state is the window of SAM2
memories the next frame reads, as in tracking.py, and the model is the same `model_handler` core.
"""

import dataclasses
import os
import sys
from typing import Mapping, Optional

import cvat_sdk.auto_annotation as cvataa
import PIL.Image

# `--function-file` executes this file outside any package; make its sibling modules importable.
_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from config import DEFAULT_MODEL_ID, Settings  # noqa: E402
from model_handler import Frame, FrameMemory, Sam2Tracker, load_tracker  # noqa: E402
from shapes import SHAPE_TYPES, decode_shape, encode_shape  # noqa: E402

# A shape comes back with the type it was given: mask -> mask, polygon -> polygon, rectangle ->
# the mask's bounding box (see shapes.py).
spec = cvataa.TrackingFunctionSpec(supported_shape_types=SHAPE_TYPES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Window:
    """What the next frame of one object needs; replaced as a whole after every frame."""

    prompt: FrameMemory  # the prompt frame's memory and pointer, read on every frame
    index: int  # frames tracked since the prompt frame (0: only the prompt)
    # Earlier frames by index: pointers of the last `pointer_frames`, memories (maskmem) of the
    # last `memory_frames`; older frames are dropped and the rest have maskmem None.
    recent: Mapping[int, FrameMemory]


@dataclasses.dataclass(kw_only=True)
class _TrackingState:
    """The object cvat-cli keeps per tracked shape and passes back to every `track`.

    The agent never takes a new state from `track`, so this holder is the one mutable part.
    Swapping in a whole new window means a step that raises leaves the previous frame's window.
    """

    window: _Window


class Sam2TrackingFunction:
    """One loaded SAM2 model serving every object the agent tracks."""

    spec = spec

    def __init__(
        self,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        device: Optional[str] = None,
        config: Optional[str] = None,
        checkpoint: Optional[str] = None,
        config_overrides: str = "",
        polygon_tolerance: float = Settings.polygon_tolerance,
    ):
        # The same fields the Nuclio function reads from SAM2_* variables (see config.py).
        self._settings = Settings(
            model_id=model_id,
            device=device or None,
            config=config or None,
            checkpoint=checkpoint or None,
            config_overrides=tuple(config_overrides.split()),
            polygon_tolerance=polygon_tolerance,
        )
        self._tracker: Sam2Tracker = load_tracker(self._settings)

    def preprocess_image(self, context: cvataa.TrackingFunctionContext, image: PIL.Image.Image) -> Frame:
        return self._tracker.preprocess(image)

    def init_tracking_state(
        self,
        context: cvataa.TrackingFunctionShapeContext,
        pp_image: Frame,
        shape: cvataa.TrackableShape,
    ) -> _TrackingState:
        prompt = decode_shape(
            {"type": shape.type, "points": list(shape.points)},
            width=pp_image.width,
            height=pp_image.height,
            field="shape",
        )
        if prompt.box is not None:
            step = self._tracker.init_with_box(pp_image, prompt.box)
        else:
            step = self._tracker.init_with_mask(pp_image, prompt.mask)
        return _TrackingState(window=_Window(prompt=step.memory, index=0, recent={}))

    def track(
        self,
        context: cvataa.TrackingFunctionShapeContext,
        pp_image: Frame,
        state: _TrackingState,
    ) -> Optional[cvataa.TrackableShape]:
        """The object on the next frame, or None when SAM2 finds it absent."""
        window = state.window
        index = window.index + 1
        step = self._tracker.track(pp_image, index=index, prompt=window.prompt, recent=window.recent)
        state.window = _Window(
            prompt=window.prompt,
            index=index,
            recent=self._keep(recent={**window.recent, index: step.memory}, index=index + 1),
        )
        shape = encode_shape(step.mask, context.original_shape_type, tolerance=self._settings.polygon_tolerance)
        return None if shape is None else cvataa.TrackableShape(**shape)

    def _keep(self, *, recent: Mapping[int, FrameMemory], index: int) -> dict[int, FrameMemory]:
        """The part of `recent` that frame `index` and later frames read."""
        pointers, memories = self._tracker.window(index)
        return {
            t: recent[t] if t in memories else dataclasses.replace(recent[t], maskmem=None)
            for t in pointers
        }


create = Sam2TrackingFunction

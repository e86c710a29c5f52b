"""SAM2 core: one frame at a time, the same steps as the official `SAM2VideoPredictor`.

The official predictor keeps a whole video and every object's memory in one `inference_state`.
Here a frame arrives per request and an object's memory comes from a store, so this module
exposes the predictor's three moments as separate calls, each the exact sequence of model calls
the predictor makes (sam2 1.1.0, `sam2_video_predictor.py`):

- `preprocess`: the JPEG-folder loader's resize and normalisation, then `forward_image`;
- `init_with_mask` / `init_with_box`: `add_new_mask` / `add_new_points_or_box` on frame 0, then
  the memory encoding that `propagate_in_video_preflight` does for prompt frames;
- `track`: one frame of `propagate_in_video`, given the prompt frame's memory and the recent ones.

It imports neither Nuclio nor Redis; the caller decides where memories live.
"""

import contextlib
import dataclasses
import hashlib
import logging
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from config import Settings
from errors import ModelLoadError

log = logging.getLogger(__name__)

# See load_video_frames in the sam2 source: ImageNet statistics.
_IMG_MEAN = (0.485, 0.456, 0.406)
_IMG_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Frame:
    """One preprocessed frame, shared by every object tracked on it."""

    width: int  # original frame size, for the output masks
    height: int
    vision_feats: list  # per feature level: [HW, 1, C] float32 (bf16 under CUDA autocast)
    vision_pos_embeds: list  # per feature level: [HW, 1, C]
    feat_sizes: list  # per feature level: (H, W)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrameMemory:
    """What later frames need from one tracked frame of one object."""

    maskmem: Optional[torch.Tensor]  # [1, mem_dim, S/16, S/16] bfloat16; None when only the pointer is kept
    obj_ptr: torch.Tensor  # [1, hidden_dim] object pointer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Step:
    """The result of one frame for one object."""

    memory: FrameMemory
    mask: np.ndarray  # [height, width] bool; all False when the object is absent


class Sam2Tracker:
    """A loaded SAM2 model plus the constants every object shares."""

    def __init__(self, model, *, fingerprint: str):
        self.model = model
        self.fingerprint = fingerprint  # identifies config + overrides + weights, see state_codec
        self.device = model.device
        self.image_size = model.image_size
        # Memory frames attended besides the prompt frame (num_maskmem=7: 1 prompt + 6 previous).
        self.memory_frames = model.num_maskmem - 1
        # Previous frames whose object pointers are attended (max_obj_ptrs_in_encoder=16: 15 + prompt).
        self.pointer_frames = model.max_obj_ptrs_in_encoder - 1
        self._autocast = self.device.type == "cuda"  # the official demos run CUDA in bf16 autocast
        self._mean = torch.tensor(_IMG_MEAN, dtype=torch.float32, device=self.device)[:, None, None]
        self._std = torch.tensor(_IMG_STD, dtype=torch.float32, device=self.device)[:, None, None]
        self._fill_holes = model.fill_hole_area > 0 and _has_sam2_extension()
        with self._inference():
            self._maskmem_pos_enc = self._compute_maskmem_pos_enc()

    def _inference(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self._autocast:
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        return stack

    def _compute_maskmem_pos_enc(self) -> list:
        # The memory's spatial encoding depends only on its shape, so the predictor keeps one
        # copy for the whole session; it is computed once here by encoding an empty memory.
        side = self.image_size // self.model.backbone_stride
        pix_feat = torch.zeros(1, self.model.hidden_dim, side, side, device=self.device)
        mask = torch.zeros(1, 1, self.image_size, self.image_size, device=self.device)
        out = self.model.memory_encoder(pix_feat, mask, skip_mask_sigmoid=True)
        return [x[0:1].clone() for x in out["vision_pos_enc"]]

    def preprocess(self, image: PIL.Image.Image) -> Frame:
        """Resize and normalise like the JPEG-folder loader, then run the image encoder once."""
        width, height = image.size
        size = self.image_size
        # PIL's default resampling (bicubic), then the float64 division by 255 and the cast to
        # float32 that load_video_frames does. The division runs on the model's device: IEEE
        # division is exact to the last bit on both, and only the uint8 pixels cross to the GPU.
        # The result is a contiguous NCHW tensor, as the official loader's: a channels-last one
        # could make cuDNN choose another convolution kernel.
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # protocol.py already converts
        pixels = torch.from_numpy(np.array(rgb.resize((size, size)))).to(self.device)
        img = pixels.permute(2, 0, 1).to(torch.float64).div_(255.0).to(torch.float32).contiguous()
        img -= self._mean
        img /= self._std
        with self._inference():
            backbone_out = self.model.forward_image(img.unsqueeze(0))
            # _get_image_feature expands the features to the batch size (1 object at a time).
            backbone_out = {
                "backbone_fpn": [x.expand(1, -1, -1, -1) for x in backbone_out["backbone_fpn"]],
                "vision_pos_enc": [x.expand(1, -1, -1, -1) for x in backbone_out["vision_pos_enc"]],
            }
            _, feats, pos_embeds, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        if self.device.type == "cuda":
            # Wait for the encoder here rather than at the first object's first host-to-device
            # copy, which comes right after and waits for it anyway, so that the request log
            # (tracking.RequestStats) counts the encoder's GPU time as the encoder's. Measured on
            # an H100 (large model, 1024, 1, 4 and 16 objects): the same time per request without it.
            torch.cuda.synchronize(self.device)
        return Frame(
            width=width,
            height=height,
            vision_feats=feats,
            vision_pos_embeds=pos_embeds,
            feat_sizes=feat_sizes,
        )

    def init_with_mask(self, frame: Frame, mask: np.ndarray) -> Step:
        """Start an object from a [height, width] bool mask, as `add_new_mask` does."""
        with self._inference():
            mask_input = torch.from_numpy(np.asarray(mask, dtype=bool))[None, None].float().to(self.device)
            if mask_input.shape[-2:] != (self.image_size, self.image_size):
                mask_input = F.interpolate(
                    mask_input,
                    size=(self.image_size, self.image_size),
                    align_corners=False,
                    mode="bilinear",
                    antialias=True,
                )
                mask_input = (mask_input >= 0.5).float()
            return self._init(frame=frame, point_inputs=None, mask_inputs=mask_input)

    def init_with_box(self, frame: Frame, box: Sequence[float]) -> Step:
        """Start an object from an [x1, y1, x2, y2] pixel box, as `add_new_points_or_box(box=...)` does."""
        with self._inference():
            # The box becomes two points labelled 2 and 3, normalised and scaled to the model's size.
            points = torch.tensor(box, dtype=torch.float32).reshape(1, 2, 2)
            points = points / torch.tensor([frame.width, frame.height])
            points = (points * self.image_size).to(self.device)
            labels = torch.tensor([[2, 3]], dtype=torch.int32, device=self.device)
            point_inputs = {"point_coords": points, "point_labels": labels}
            return self._init(frame=frame, point_inputs=point_inputs, mask_inputs=None)

    def _init(self, *, frame: Frame, point_inputs, mask_inputs) -> Step:
        out = self.model.track_step(
            frame_idx=0,
            is_init_cond_frame=True,
            current_vision_feats=frame.vision_feats,
            current_vision_pos_embeds=frame.vision_pos_embeds,
            feat_sizes=frame.feat_sizes,
            point_inputs=point_inputs,
            mask_inputs=mask_inputs,
            output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
            num_frames=self.pointer_frames + 1,  # unused on a prompt frame
            run_mem_encoder=False,  # the predictor encodes prompt frames in the preflight
        )
        pred_masks = self._postprocess(out["pred_masks"])
        # propagate_in_video_preflight: memory from the stored low-res masks, upsampled to the
        # model size, encoded as a user-given ("from points") mask.
        high_res = F.interpolate(
            pred_masks,
            size=(self.image_size, self.image_size),
            mode="bilinear",
            align_corners=False,
        )
        maskmem, _ = self.model._encode_new_memory(
            current_vision_feats=frame.vision_feats,
            feat_sizes=frame.feat_sizes,
            pred_masks_high_res=high_res,
            object_score_logits=out["object_score_logits"],
            is_mask_from_pts=True,
        )
        memory = FrameMemory(maskmem=maskmem.to(torch.bfloat16), obj_ptr=out["obj_ptr"])
        return Step(memory=memory, mask=self._to_frame_mask(pred_masks, frame))

    def window(self, index: int) -> tuple[range, range]:
        """The earlier frames `track(index=index)` reads: (pointer frames, memory frames).

        The prompt frame (0) is read on every frame and is in neither range; older frames can be
        forgotten, and a frame only in the first range needs its pointer, not its memory.
        """
        return (
            range(max(1, index - self.pointer_frames), index),
            range(max(1, index - self.memory_frames), index),
        )

    def track(self, frame: Frame, *, index: int, prompt: FrameMemory, recent: Mapping[int, FrameMemory]) -> Step:
        """Track one object onto `frame`, the `index`-th frame after its prompt frame (index >= 1).

        `recent` maps earlier frame indices to their memories: those `window(index)` names, with
        maskmem for the memory frames. This is one frame of `propagate_in_video` for one object;
        objects are never batched (see "Objects in one batch" in the README for why).
        """

        def entry(m: FrameMemory) -> dict:  # the shape track_step reads from output_dict
            # track_step moves memories to the device itself, but stacks pointers as they are.
            return {"maskmem_features": m.maskmem, "maskmem_pos_enc": self._maskmem_pos_enc,
                    "obj_ptr": m.obj_ptr.to(self.device)}

        output_dict = {
            "cond_frame_outputs": {0: entry(prompt)},
            "non_cond_frame_outputs": {t: entry(m) for t, m in recent.items()},
        }
        with self._inference():
            out = self.model.track_step(
                frame_idx=index,
                is_init_cond_frame=False,
                current_vision_feats=frame.vision_feats,
                current_vision_pos_embeds=frame.vision_pos_embeds,
                feat_sizes=frame.feat_sizes,
                point_inputs=None,
                mask_inputs=None,
                output_dict=output_dict,
                # The frame count is unknown; pointer distances are normalised as in a video of
                # 16 frames or more (min(num_frames, 16) - 1 = 15), and no pointer is cut off.
                num_frames=max(index + 1, self.pointer_frames + 1),
                run_mem_encoder=True,
            )
            memory = FrameMemory(maskmem=out["maskmem_features"].to(torch.bfloat16), obj_ptr=out["obj_ptr"])
            pred_masks = self._postprocess(out["pred_masks"])
            return Step(memory=memory, mask=self._to_frame_mask(pred_masks, frame))

    def _postprocess(self, pred_masks: torch.Tensor) -> torch.Tensor:
        # fill_holes_in_mask_scores needs sam2's CUDA extension; without it the predictor warns
        # and returns the masks unchanged, which is what skipping it here does.
        if self._fill_holes:
            from sam2.utils.misc import fill_holes_in_mask_scores

            pred_masks = fill_holes_in_mask_scores(pred_masks, self.model.fill_hole_area)
        return pred_masks

    def _to_frame_mask(self, pred_masks: torch.Tensor, frame: Frame) -> np.ndarray:
        # _get_orig_video_res_output: bilinear upsampling without antialias, then "> 0".
        video_res = F.interpolate(
            pred_masks, size=(frame.height, frame.width), mode="bilinear", align_corners=False
        )
        return (video_res[0, 0] > 0).cpu().numpy()


def _has_sam2_extension() -> bool:
    try:
        import sam2._C  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_weights(settings: Settings) -> tuple[str, str]:
    """Return (sam2 config name, local checkpoint path) for the configured model."""
    if settings.config or settings.checkpoint:
        if not (settings.config and settings.checkpoint):
            raise ModelLoadError("SAM2_CONFIG and SAM2_CHECKPOINT must be set together")
        if not os.path.isfile(settings.checkpoint):
            raise ModelLoadError(f"SAM2_CHECKPOINT={settings.checkpoint!r} is not a file")
        return settings.config, settings.checkpoint

    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    if settings.model_id not in HF_MODEL_ID_TO_FILENAMES:
        known = ", ".join(sorted(HF_MODEL_ID_TO_FILENAMES))
        raise ModelLoadError(f"SAM2_MODEL_ID={settings.model_id!r} is not one of: {known}")
    config, filename = HF_MODEL_ID_TO_FILENAMES[settings.model_id]
    import huggingface_hub

    try:
        # Uses the Hugging Face cache and honours HF_HUB_OFFLINE.
        path = huggingface_hub.hf_hub_download(repo_id=settings.model_id, filename=filename)
    except Exception as e:  # the hub raises many types: offline, missing, network, auth
        raise ModelLoadError(
            f"could not get the weights of SAM2_MODEL_ID={settings.model_id!r} ({e}). "
            "Download them beforehand (the image build does), or set SAM2_CONFIG and "
            "SAM2_CHECKPOINT to a local checkpoint."
        ) from e
    return config, path


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tracker(settings: Settings) -> Sam2Tracker:
    """Build the model the way `build_sam2_video_predictor` does and wrap it."""
    from sam2.build_sam import build_sam2_video_predictor

    config, checkpoint = resolve_weights(settings)
    device = select_device(settings.device)
    log.info("loading SAM2 %s from %s on %s", config, checkpoint, device)
    try:
        model = build_sam2_video_predictor(
            config,
            checkpoint,
            device=device,
            hydra_overrides_extra=list(settings.config_overrides),
        )
    except Exception as e:  # hydra, torch.load and load_state_dict raise many types
        raise ModelLoadError(
            f"could not build SAM2 from config {config!r} and checkpoint {checkpoint!r} "
            f"with overrides {list(settings.config_overrides)} ({type(e).__name__}: {e}). "
            "Check SAM2_MODEL_ID, SAM2_CONFIG, SAM2_CHECKPOINT and SAM2_CONFIG_OVERRIDES."
        ) from e
    fingerprint = model_fingerprint(config, settings.config_overrides, _file_digest(checkpoint), device)
    return Sam2Tracker(model, fingerprint=fingerprint)


def model_fingerprint(config: str, overrides: Sequence[str], weights_digest: str, device: torch.device) -> str:
    """What a stored state must have been made with: config, overrides, weights, and the numerics.

    Memories made on another device type or precision (fp32 on the CPU, bf16 autocast on CUDA)
    would continue with mixed numerics and match neither official run, so they count too.
    """
    precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    parts = [config, *overrides, weights_digest, device.type, precision]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def select_device(name: Optional[str]) -> torch.device:
    """The torch device for SAM2_DEVICE (None: cuda when available), made current on CUDA.

    sam2's hole-filling kernel launches on the current CUDA device's stream without a device
    guard, so on cuda:N with N > 0 the current device must be N, or it reads another GPU's memory.
    """
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"SAM2_DEVICE={name!r} but no CUDA device is available")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"SAM2_DEVICE={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device

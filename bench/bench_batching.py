"""Should objects be tracked as one batch? Per-frame time of one `track_step` per object (what the
function does) vs one `track_step` for all objects, side by side on the same frames.

Objects started on the same frame have memory windows of the same layout, so their memories can
be stacked along the batch dimension, as sam2's legacy predictor does. The official predictor
(sam2 1.1.0) runs objects one at a time, so batching is only worth having if it is much faster and
its masks stay those of the official predictor: each frame's masks from both ways are compared
with the official `SAM2VideoPredictor`'s (bf16 autocast on CUDA, as the official demos run).

    python bench/bench_batching.py --device cuda [--objects 16] [--size 1024] [--frames 24]

Writes bench/results/batching.json.
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

import PIL.Image
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from bench_handler import STEADY_FROM, machine  # noqa: E402
from support import CONFIG, grid_masks, iou, make_checkpoint, make_frames, official_masks  # noqa: E402

from config import Settings  # noqa: E402
from model_handler import FrameMemory, load_tracker  # noqa: E402


def batched_frame(tracker, image, batch: int) -> dict:
    """The function's own preprocessing, its features expanded to `batch` objects (the same values
    and strides as expanding before _prepare_backbone_features, as the predictor does)."""
    frame = tracker.preprocess(image)
    return {
        "feats": [x.expand(-1, batch, -1) for x in frame.vision_feats],
        "pos": [x.expand(-1, batch, -1) for x in frame.vision_pos_embeds],
        "sizes": frame.feat_sizes,
        "width": frame.width,
        "height": frame.height,
    }


def track_batched(tracker, frame: dict, *, index: int, prompt: FrameMemory, recent: dict) -> tuple:
    """One track_step for all objects; `prompt` and `recent` hold [B, ...] stacked memories."""
    import torch.nn.functional as F

    batch = prompt.obj_ptr.shape[0]
    pos_enc = [x.expand(batch, -1, -1, -1) for x in tracker._maskmem_pos_enc]

    def entry(m):
        return {"maskmem_features": m.maskmem, "maskmem_pos_enc": pos_enc, "obj_ptr": m.obj_ptr}

    with tracker._inference():
        out = tracker.model.track_step(
            frame_idx=index,
            is_init_cond_frame=False,
            current_vision_feats=frame["feats"],
            current_vision_pos_embeds=frame["pos"],
            feat_sizes=frame["sizes"],
            point_inputs=None,
            mask_inputs=None,
            output_dict={"cond_frame_outputs": {0: entry(prompt)},
                         "non_cond_frame_outputs": {t: entry(m) for t, m in recent.items()}},
            num_frames=max(index + 1, tracker.pointer_frames + 1),
            run_mem_encoder=True,
        )
        memory = FrameMemory(maskmem=out["maskmem_features"].to(torch.bfloat16), obj_ptr=out["obj_ptr"])
        pred = tracker._postprocess(out["pred_masks"])
        video = F.interpolate(pred, size=(frame["height"], frame["width"]), mode="bilinear", align_corners=False)
        masks = (video[:, 0] > 0).cpu().numpy()
    return memory, list(masks)


def stack(memories: list) -> FrameMemory:
    maskmem = None if memories[0].maskmem is None else torch.cat([m.maskmem for m in memories])
    return FrameMemory(maskmem=maskmem, obj_ptr=torch.cat([m.obj_ptr.to(memories[0].obj_ptr.device) for m in memories]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--frame-size", type=int, nargs=2, default=[960, 540])
    parser.add_argument("--seed", type=int, default=7, help="of the synthetic video")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "batching.json"))
    args = parser.parse_args()
    width, height = args.frame_size
    frames = make_frames(args.frames, seed=args.seed, width=width, height=height)
    masks = grid_masks(args.objects, width=width, height=height)
    overrides = (f"++model.image_size={args.size}",)

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "random.pt")
        make_checkpoint(checkpoint)
        tracker = load_tracker(Settings(config=CONFIG, checkpoint=checkpoint, config_overrides=overrides,
                                        device=args.device))
        print("official predictor ...", file=sys.stderr, flush=True)
        official = official_masks(checkpoint, frames, masks=masks, device=args.device, overrides=overrides)

    images = [PIL.Image.open(io.BytesIO(f)) for f in frames]
    first = tracker.preprocess(images[0])
    prompts = [tracker.init_with_mask(first, m).memory for m in masks]
    loop_recent = [{} for _ in masks]
    batch_prompt, batch_recent = stack(prompts), {}
    loop_ms, batch_ms = [], []
    worst = {"loop": 1.0, "batched": 1.0}
    differing = {"loop": 0, "batched": 0}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for index in range(1, args.frames):
        pointer_frames, memory_frames = tracker.window(index)

        def window(recent):
            return {t: FrameMemory(maskmem=m.maskmem if t in memory_frames else None, obj_ptr=m.obj_ptr)
                    for t, m in recent.items() if t in pointer_frames}

        sync()
        start = time.perf_counter()
        frame = tracker.preprocess(images[index])
        loop_masks = []
        for obj, recent in enumerate(loop_recent):
            step = tracker.track(frame, index=index, prompt=prompts[obj], recent=window(recent))
            recent[index] = step.memory
            loop_masks.append(step.mask)
        sync()
        loop_ms.append((time.perf_counter() - start) * 1000)

        start = time.perf_counter()
        frame = batched_frame(tracker, images[index], args.objects)
        memory, batch_masks = track_batched(tracker, frame, index=index, prompt=batch_prompt,
                                            recent=window(batch_recent))
        batch_recent[index] = memory
        sync()
        batch_ms.append((time.perf_counter() - start) * 1000)

        for name, got in (("loop", loop_masks), ("batched", batch_masks)):
            for mask, expected in zip(got, official[index]):
                worst[name] = min(worst[name], iou(mask, expected))
                differing[name] += int((mask != expected).sum())

    steady = slice(STEADY_FROM - 1, None)
    result = {
        "objects": args.objects,
        "image_size": args.size,
        "frame_size": [width, height],
        "frames_timed": len(loop_ms[steady]),
        "one_at_a_time_ms_median": round(statistics.median(loop_ms[steady]), 1),
        "batched_ms_median": round(statistics.median(batch_ms[steady]), 1),
        "speedup": round(statistics.median(loop_ms[steady]) / statistics.median(batch_ms[steady]), 3),
        "min_iou_vs_official": {k: round(v, 6) for k, v in worst.items()},
        "pixels_differing_from_official": differing,
        "one_at_a_time_ms": [round(v, 1) for v in loop_ms],
        "batched_ms": [round(v, 1) for v in batch_ms],
    }
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_ms")}, indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": __doc__.splitlines()[0], "device": args.device, "machine": machine(args.device),
                   "command": "python " + " ".join(sys.argv), "result": result}, f, indent=2)


if __name__ == "__main__":
    main()

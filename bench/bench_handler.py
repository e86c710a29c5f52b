"""Per-frame time of the function's handler vs the official predictor's propagation.

Both run in this process on the same frames and the same random weights, interleaved frame by
frame (one official frame, then one handler call), so machine noise hits both alike. The handler
time is everything a request costs in-process: JSON and base64 decoding, JPEG decoding, the
model, state (de)serialisation through the embedded store and the shape encoding. The official
time is one step of `propagate_in_video` (its frames were decoded up front by `init_state`).

    .venv/bin/python bench/bench_handler.py [--sizes 512 1024] [--objects 1 3] [--frames 10]

Prints a table and writes bench/results/handler.json.
"""

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from conftest import CONFIG, Function, make_checkpoint, make_frames, model_env  # noqa: E402
from cvat_sdk.masks import encode_mask  # noqa: E402

FRAME_W, FRAME_H = 960, 540


def prompts(count: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W]
    centres = [(240, 270, 110), (660, 400, 90), (500, 150, 70)]
    return [(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r for cx, cy, r in centres[:count]]


def bench_case(*, checkpoint: str, size: int, objects: int, frames: list[bytes], device: str) -> dict:
    from sam2.build_sam import build_sam2_video_predictor

    overrides = [f"++model.image_size={size}"]
    env = {**model_env(checkpoint), "SAM2_CONFIG_OVERRIDES": " ".join(overrides), "SAM2_DEVICE": device,
           "CVAT_FUNCTIONS_REDIS_HOST": ""}
    function = Function(env)
    predictor = build_sam2_video_predictor(CONFIG, checkpoint, device=device, hydra_overrides_extra=overrides)
    masks = prompts(objects)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode(), autocast:
        for i, data in enumerate(frames):
            with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
                f.write(data)
        state = predictor.init_state(video_path=folder)
        for obj_id, mask in enumerate(masks):
            predictor.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=mask)
        official = predictor.propagate_in_video(state)
        next(official)  # the prompt frame (and the preflight memory encoding)

    states = function.track(frames[0], shapes=[{"type": "mask", "points": encode_mask(m)} for m in masks])["states"]
    ours_ms, official_ms = [], []
    for frame in frames[1:]:
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            next(official)
        _sync(device)
        official_ms.append((time.perf_counter() - start) * 1000)
        request = {"image": base64.b64encode(frame).decode(), "shapes": [None] * objects, "states": states}
        start = time.perf_counter()
        status, answer = function.call(request)
        _sync(device)
        ours_ms.append((time.perf_counter() - start) * 1000)
        assert status == 200, answer
        states = answer["states"]
    ours, theirs = statistics.median(ours_ms), statistics.median(official_ms)
    return {
        "image_size": size,
        "objects": objects,
        "frames_timed": len(ours_ms),
        "handler_ms_median": round(ours, 1),
        "official_ms_median": round(theirs, 1),
        "ratio": round(ours / theirs, 3),
        "handler_ms": [round(v, 1) for v in ours_ms],
        "official_ms": [round(v, 1) for v in official_ms],
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--objects", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--frames", type=int, default=10, help="frames per case, the prompt frame included")
    parser.add_argument("--device", default=os.environ.get("SAM2_DEVICE") or "cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "handler.json"))
    args = parser.parse_args()

    frames = make_frames(args.frames, seed=7, width=FRAME_W, height=FRAME_H)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "random.pt")
        make_checkpoint(checkpoint)
        for size in args.sizes:
            for objects in args.objects:
                print(f"image size {size}, {objects} object(s): {args.frames} frames ...", file=sys.stderr, flush=True)
                results.append(bench_case(checkpoint=checkpoint, size=size, objects=objects, frames=frames, device=args.device))

    print(f"\n{'size':>5} {'objects':>7} {'handler ms':>11} {'official ms':>12} {'ratio':>6}")
    for r in results:
        print(f"{r['image_size']:>5} {r['objects']:>7} {r['handler_ms_median']:>11} {r['official_ms_median']:>12} {r['ratio']:>6}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({
            "benchmark": "handler vs official propagate_in_video, per frame, medians",
            "device": args.device,
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                        "torch_threads": torch.get_num_threads()},
            "frame_size": [FRAME_W, FRAME_H],
            "command": "python " + " ".join(sys.argv),
            "results": results,
        }, f, indent=2)
    print(f"\nwritten {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

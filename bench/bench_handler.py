"""Per-frame time of the function's handler vs the official predictor's propagation, masks checked.

Both run in this process on the same frames and the same random weights, interleaved frame by
frame (one official frame, then one handler call), so machine noise hits both alike. The handler
time is everything a request costs in-process: JSON and base64 decoding, JPEG decoding, the
model, state (de)serialisation through the embedded store and the shape encoding. The official
time is one step of `propagate_in_video` (its frames were decoded up front by `init_state`).
Medians are over the steady state: frames 16 on, once every object's memory window is full.
Every frame's masks are compared with the official ones, outside the timed part.

    .venv/bin/python bench/bench_handler.py [--sizes 512 1024] [--objects 1 3] [--frames 24]
    python bench/bench_handler.py --device cuda --sizes 1024 --objects 1 4 16

`--no-official` times the handler alone (for sizing a timeout on a big model, say). Prints a
table and writes bench/results/handler.json (CPU) or bench/results/gpu.json (CUDA).
"""

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from support import Function, autocast, grid_masks, make_checkpoint, make_frames, mask_shape, model_env  # noqa: E402

STEADY_FROM = 16  # the prompt frame, 15 pointer frames: the window is full from frame 16 on


def bench_case(*, checkpoint, config, size, objects, frames, width, height, device, official_too) -> dict:
    from sam2.build_sam import build_sam2_video_predictor

    overrides = [f"++model.image_size={size}"]
    env = {**model_env(checkpoint, device=device, overrides=overrides), "SAM2_CONFIG": config,
           "CVAT_FUNCTIONS_REDIS_HOST": "", "SAM2_MAX_OBJECTS": str(max(objects, 128))}
    function = Function(env)
    masks = grid_masks(objects, width=width, height=height)
    official = None
    if official_too:
        predictor = build_sam2_video_predictor(config, checkpoint, device=device, hydra_overrides_extra=overrides)
        folder = tempfile.TemporaryDirectory()
        for i, data in enumerate(frames):
            with open(os.path.join(folder.name, f"{i:05d}.jpg"), "wb") as f:
                f.write(data)
        with torch.inference_mode(), autocast(device):
            state = predictor.init_state(video_path=folder.name)
            for obj_id, mask in enumerate(masks):
                predictor.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=mask)
            official = predictor.propagate_in_video(state)
            first_official = next(official)  # the prompt frame (and the preflight memory encoding)

    start = time.perf_counter()
    answer = function.track(frames[0], shapes=[mask_shape(m) for m in masks])
    first_ms = (time.perf_counter() - start) * 1000
    states = answer["states"]
    differing = _differences(answer["shapes"], first_official, width, height) if official else None
    ours_ms, official_ms = [], []
    for frame in frames[1:]:
        if official:
            start = time.perf_counter()
            with torch.inference_mode(), autocast(device):
                expected = next(official)
            _sync(device)
            official_ms.append((time.perf_counter() - start) * 1000)
        request = {"image": base64.b64encode(frame).decode(), "shapes": [None] * objects, "states": states}
        start = time.perf_counter()
        status, answer = function.call(request)
        _sync(device)
        ours_ms.append((time.perf_counter() - start) * 1000)
        assert status == 200, answer
        states = answer["states"]
        if official:
            found = _differences(answer["shapes"], expected, width, height)
            differing = {k: differing[k] + found[k] for k in ("pixels", "masks")}
            differing["min_iou"] = min(differing.get("min_iou", 1.0), found["min_iou"])
    steady = slice(STEADY_FROM - 1, None)  # ours_ms[0] is frame 1
    result = {
        "model": config,
        "image_size": size,
        "objects": objects,
        "frame_size": [width, height],
        "first_frame_ms": round(first_ms, 1),
        "frames_timed": len(ours_ms[steady]),
        "handler_ms_median": round(statistics.median(ours_ms[steady]), 1),
        "handler_ms_max": round(max([first_ms] + ours_ms), 1),
        "handler_ms": [round(v, 1) for v in ours_ms],
    }
    if official:
        theirs = statistics.median(official_ms[steady])
        result.update({
            "official_ms_median": round(theirs, 1),
            "ratio": round(result["handler_ms_median"] / theirs, 3),
            "official_ms": [round(v, 1) for v in official_ms],
            "masks_compared": objects * len(frames),
            "masks_differing": differing["masks"],
            "pixels_differing": differing["pixels"],
            "min_iou": round(differing["min_iou"], 6),
        })
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    return result


def _differences(shapes, official_step, width, height) -> dict:
    from support import answer_mask, iou

    _, _, video_res_masks = official_step
    pixels = masks = 0
    lowest = 1.0
    for shape, logits in zip(shapes, video_res_masks):
        expected = (logits[0] > 0).cpu().numpy()
        got = answer_mask(shape, width=width, height=height)
        n = int((got != expected).sum())
        pixels += n
        masks += n > 0
        lowest = min(lowest, iou(got, expected))
    return {"pixels": pixels, "masks": masks, "min_iou": lowest}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine(device: str) -> dict:
    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}
    try:
        import sam2._C  # noqa: F401

        info["sam2_cuda_extension"] = True
    except ImportError:
        info["sam2_cuda_extension"] = False
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            info["driver"] = "unknown"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--objects", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--frames", type=int, default=24, help="frames per case, the prompt frame included")
    parser.add_argument("--frame-size", type=int, nargs=2, default=[960, 540], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_t.yaml", help="sam2 config (random weights)")
    parser.add_argument("--device", default=os.environ.get("SAM2_DEVICE") or "cpu")
    parser.add_argument("--no-official", action="store_true", help="time the handler alone")
    parser.add_argument("--out", help="default: bench/results/handler.json, or gpu.json on CUDA")
    args = parser.parse_args()
    if args.frames <= STEADY_FROM:
        parser.error(f"--frames must be more than {STEADY_FROM}: medians are taken from frame {STEADY_FROM} on")
    out = args.out or os.path.join(HERE, "results", "gpu.json" if args.device.startswith("cuda") else "handler.json")

    width, height = args.frame_size
    frames = make_frames(args.frames, seed=7, width=width, height=height)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "random.pt")
        make_checkpoint(checkpoint, config=args.config)
        for size in args.sizes:
            for objects in args.objects:
                print(f"{args.config}, image size {size}, {objects} object(s), {width}x{height}: "
                      f"{args.frames} frames ...", file=sys.stderr, flush=True)
                results.append(bench_case(checkpoint=checkpoint, config=args.config, size=size, objects=objects,
                                          frames=frames, width=width, height=height, device=args.device,
                                          official_too=not args.no_official))

    print(f"\n{'size':>5} {'objects':>7} {'handler ms':>11} {'official ms':>12} {'ratio':>6} {'max ms':>8} {'differing masks':>16}")
    for r in results:
        print(f"{r['image_size']:>5} {r['objects']:>7} {r['handler_ms_median']:>11} {r.get('official_ms_median', '-'):>12} "
              f"{r.get('ratio', '-'):>6} {r['handler_ms_max']:>8} {r.get('masks_differing', '-'):>16}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({
            "benchmark": "handler vs official propagate_in_video, ms per frame, medians from frame "
                         f"{STEADY_FROM} on; masks compared on every frame",
            "device": args.device,
            "machine": machine(args.device),
            "command": "python " + " ".join(sys.argv),
            "results": results,
        }, f, indent=2)
    print(f"\nwritten {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

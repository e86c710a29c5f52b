"""Redis memory per tracked object, at each image size, on a real redis-server.

An object's state holds the prompt frame's memory, the 6 latest frames' memories and the 15
latest pointers (and small tokens, the latest answer and a header); a memory is 64 channels at
1/16 of the image size, in bfloat16. So its size depends on the model's image size and memory
window only: not on the weights, not on the model's size (the four sam2.1 configs all have
64-channel memories and 256-wide pointers, 7 memories and 16 pointers), and hardly on the frame.

For each image size, a tracker from the sam2.1 hiera tiny config with random weights computes
one prompt frame and one tracking step for real; then --objects objects are tracked for
--frames frames through the function's own TrackingService and Redis store, with the model's
work replaced by that recorded result (as bench_state.py's state I/O part does), one request of
every object per frame. Redis' used_memory is read before the first object and after every
frame; the client buffers Redis holds for the connection (mem_clients_normal) are left out.

    .venv/bin/python bench/redis_sizing.py [--sizes 512 1024] [--objects 32] [--frames 20]

Needs redis-server on PATH. Writes bench/results/redis-sizing.json.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

import PIL.Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from bench_state import FRAME_H, FRAME_W, RecordedModel, prompt_shape  # noqa: E402
from config import Settings  # noqa: E402
from model_handler import load_tracker  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from state_codec import MemoryCodec  # noqa: E402
from state_store import make_store  # noqa: E402
from support import CONFIG, first_masks, make_checkpoint, make_frames  # noqa: E402
from tracking import ObjectRequest, StateRef, TrackingService  # noqa: E402

KIB, MIB = 2**10, 2**20


def sessions_bytes(client) -> int:
    """used_memory without the connections' query and output buffers."""
    info = client.info("memory")
    return info["used_memory"] - info["mem_clients_normal"]


def measure(checkpoint: str, size: int, *, objects: int, frames: int) -> dict:
    tracker = load_tracker(Settings(config=CONFIG, checkpoint=checkpoint, device="cpu",
                                    config_overrides=(f"++model.image_size={size}",)))
    images = [PIL.Image.open(io.BytesIO(data)).convert("RGB") for data in make_frames(2, width=FRAME_W, height=FRAME_H)]
    init = tracker.init_with_mask(tracker.preprocess(images[0]), first_masks(FRAME_W, FRAME_H)[0])
    step = tracker.track(tracker.preprocess(images[1]), index=1, prompt=init.memory, recent={})
    model = RecordedModel(tracker, init=init, step=step)
    codec = MemoryCodec.for_tracker(tracker)
    redis = RedisServer().start()
    try:
        client = redis.client()
        settings = Settings(redis_host="127.0.0.1", redis_port=redis.port)
        service = TrackingService(model, make_store(settings), polygon_tolerance=1.0)
        service.store.ping()
        baseline = sessions_bytes(client)

        def request(objs):
            states = service.track(image=images[0], frame_digest=os.urandom(32), objects=objs)["states"]
            return [StateRef(id=s["id"], t=s["t"], tok=s["tok"]) for s in states]

        refs = request([ObjectRequest(shape=prompt_shape(), state=None)] * objects)
        rows = []
        for t in range(frames + 1):
            if t:
                refs = request([ObjectRequest(shape=None, state=ref) for ref in refs])
            key = settings.state_prefix + refs[0].id
            fields = client.hgetall(key)
            rows.append({
                "frames_tracked": t,
                "used_memory_per_object": round((sessions_bytes(client) - baseline) / objects),
                "field_bytes_per_object": sum(len(k) + len(v) for k, v in fields.items()),
                "memory_usage_command": client.memory_usage(key, samples=0),
                "memories": sum(1 for k in fields if k in (b"cond",) or k.startswith(b"m:")),
                "pointers": sum(1 for k in fields if k in (b"cond",) or k.startswith(b"p:")),
            })
            print(f"  image size {size}, frame {t}: {rows[-1]['used_memory_per_object'] / MIB:.3f} MiB per object",
                  file=sys.stderr, flush=True)
        steady = rows[-1]
        return {
            "image_size": size,
            "memory_shape": list(codec.mem_shape),
            "memory_bytes_bf16": 2 * codec.mem_shape[1] * codec.mem_shape[2] * codec.mem_shape[3],
            "memory_field_bytes": len(client.hget(settings.state_prefix + refs[0].id, f"m:{refs[0].t}")),
            "objects": objects,
            "redis_baseline_used_memory": baseline,
            "steady_used_memory_per_object": steady["used_memory_per_object"],
            "steady_used_memory_per_object_mib": round(steady["used_memory_per_object"] / MIB, 3),
            "steady_field_bytes_per_object": steady["field_bytes_per_object"],
            "by_frames_tracked": rows,
        }
    finally:
        redis.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="the model's image sizes")
    parser.add_argument("--objects", type=int, default=32, help="objects tracked at once, to average over")
    parser.add_argument("--frames", type=int, default=20, help="frames tracked after the prompt frame")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "redis-sizing.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "random.pt")
        make_checkpoint(checkpoint)
        sizes = [measure(checkpoint, size, objects=args.objects, frames=args.frames) for size in args.sizes]
    results = {
        "benchmark": "Redis used_memory per tracked object (sessions only, client buffers left out)",
        "command": "python " + " ".join(sys.argv),
        "redis_server": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
        "model": "sam2.1 hiera tiny config, random weights (the state's shapes are those of every sam2.1 model)",
        "frame_size": [FRAME_W, FRAME_H],
        "sizes": sizes,
    }
    for entry in sizes:
        print(f"image size {entry['image_size']}: {entry['steady_used_memory_per_object_mib']} MiB per object "
              f"in Redis ({entry['steady_field_bytes_per_object'] / MIB:.3f} MiB of fields)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"written {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

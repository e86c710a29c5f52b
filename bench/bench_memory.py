"""Peak memory of the largest requests the default limits allow, above the process at rest.

Two requests, each through `main.handler` with the embedded store, on the CPU with the default
image size (1024) and a random-weight SAM2.1 tiny:

- start: 128 objects (SAM2_MAX_OBJECTS), each a polygon covering the whole of an 8K frame
  (7680 x 4320, SAM2_MAX_IMAGE_PIXELS), sent as a black PNG;
- continue: 128 objects whose memory windows are full (16 frames tracked), on a 960 x 540 frame.

Peak resident memory is read from the kernel (VmHWM, reset through /proc/self/clear_refs before
each request) and also sampled every 5 ms, in case the reset is not allowed.

    .venv/bin/python bench/bench_memory.py [--objects 128]

Writes bench/results/memory.json. Takes several minutes on 2 cores.
"""

import argparse
import base64
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time

import numpy as np
import PIL.Image
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from support import Function, make_checkpoint, make_frames, mask_shape, model_env  # noqa: E402

MIB = 2**20


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRss:
    """Peak resident memory while the block runs, in bytes above the resident memory before it."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
            self.kernel = True
        except OSError:
            self.kernel = False
        self.before = status_kib("VmRSS") * 1024
        self.sampled = self.before
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.sampled = max(self.sampled, status_kib("VmRSS") * 1024)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        peak = status_kib("VmHWM") * 1024 if self.kernel else self.sampled
        self.peak_above_idle = max(peak, self.sampled) - self.before


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def call(function: Function, payload: dict) -> tuple[dict, float, float]:
    """(answer, seconds, MiB above idle at the peak)."""
    start = time.perf_counter()
    with PeakRss() as peak:
        status, answer = function.call(payload)
    assert status == 200, answer
    return answer, time.perf_counter() - start, peak.peak_above_idle / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    args = parser.parse_args()
    n = args.objects
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "random.pt")
        make_checkpoint(checkpoint)
        env = {**model_env(checkpoint, overrides=["++model.image_size=1024"]), "CVAT_FUNCTIONS_REDIS_HOST": "",
               "SAM2_CACHE_BYTES": str(8 * 2**30)}  # the store keeps every session: measure the request
        function = Function(env)

        width, height = 7680, 4320
        polygon = [0, 0, width - 1, 0, width - 1, height - 1, 0, height - 1]
        payload = {"image": base64.b64encode(png(width, height)).decode(),
                   "shapes": [{"type": "polygon", "points": polygon}] * n, "states": []}
        print(f"start: {n} full-frame polygons on a {width}x{height} frame ...", file=sys.stderr, flush=True)
        _, seconds, mib = call(function, payload)
        results["start_8k_polygons"] = {"objects": n, "frame": [width, height],
                                        "body_bytes": len(json.dumps(payload)), "seconds": round(seconds, 1),
                                        "peak_mib_above_idle": round(mib)}

        # One object tracked through 16 frames, then copied to n sessions: the store holds n full
        # windows without tracking each one (the request below still computes every object).
        frames = make_frames(18, seed=3, width=960, height=540)
        yy, xx = np.mgrid[0:540, 0:960]
        prompt = (xx - 300) ** 2 + (yy - 270) ** 2 <= 100**2
        print("continue: filling one object's window (16 frames) ...", file=sys.stderr, flush=True)
        states = function.track(frames[0], shapes=[mask_shape(prompt)])["states"]
        for frame in frames[1:17]:
            states = function.track(frame, states=states)["states"]
        store = function.context.user_data.service.store
        template = dict(store._sessions.peek(states[0]["id"])[1])
        copies = []
        for i in range(n):
            sid = f"{i:032x}"
            store.create(sid, template)
            copies.append({**states[0], "id": sid})
        payload = {"image": base64.b64encode(frames[17]).decode(), "shapes": [None] * n, "states": copies}
        print(f"continue: {n} objects with full windows, image size 1024 ...", file=sys.stderr, flush=True)
        _, seconds, mib = call(function, payload)
        results["continue_full_windows"] = {"objects": n, "frame": [960, 540], "image_size": 1024,
                                            "seconds": round(seconds, 1), "peak_mib_above_idle": round(mib)}

    for name, r in results.items():
        print(f"{name:>24}: {r['peak_mib_above_idle']:>6} MiB above idle, {r['seconds']} s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "peak resident memory of the largest requests, above the process at rest",
                   "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
                   "command": "python " + " ".join(sys.argv), "results": results}, f, indent=2)
    print(f"written {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

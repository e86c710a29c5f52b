"""What one worker of the function costs at rest and while tracking: the figures behind the resource
requests in function.yaml and function-gpu.yaml.

A Nuclio worker is one Python process with its own model and its own Redis connection pool, so
each part below runs `python server.py` (one worker) against a real redis-server (the embedded
store where there is none), with a random-weight SAM2.1 checkpoint of the real size (the config
as published, image size 1024):

1. idle: for each model variant, the resident memory once the model is loaded and the store
   answers (GET /health), and the CPU time start-up took;
2. tracking (tiny): one object tracked through --frames frames, then --objects objects started
   on one frame and tracked through --frames frames (960 x 540): resident memory after each
   request, CPU seconds and wall seconds per request (from /proc/<pid>/stat), and the Redis
   connections the worker holds (INFO clients).

    .venv/bin/python bench/bench_footprint.py [--variants tiny base+] [--objects 8] [--frames 8]
        [--parts idle tracking] [--device cpu|cuda]

Writes bench/results/footprint.json (footprint-cuda.json with --device cuda; that one also records
the GPU memory nvidia-smi reports per worker). Several minutes on 2 cores, mostly the tracking
part; CPU seconds per request are the work done, but wall time and cores in use depend on what
else the machine runs (the load average is recorded).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from support import make_checkpoint, make_frames, model_env  # noqa: E402
from replicas import ReplicaProcess  # noqa: E402

MIB = 2**20
CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
FRAME_W, FRAME_H = 960, 540
TICKS = os.sysconf("SC_CLK_TCK")
DEVICE = "cpu"


def memory_mib(pid: int) -> dict:
    """VmRSS (and its anonymous and file-backed parts) and VmHWM of a process, in MiB; on a GPU,
    also the GPU memory nvidia-smi reports for it (the CUDA context included)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = round(int(value.split()[0]) / 1024, 1)
    if DEVICE.startswith("cuda"):
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, check=True).stdout
        fields["GPU"] = sum(float(m) for p, m in (line.split(",") for line in apps.splitlines()) if int(p) == pid)
    return fields


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / TICKS  # utime, stime: fields 14 and 15


class Store:
    """A real redis-server where one is installed, else the embedded store (no connections)."""

    def __init__(self):
        self.redis = None
        if shutil.which("redis-server"):
            from redis_server import RedisServer

            self.redis = RedisServer().start()
        self.kind = "redis" if self.redis else "embedded"

    def env(self) -> dict:
        return self.redis.env() if self.redis else {"CVAT_FUNCTIONS_REDIS_HOST": ""}

    def connections(self):
        """Clients connected to the server, not counting the one asking."""
        return int(self.redis.client().info("clients")["connected_clients"]) - 1 if self.redis else None

    def close(self) -> None:
        if self.redis:
            self.redis.close()


def start_worker(store: Store, checkpoint: str, config: str) -> tuple[ReplicaProcess, float, float]:
    """(worker, seconds to ready, CPU seconds to ready)."""
    env = {**model_env(checkpoint, overrides=[]), **store.env(), "SAM2_DEVICE": DEVICE}
    env["SAM2_CONFIG"] = config
    start = time.perf_counter()
    worker = ReplicaProcess(env)
    worker.wait_ready()
    return worker, time.perf_counter() - start, cpu_seconds(worker.proc.pid)


def idle(store: Store, folder: str, variants: list[str]) -> dict:
    results = {}
    for variant in variants:
        checkpoint = os.path.join(folder, f"{variant}.pt")
        make_checkpoint(checkpoint, config=CONFIGS[variant])
        print(f"idle: {variant} ...", file=sys.stderr, flush=True)
        worker, seconds, cpu = start_worker(store, checkpoint, CONFIGS[variant])
        try:
            results[variant] = {
                "model": CONFIGS[variant],
                "checkpoint_mib": round(os.path.getsize(checkpoint) / MIB, 1),
                "ready_seconds": round(seconds, 1),
                "ready_cpu_seconds": round(cpu, 1),
                "memory_mib": memory_mib(worker.proc.pid),
                "redis_connections": store.connections(),
            }
        finally:
            worker.close()
        os.remove(checkpoint)
    return results


def tracking(store: Store, folder: str, objects: int, frames: int) -> dict:
    checkpoint = os.path.join(folder, "tiny.pt")
    make_checkpoint(checkpoint, config=CONFIGS["tiny"])
    worker, _, _ = start_worker(store, checkpoint, CONFIGS["tiny"])
    pid = worker.proc.pid
    video = make_frames(frames + 1, seed=5, width=FRAME_W, height=FRAME_H)
    steps = []

    def step(label: str, image: bytes, *, shapes=None, states=None) -> dict:
        cpu, wall = cpu_seconds(pid), time.perf_counter()
        answer = worker.track(image, shapes=shapes, states=states)
        wall, cpu = time.perf_counter() - wall, cpu_seconds(pid) - cpu
        steps.append({"request": label, "objects": len(answer["states"]), "wall_s": round(wall, 2),
                      "cpu_s": round(cpu, 2), "cores": round(cpu / wall, 2), **memory_mib(pid)})
        print(f"  {label}: {wall:.1f} s, {cpu / wall:.2f} cores, {steps[-1]['VmRSS']} MiB", file=sys.stderr, flush=True)
        return answer

    try:
        ready = memory_mib(pid)
        box = {"type": "rectangle", "points": [300, 170, 500, 370]}
        print(f"tracking: 1 object through {frames} frames ...", file=sys.stderr, flush=True)
        states = step("start 1", video[0], shapes=[box])["states"]
        for i in range(1, frames + 1):
            states = step(f"continue 1 #{i}", video[i], states=states)["states"]

        # Boxes on a grid, so that every object has a different prompt.
        columns = int(np.ceil(np.sqrt(objects)))
        w, h = FRAME_W // (columns + 1), FRAME_H // (columns + 1)
        boxes = [{"type": "rectangle", "points": [x * w + 20, y * h + 20, x * w + w, y * h + h]}
                 for y in range(columns) for x in range(columns)][:objects]
        print(f"tracking: {objects} objects through {frames} frames ...", file=sys.stderr, flush=True)
        many = step(f"start {objects}", video[0], shapes=boxes)["states"]
        for i in range(1, frames + 1):
            many = step(f"continue {objects} #{i}", video[i], states=many)["states"]
        held = store.connections()
    finally:
        worker.close()

    def steady(n: int) -> list[dict]:
        # From the 7th frame on, every object attends a full window (the prompt frame and 6 more).
        return [s for s in steps if s["request"].startswith(f"continue {n} #") and int(s["request"].split("#")[1]) >= 7]

    def summary(n: int) -> dict:
        rows = steady(n) or [s for s in steps if s["request"].startswith(f"continue {n} #")]
        return {"objects": n, "requests": len(rows),
                "wall_s_median": round(statistics.median(r["wall_s"] for r in rows), 2),
                "cpu_s_median": round(statistics.median(r["cpu_s"] for r in rows), 2),
                "cores_median": round(statistics.median(r["cores"] for r in rows), 2)}

    return {
        "model": CONFIGS["tiny"], "image_size": 1024, "frame": [FRAME_W, FRAME_H],
        "memory_mib_ready": ready,
        "memory_mib_after": steps[-1] | {"request": None},
        "continue_1": summary(1), f"continue_{objects}": summary(objects),
        "redis_connections_after": held,
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(CONFIGS), default=["tiny", "base+"])
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--parts", nargs="+", choices=["idle", "tracking"], default=["idle", "tracking"])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", default=None, help="default: bench/results/footprint.json, footprint-cuda.json on cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    out = args.out or os.path.join(HERE, "results", "footprint.json" if DEVICE == "cpu" else "footprint-cuda.json")

    results = {}
    load = os.getloadavg()[0]
    store = Store()
    try:
        with tempfile.TemporaryDirectory() as folder:
            if "idle" in args.parts:
                results["idle"] = idle(store, folder, args.variants)
            if "tracking" in args.parts:
                results["tracking"] = tracking(store, folder, args.objects, args.frames)
    finally:
        store.close()

    for variant, r in results.get("idle", {}).items():
        print(f"{variant:>6}: {r['memory_mib']['VmRSS']} MiB resident when ready, {r['ready_cpu_seconds']} CPU s to start")
    if "tracking" in results:
        t = results["tracking"]
        for key in (k for k in t if k.startswith("continue_")):
            s = t[key]
            print(f"{s['objects']:>3} object(s): {s['wall_s_median']} s, {s['cpu_s_median']} CPU s per frame "
                  f"({s['cores_median']} cores)")
        print(f"resident after tracking: {t['memory_mib_after']['VmRSS']} MiB "
              f"(peak {t['memory_mib_after']['VmHWM']}); Redis connections held: {t['redis_connections_after']}")
    machine = {"cpus": os.cpu_count()}
    if DEVICE.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(0)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"benchmark": f"one worker (server.py) on {DEVICE}: resident memory and CPU per request, "
                                f"{store.kind} store",
                   "machine": {**machine, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                               "python": platform.python_version(),
                               "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)},
                   "command": "python " + " ".join(sys.argv), "results": results}, f, indent=2)
    print(f"written {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

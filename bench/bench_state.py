"""What the Redis state store costs at image size 1024, on a real redis-server.

1. Bytes per object: the Redis hash of one object after 20 tracked frames.
2. State I/O per object per frame: store reads and writes plus (de)serialisation of the memories,
   timed around real 1024-size memories with the model's work replaced by a recorded result, so
   thousands of milliseconds of model time do not drown a few of state time. Warm: one replica
   serves every frame (its cache is current). Cold: two replicas take turns, so every read comes
   from Redis.
3. End-to-end handler time, Redis store / embedded store, same replica: both in this process,
   on the same frames, interleaved frame by frame so machine noise hits both alike.
4. Throughput, 2 replicas / 1: server.py processes with one torch thread each, several
   sessions at once; each request goes to whichever replica is free, as behind a load balancer.

    .venv/bin/python bench/bench_state.py [--parts io e2e throughput] [--frames 21]
        [--compare-frames 11] [--io-steps 40] [--sessions 4] [--session-frames 3] [--rounds 2]

Needs redis-server on PATH (scripts/setup.sh --test installs it). Prints a table and writes
bench/results/state.json. Timings need an otherwise idle machine (throughput above all: two
single-threaded replicas need two free cores), so each part records the load average around it.
"""

import argparse
import collections
import io
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time

import PIL.Image
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from config import Settings  # noqa: E402
from support import Function, body, first_masks, make_checkpoint, make_frames, model_env  # noqa: E402
from cvat_sdk.masks import encode_mask  # noqa: E402
from model_handler import Frame  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from replicas import Replica, ReplicaProcess  # noqa: E402
from state_store import make_store  # noqa: E402
from tracking import ObjectRequest, StateRef, TrackingService  # noqa: E402

FRAME_W, FRAME_H = 1280, 720
IMAGE_SIZE = 1024
STEADY_FROM = 16  # from this frame on, an object's state holds its full window (15 pointers)
MIB = 2**20


def prompt_shape() -> dict:
    return {"type": "mask", "points": encode_mask(first_masks(FRAME_W, FRAME_H)[0])}


def function_env(checkpoint: str) -> dict:
    return {**model_env(checkpoint), "SAM2_CONFIG_OVERRIDES": f"++model.image_size={IMAGE_SIZE}", "SAM2_DEVICE": "cpu"}


def timed_call(function: Function, payload: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    status, answer = function.call(payload)
    elapsed = (time.perf_counter() - start) * 1000
    assert status == 200, answer
    return elapsed, answer


def end_to_end(embedded: Function, on_redis: Replica, redis: RedisServer, frames: list, compare: int) -> tuple:
    """Per-frame handler time on both stores, then the bytes of the Redis session after all frames."""
    times = {"embedded": [], "redis": []}
    states = {"embedded": None, "redis": None}
    for i, frame in enumerate(frames):
        order = [("embedded", embedded), ("redis", on_redis)]
        for name, function in order if i % 2 == 0 else order[::-1]:
            if name == "embedded" and i >= compare:
                continue
            payload = body(frame, states=states[name]) if states[name] else body(frame, shapes=[prompt_shape()])
            elapsed, answer = timed_call(function, payload)
            states[name] = answer["states"]
            if i > 0:
                times[name].append(elapsed)
        done = ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items() if v and i > 0)
        print(f"  frame {i}: {done}", file=sys.stderr)
    embedded_ms = statistics.median(times["embedded"])
    redis_ms = statistics.median(times["redis"][: len(times["embedded"])])
    timing = {
        "frames_timed": len(times["embedded"]),
        "embedded_ms_median": round(embedded_ms, 1),
        "redis_ms_median": round(redis_ms, 1),
        "ratio": round(redis_ms / embedded_ms, 4),
        "target_max": 1.05,
        "embedded_ms": [round(v, 1) for v in times["embedded"]],
        "redis_ms": [round(v, 1) for v in times["redis"]],
    }
    fields = redis.client().hgetall(on_redis.key_prefix + states["redis"][0]["id"])
    total = sum(len(k) + len(v) for k, v in fields.items())
    kinds = collections.Counter(k.decode().split(":")[0] for k in fields)
    size = {
        "frames_tracked": states["redis"][0]["t"],
        "bytes": total,
        "mib": round(total / MIB, 3),
        "target_max_mib": 3.7,
        "fields": dict(sorted(kinds.items())),
    }
    return timing, size


class RecordedModel:
    """The tracker with every model call answered by one recorded result: only state work remains."""

    def __init__(self, tracker, *, init, step):
        self._tracker, self._init, self._step = tracker, init, step

    def __getattr__(self, name):
        return getattr(self._tracker, name)

    def preprocess(self, image):
        return Frame(width=image.width, height=image.height, vision_feats=[], vision_pos_embeds=[], feat_sizes=[])

    def init_with_mask(self, frame, mask):
        return self._init

    def track(self, frame, **_):
        return self._step


class StateTimer:
    """Milliseconds spent in the store and in the memory codec, per request."""

    def __init__(self, service: TrackingService):
        self.ms = collections.defaultdict(float)
        for name in ("create", "read", "commit"):
            self._wrap(service.store, name, "store")
        for name in ("decode_maskmem", "decode_pointer", "decode_prompt"):
            self._wrap(service.codec, name, "decode")
        for name in ("encode_maskmem", "encode_pointer", "encode_prompt"):
            self._wrap(service.codec, name, "encode")

    def _wrap(self, owner, name: str, bucket: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.ms[bucket] += (time.perf_counter() - start) * 1000

        setattr(owner, name, timed)


def state_io(tracker, redis: RedisServer, frames: list, steps: int) -> dict:
    """Store + codec time per object per frame, warm (one replica) and cold (two taking turns)."""
    images = [PIL.Image.open(io.BytesIO(data)).convert("RGB") for data in frames[:2]]
    init = tracker.init_with_mask(tracker.preprocess(images[0]), first_masks(FRAME_W, FRAME_H)[0])
    step = tracker.track(tracker.preprocess(images[1]), index=1, prompt=init.memory, recent={})
    model = RecordedModel(tracker, init=init, step=step)
    settings = Settings(redis_host="127.0.0.1", redis_port=redis.port)

    def replica():
        service = TrackingService(model, make_store(settings), polygon_tolerance=1.0)
        return service, StateTimer(service)

    def request(service, obj: ObjectRequest) -> StateRef:
        state = service.track(image=images[0], frame_digest=os.urandom(32), objects=[obj])["states"][0]
        return StateRef(id=state["id"], t=state["t"], tok=state["tok"])

    results = {}
    for mode, replicas in (("warm", [replica()]), ("cold", [replica(), replica()])):
        ref = request(replicas[0][0], ObjectRequest(shape=prompt_shape(), state=None))
        samples = collections.defaultdict(list)
        for t in range(1, STEADY_FROM + steps):
            service, timer = replicas[t % len(replicas)]
            timer.ms.clear()
            ref = request(service, ObjectRequest(shape=None, state=ref))
            if t >= STEADY_FROM:
                for bucket in ("store", "decode", "encode"):
                    samples[bucket].append(timer.ms[bucket])
                samples["total"].append(sum(timer.ms.values()))
        results[mode] = {f"{k}_ms_median": round(statistics.median(v), 3) for k, v in samples.items()}
        results[mode]["steps_timed"] = steps
        results[mode]["target_max_ms"] = 2 if mode == "warm" else 15
    return results


def throughput(checkpoint: str, redis: RedisServer, frames: list, *, sessions: int, length: int, rounds: int) -> dict:
    """Requests per second with 1 and with 2 single-threaded replica processes.

    Rounds alternate 1, 2, 1, 2, ... so that a change in the machine's load hits both alike.
    """
    env = {**function_env(checkpoint), **redis.env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = [ReplicaProcess(env) for _ in range(2)]
    try:
        for replica in started:
            replica.wait_ready()
        for replica in started:  # the first request of a process pays one-off costs
            replica.track(frames[0], shapes=[prompt_shape()])
        rates = {1: [], 2: []}
        for _ in range(rounds):
            for count in (1, 2):
                print(f"  {count} replica(s), {sessions} sessions x {length} frames ...", file=sys.stderr, flush=True)
                rates[count].append(_serve(started[:count], frames, sessions=sessions, length=length))
    finally:
        for replica in started:
            replica.close()
    one, two = statistics.mean(rates[1]), statistics.mean(rates[2])
    return {
        "sessions": sessions,
        "frames_per_session": length,
        "rounds": rounds,
        "torch_threads_per_replica": 1,
        "one_replica_rps": [round(v, 4) for v in rates[1]],
        "two_replicas_rps": [round(v, 4) for v in rates[2]],
        "ratio": round(two / one, 3),
        "target_min": 1.7,
    }


def _serve(replicas: list, frames: list, *, sessions: int, length: int) -> float:
    ready = queue.Queue()  # (session's next frame index, its states); any free replica takes one
    for _ in range(sessions):
        ready.put((0, None))
    left = [sessions * length]
    lock = threading.Lock()

    def worker(replica):
        while True:
            with lock:
                if left[0] <= 0:
                    return
            try:
                index, states = ready.get(timeout=0.05)
            except queue.Empty:
                continue
            answer = replica.track(frames[index], shapes=None if states else [prompt_shape()], states=states)
            with lock:
                left[0] -= 1
            if index + 1 < length:
                ready.put((index + 1, answer["states"]))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sessions * length / (time.perf_counter() - start)


def measured(part: str, fn):
    """Run one part, noting the machine's load around it: other processes skew the timings."""
    print(f"{part} ...", file=sys.stderr, flush=True)
    before = os.getloadavg()[0]
    result = fn()
    return result, {"load_average_1min": [round(before, 2), round(os.getloadavg()[0], 2)]}


def table(results: dict) -> str:
    size, state = results.get("bytes_per_object"), results.get("state_io_per_object_frame")
    timing, rates = results.get("end_to_end_same_replica"), results.get("throughput")
    warm, cold = (state and f"{state[mode]['total_ms_median']} ms" for mode in ("warm", "cold"))
    rows = [
        ("Bytes per object state after 20 frames", size and f"{size['mib']} MiB", "<= 3.7 MiB"),
        ("State I/O per object per frame, warm (same replica)", warm, "<= 2 ms"),
        ("State I/O per object per frame, cold (other replica)", cold, "<= 15 ms"),
        ("End-to-end handler time, Redis / embedded, same replica", timing and f"{timing['ratio']}", "<= 1.05"),
        ("Throughput, 2 replicas / 1, several sessions, one thread each", rates and f"{rates['ratio']}", ">= 1.7"),
    ]
    lines = ["| Measure | Measured | Target |", "|---|---|---|"]
    lines += [f"| {name} | {value or 'not run'} | {target} |" for name, value, target in rows]
    return "\n".join(lines)


PARTS = ("io", "e2e", "throughput")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run only these; the others' figures are kept from --out")
    parser.add_argument("--frames", type=int, default=21, help="frames of the measured session, prompt included")
    parser.add_argument("--compare-frames", type=int, default=11, help="of those, also run on the embedded store")
    parser.add_argument("--io-steps", type=int, default=40, help="steady-state steps timed for state I/O")
    parser.add_argument("--sessions", type=int, default=4, help="sessions at once, for throughput")
    parser.add_argument("--session-frames", type=int, default=3, help="frames per session, for throughput")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of 1 then 2 replicas, for throughput")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "state.json"))
    args = parser.parse_args()

    results = {}
    if set(args.parts) != set(PARTS) and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results.update({
        "benchmark": "Redis state store at image size 1024 (medians)",
        "image_size": IMAGE_SIZE,
        "frame_size": [FRAME_W, FRAME_H],
        "device": "cpu",
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads()},
    })
    results.setdefault("commands", {})
    frames = make_frames(args.frames, seed=7, width=FRAME_W, height=FRAME_H)
    redis = RedisServer().start()
    try:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = os.path.join(folder, "random.pt")
            make_checkpoint(checkpoint)
            embedded = Function({**function_env(checkpoint), "CVAT_FUNCTIONS_REDIS_HOST": ""})
            tracker = embedded.context.user_data.service.tracker
            assert tracker.image_size == IMAGE_SIZE
            if "io" in args.parts:
                state, load = measured("state I/O", lambda: state_io(tracker, redis, frames, args.io_steps))
                results["state_io_per_object_frame"] = {**state, **load}
            if "e2e" in args.parts:
                on_redis = Replica(embedded, redis_host="127.0.0.1", redis_port=redis.port)
                (timing, size), load = measured(
                    f"end to end, {args.frames} frames",
                    lambda: end_to_end(embedded, on_redis, redis, frames, args.compare_frames),
                )
                results["end_to_end_same_replica"] = {**timing, **load}
                results["bytes_per_object"] = size
            if "throughput" in args.parts:
                rates, load = measured("throughput", lambda: throughput(
                    checkpoint, redis, frames, sessions=args.sessions, length=args.session_frames, rounds=args.rounds
                ))
                results["throughput"] = {**rates, **load}
    finally:
        redis.close()
    for part in args.parts:
        results["commands"][part] = "python " + " ".join(sys.argv)

    print("\n" + table(results))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

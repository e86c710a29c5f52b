"""Soak: several annotators through two server.py replicas and one redis-server, for a while.

Each simulated annotator starts one or two objects (mask, polygon or rectangle prompts) on a
frame, tracks them frame by frame with every request going to the other replica, sometimes sends
a request again (a retry, which must get the identical answer), sometimes prompts an object again
(a new session), and ends the track after a few frames, leaving its sessions to expire. Rarely
it pauses past the state TTL, so that its next request must get 410 and it starts over.

Recorded: each replica's RSS and Redis' used_memory every few seconds, latency percentiles,
answers by status. Targets, written as pass/fail: no answer of 500 and no dropped connection;
every retry answered identically; every request after a pause past the TTL answered 410; each
replica's RSS at most 5 % above its level at the end of the warm-up (the first 20 % of the run);
and Redis' used_memory back to its level before the first session once every session has
expired (polled after the load stops, for up to the TTL + 2 minutes).

    .venv/bin/python bench/soak.py [--minutes 10] [--annotators 4] [--ttl 20] [--image-size 256]

The model is the tests' random-weight SAM2 (no network). Writes bench/results/soak.json.
"""

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from support import FRAME_H, FRAME_W, body, make_checkpoint, make_frames, mask_shape, model_env  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from replicas import ReplicaProcess  # noqa: E402

FRAMES = 36
KIB = 1024
REDIS_TOLERANCE = 256 * KIB  # of used_memory back at its baseline
RSS_GROWTH_MAX = 0.05


def blob(frame: int, which: int) -> tuple[float, float, float]:
    """Centre and radius of blob `which` on frame `frame` of support.make_frames."""
    return (40 + 2 * frame, 50, 18) if which == 0 else (110 - frame, 70 + frame, 14)


def prompt(frame: int, which: int, kind: str) -> dict:
    cx, cy, r = blob(frame, which)
    if kind == "rectangle":
        return {"type": "rectangle", "points": [cx - r, cy - r, cx + r, cy + r]}
    if kind == "polygon":
        angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        return {"type": "polygon", "points": [round(float(v), 1) for a in angles
                                              for v in (cx + r * np.cos(a), cy + r * np.sin(a))]}
    yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W]
    return mask_shape((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r)


class Log:
    """Every answer (time, kind, status, latency), thread-safe; and the first message per status."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[tuple[float, str, int, float]] = []
        self.messages: dict[int, str] = {}
        self.retry_mismatches = 0

    def add(self, kind: str, status: int, ms: float, answer) -> None:
        with self.lock:
            self.rows.append((time.monotonic(), kind, status, ms))
            if status != 200 and status not in self.messages:
                self.messages[status] = str(answer)[:300]


def send(replica: ReplicaProcess, payload: dict, kind: str, log: Log) -> tuple[int, dict]:
    start = time.perf_counter()
    try:
        status, answer = replica.post(payload)
    except OSError as e:  # the replica dropped the connection: counted apart from HTTP statuses
        status, answer = 0, {"error": repr(e)}
    log.add(kind, status, (time.perf_counter() - start) * 1000, answer)
    return status, answer


def annotator(seed: int, replicas: list, frames: list, log: Log, deadline: float, ttl: float) -> None:
    rng = random.Random(seed)
    turn = seed  # which replica gets the next request: they alternate
    while time.monotonic() < deadline:
        # A new track: one or two objects prompted on one of the first frames.
        first = rng.randrange(10)
        objects = rng.sample([0, 1], rng.choice([1, 2]))
        kinds = [rng.choice(["mask", "polygon", "rectangle"]) for _ in objects]
        payload = body(frames[first], shapes=[prompt(first, o, k) for o, k in zip(objects, kinds)])
        status, answer = send(replicas[turn % 2], payload, "start", log)
        turn += 1
        for index in range(first + 1, min(first + rng.randint(5, 25), FRAMES)):
            if status != 200 or time.monotonic() >= deadline:
                break  # 409/410/503...: the annotator starts over
            states = answer["states"]
            shapes, kind = [None] * len(states), "track"
            if rng.random() < 0.01:  # back after the state has expired: 410, then a new track
                time.sleep(ttl + 5)
                kind = "after-pause"
            elif rng.random() < 0.05:  # the annotator corrects one object: it starts again here
                k = rng.randrange(len(states))
                shapes[k], kind = prompt(index, objects[k], kinds[k]), "restart"
            payload = {**body(frames[index], states=states), "shapes": shapes}
            status, answer = send(replicas[turn % 2], payload, kind, log)
            turn += 1
            if kind == "track" and status == 200 and rng.random() < 0.1:  # a retry, on the other replica
                again = send(replicas[turn % 2], payload, "retry", log)
                if again != (status, answer):
                    with log.lock:
                        log.retry_mismatches += 1
            time.sleep(rng.uniform(0, 0.5))  # the annotator looks at the answer


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def percentile(values: list, q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else None


def latency(rows: list) -> dict:
    ms = [row[3] for row in rows if row[2] == 200]
    return {"count": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": percentile(ms, 100)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long the annotators work")
    parser.add_argument("--annotators", type=int, default=4)
    parser.add_argument("--ttl", type=int, default=20, help="SAM2_STATE_TTL_SECONDS of the replicas")
    parser.add_argument("--image-size", type=int, default=256, help="the model's image size")
    parser.add_argument("--cache-mib", type=int, default=8,
                        help="SAM2_CACHE_BYTES per replica; small, so the cache is full by the end of the warm-up")
    parser.add_argument("--sample-seconds", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before RSS is compared")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "soak.json"))
    args = parser.parse_args()

    frames = make_frames(FRAMES)
    redis = RedisServer().start()
    folder = tempfile.TemporaryDirectory()
    replicas = []
    try:
        checkpoint = os.path.join(folder.name, "random.pt")
        make_checkpoint(checkpoint)
        env = {
            **model_env(checkpoint, overrides=[f"++model.image_size={args.image_size}"]), **redis.env(),
            "SAM2_STATE_TTL_SECONDS": str(args.ttl), "SAM2_CACHE_BYTES": str(args.cache_mib * 2**20),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        }
        replicas = [ReplicaProcess(env) for _ in range(2)]
        for replica in replicas:
            replica.wait_ready()
        client = redis.client()
        def used() -> int:
            # The data's memory: used_memory less the client connections' buffers, which come and
            # go with the requests in flight (and with this sampler's own connection).
            memory = client.info("memory")
            return memory["used_memory"] - memory.get("mem_clients_normal", 0)

        baseline, baseline_clients = used(), client.info("clients")["connected_clients"]

        log, samples = Log(), []
        start = time.monotonic()
        deadline = start + args.minutes * 60
        stop = threading.Event()

        def sample() -> None:
            while True:
                samples.append({"t_s": round(time.monotonic() - start, 1),
                                "rss_kib": [rss_kib(r.proc.pid) for r in replicas],
                                "redis_used_memory": used(), "redis_keys": client.dbsize()})
                if stop.wait(args.sample_seconds):
                    return

        def progress() -> None:
            with log.lock:
                rows = list(log.rows)
            statuses = {s: sum(1 for r in rows if r[2] == s) for s in sorted({r[2] for r in rows})}
            last = samples[-1]
            print(f"[{time.monotonic() - start:6.0f} s] {len(rows)} requests {statuses}, "
                  f"p50 {latency(rows)['p50_ms']} ms, RSS {[v // KIB for v in last['rss_kib']]} MiB, "
                  f"Redis {last['redis_used_memory'] / 2**20:.1f} MiB in {last['redis_keys']} keys",
                  file=sys.stderr, flush=True)

        sampler = threading.Thread(target=sample)
        sampler.start()
        workers = [threading.Thread(target=annotator, args=(i, replicas, frames, log, deadline, args.ttl))
                   for i in range(args.annotators)]
        for worker in workers:
            worker.start()
        while any(w.is_alive() for w in workers):
            for worker in workers:
                worker.join(timeout=30 / len(workers))
            progress()
        load_s = time.monotonic() - start
        stop.set()
        sampler.join()

        # Every session expires TTL after its last use; Redis drops expired keys in the background.
        print(f"load done; waiting for every session to expire ({args.ttl} s TTL)", file=sys.stderr, flush=True)
        last_write = max(row[0] for row in log.rows if row[2] == 200)
        while True:
            memory, keys = used(), client.dbsize()
            waited = time.monotonic() - last_write
            if (keys == 0 and memory <= baseline + REDIS_TOLERANCE) or waited > args.ttl + 120:
                break
            time.sleep(1)
        clients = client.info("clients")["connected_clients"]
    finally:
        for replica in replicas:
            replica.close()
        redis.close()
        folder.cleanup()

    warm = [s for s in samples if s["t_s"] <= args.warmup * load_s]
    after = [s for s in samples if s["t_s"] > args.warmup * load_s]
    rss = []
    for i in range(len(replicas)):
        level = warm[-1]["rss_kib"][i]
        peak, final = max(s["rss_kib"][i] for s in after), after[-1]["rss_kib"][i]
        rss.append({"after_warmup_kib": level, "peak_after_kib": peak, "final_kib": final,
                    "growth_peak": round(peak / level - 1, 4), "growth_final": round(final / level - 1, 4)})
    def statuses_of(kind=None) -> dict:
        return dict(collections.Counter(str(row[2]) for row in log.rows if kind in (None, row[1])))

    statuses = statuses_of()
    kinds = sorted({row[1] for row in log.rows if row[2] == 200})
    results = {
        "benchmark": "soak: annotators through two server.py replicas sharing one redis-server",
        "command": "python " + " ".join(sys.argv),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip(),
        "settings": {"minutes": args.minutes, "annotators": args.annotators, "replicas": len(replicas),
                     "state_ttl_s": args.ttl, "image_size": args.image_size, "frame_size": [FRAME_W, FRAME_H],
                     "cache_bytes_per_replica": args.cache_mib * 2**20, "torch_threads_per_replica": 1,
                     "sample_seconds": args.sample_seconds, "warmup_fraction": args.warmup,
                     "model": "sam2.1 hiera tiny config, seeded random weights", "device": "cpu"},
        "host": {"cpus": os.cpu_count(), "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
                 "redis_server": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()},
        "durations_s": {"load": round(load_s, 1), "last_answer_200_to_redis_empty": round(waited, 1)},
        "requests": len(log.rows),
        "answers_by_status": statuses,
        "first_message_by_status": {str(k): v for k, v in log.messages.items()},
        "after_pause_past_ttl": statuses_of("after-pause"),
        "retry_mismatches": log.retry_mismatches,
        "latency_200": {k: latency([r for r in log.rows if k == "all" or r[1] == k]) for k in ["all", *kinds]},
        "replica_rss": rss,
        "redis": {"baseline_used_memory": baseline, "peak_used_memory": max(s["redis_used_memory"] for s in samples),
                  "peak_keys": max(s["redis_keys"] for s in samples), "after_expiry_used_memory": memory,
                  "after_expiry_keys": keys, "tolerance": REDIS_TOLERANCE,
                  "connected_clients": {"baseline": baseline_clients, "after_expiry": clients}},
        "targets": {
            "no_answer_500": statuses.get("500", 0) == 0,
            "no_dropped_connection": statuses.get("0", 0) == 0,
            "retries_identical": log.retry_mismatches == 0,
            # Exercised at least once, and every time 410 (a short run may see no pause: then false).
            "after_pause_past_ttl_all_410": bool(statuses_of("after-pause"))
            and set(statuses_of("after-pause")) <= {"410"},
            "rss_growth_after_warmup_at_most_5_percent": all(r["growth_peak"] <= RSS_GROWTH_MAX for r in rss),
            "redis_memory_back_to_baseline": keys == 0 and memory <= baseline + REDIS_TOLERANCE,
        },
        "samples": samples,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    summary = {k: results[k] for k in ("answers_by_status", "retry_mismatches", "targets")}
    print(json.dumps({**summary, "latency_200": results["latency_200"]["all"], "replica_rss": rss,
                      "redis": results["redis"]}, indent=1))
    print(f"written {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

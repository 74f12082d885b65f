"""Does a round starve serving? Scoring latency on the embedded default, idle and during a round.

One command, offline, on the tiny demo model: `.venv/bin/python bench/round_latency.py`.

It starts `evoq serve` (embedded default: SQLite, in-process engine, in-process rounds) in a child
process with a temporary data folder, posts a pool of images, then measures POST /v1/score latency of
new images (no cache hits) from one client, first idle, then while an evolution round started over the
admin API runs (voting, training and evaluation share the machine with serving). Target: the p50 during
the round stays within 2x of idle. Latencies are also reported per round stage.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 120)
TOKEN = "bench-token"


def make_jpeg(index: int) -> bytes:
    """A distinct photo-like JPEG per index."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:96, 0:128]
    base = np.stack([x * 2, y * 2, (x + y)], axis=-1) % 256
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def score_once(client: httpx.Client, index: int, samples: int) -> float:
    files = {"images": (f"{index}.jpg", make_jpeg(index), "image/jpeg")}
    started = time.perf_counter()
    response = client.post("/v1/score", files=files, data={"samples": str(samples)})
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    assert not response.json()["results"][0]["cached"]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=32, help="images posted before the round")
    parser.add_argument("--idle-requests", type=int, default=40)
    parser.add_argument("--samples", type=int, default=8, help="samples per score request")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--votes", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="evoq-bench-round-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOQ_")}
    env.update({"EVOQ_DATA_DIR": str(work / "data"), "EVOQ_ADMIN_TOKEN": TOKEN, "EVOQ_DEVICE": "cpu"})
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "evoq.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 180
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {work / 'server.log'}")
            time.sleep(0.5)

        for i in range(args.pool):
            score_once(client, i, 2)
        for i in range(5):  # warm-up
            score_once(client, 10_000 + i, args.samples)
        idle = [score_once(client, 20_000 + i, args.samples) for i in range(args.idle_requests)]

        body = {
            "pairs": args.pairs,
            "votes": args.votes,
            "generations": args.generations,
            "steps": args.steps,
        }
        round_ = client.post("/admin/evolutions", headers=auth, json=body).json()
        by_stage: dict[str, list[float]] = {}
        index = 30_000
        started = time.perf_counter()
        while True:
            state = client.get(f"/admin/evolutions/{round_['id']}", headers=auth).json()
            if state["state"] in ("succeeded", "rejected", "failed", "cancelled"):
                break
            if state["state"] in ("voting", "training", "evaluating"):
                by_stage.setdefault(state["state"], []).append(score_once(client, index, args.samples))
                index += 1
            else:
                time.sleep(0.05)
        duration = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)

    during = [v for values in by_stage.values() for v in values]
    table = Table(title=f"/v1/score latency (ms), samples={args.samples}, one client, tiny demo model")
    for column in ("phase", "requests", "p50", "p95", "p50 / idle p50"):
        table.add_column(column, justify="right")
    idle_p50 = statistics.median(idle)
    table.add_row("idle", str(len(idle)), f"{idle_p50:.1f}", f"{percentile(idle, 95):.1f}", "1.00")
    for stage, values in [*by_stage.items(), ("whole round", during)]:
        p50 = statistics.median(values) if values else float("nan")
        table.add_row(
            stage, str(len(values)), f"{p50:.1f}", f"{percentile(values, 95):.1f}", f"{p50 / idle_p50:.2f}"
        )
    console.print(table)
    ratio = statistics.median(during) / idle_p50 if during else float("nan")
    verdict = "PASS" if ratio <= 2.0 else "FAIL"
    console.print(
        f"round {round_['id']} ended {state['state']} after {duration:.1f} s; "
        f"scoring p50 during the round is {ratio:.2f}x idle (target <= 2x): {verdict}"
    )


if __name__ == "__main__":
    main()

"""Serving benchmark: POST /v1/score over real HTTP against the same work done on the engine alone.

One command, offline, on the tiny demo model: `.venv/bin/python bench/serve.py`.

It builds the demo model into a temporary folder, starts the API with `evoq serve` in a child process
(temporary SQLite database and image store) and, in this process, a LocalEngine with the same settings.
Then, in rounds (so that a busy machine slows both paths alike), it measures:

  - HTTP: POST /v1/score through uvicorn with an httpx AsyncClient, each request a different image
    (distinct bytes, so the result cache is never hit), at concurrency 1 and N;
  - engine: `iqa.scoring.score_image` on the LocalEngine with the same decoded images and the same
    sampling, samples, token budget and batch window, at concurrency 1 and N;
  - cache hits: the images HTTP already scored, asked again.

Throughput is requests / wall time of a closed loop of `concurrency` clients, pooled over the rounds
(the spread of the per-round ratios is printed too); latencies are pooled percentiles. Beside wall time
it counts CPU time per request (the server process, the client, the engine's process): unlike
throughput, that hardly moves when other work shares the machine. The same HTTP requests with
`mode=fast` (one-pass reading, no sampling) run beside them. Targets: concurrency N gives >= 3x the
throughput of concurrency 1 over HTTP (batching), HTTP + storage + database logging cost <= 10% over
the engine at concurrency N, the API's own CPU (the server's CPU outside its model thread, whose CPU
the server counts in `evoq_engine_model_cpu_seconds`) <= 4 ms per request, fast scores >= 10x the
sampled requests/s, and a cache hit answers in < 10 ms p50.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
console = Console(width=None if sys.stdout.isatty() else 120)


# ---- options --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=128, help="measured requests per setting")
    parser.add_argument(
        "--rounds", type=int, default=4, help="the requests are split over rounds that alternate the paths"
    )
    parser.add_argument("--samples", type=int, default=8, help="samples per score request (all requests)")
    parser.add_argument("--concurrency", type=int, default=8, help="the high concurrency (the low one is 1)")
    parser.add_argument("--warmup", type=int, default=16, help="warm-up requests per path before measuring")
    parser.add_argument("--cache-requests", type=int, default=64, help="cache-hit requests")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="token budget; default: the model's own (48)"
    )
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="local engine batch window")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in each process (0: torch's default); the tiny model gains nothing from more, "
        "and two processes with a thread per core each thrash a 2-core machine",
    )
    parser.add_argument("--image-size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log, DB)")
    return parser.parse_args(argv)


# ---- inputs ---------------------------------------------------------------------------------------


def make_jpeg(index: int, size: tuple[int, int]) -> bytes:
    """A photo-like JPEG that differs from every other index (so its hash, and cache key, differ)."""
    rng = np.random.default_rng(index)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [
        128 + 70 * (a * x + b * y) + 40 * np.sin(f * x + p) * np.cos(g * y)
        for a, b, f, g, p in rng.uniform([-1, -1, 2, 2, 0], [1, 1, 8, 8, 6], size=(3, 5))
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 8, size=(h, w, 1))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class ImageSupply:
    """Hands out images never used before in this run: every measured request is a cache miss."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.next_index = 0

    def take(self, count: int) -> list[bytes]:
        start, self.next_index = self.next_index, self.next_index + count
        return [make_jpeg(i, self.size) for i in range(start, start + count)]


# ---- measuring ------------------------------------------------------------------------------------


@dataclass
class Phase:
    """Pooled measurements of one setting (path, concurrency) over the rounds."""

    requests: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the process that served (API server, or this one for the engine)
    client_cpu_s: float = 0.0  # CPU time of this process as the HTTP client
    model_thread_cpu_s: float = 0.0  # CPU time of the server's model thread (HTTP paths)
    batches: int | None = None  # forward batches the engine ran (engine path only)
    latencies_ms: list[float] = field(default_factory=list)
    round_throughputs: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_s if self.wall_s else float("nan")

    def cpu_ms_per_request(self, client: bool = False) -> float:
        return (self.client_cpu_s if client else self.cpu_s) * 1000 / self.requests

    def api_cpu_ms_per_request(self) -> float:
        """The server's CPU outside its model thread: HTTP, intake, storage, logging, the event loop."""
        return (self.cpu_s - self.model_thread_cpu_s) * 1000 / self.requests

    def percentile(self, q: float) -> float:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else float("nan")
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]


async def closed_loop(
    items: list, concurrency: int, call: Callable[[object], Awaitable[None]], phase: Phase | None
) -> None:
    """`concurrency` clients, each sending its next request as soon as its last one is answered."""
    queue = list(reversed(items))
    latencies: list[float] = []

    async def client() -> None:
        while queue:
            item = queue.pop()
            started = time.perf_counter()
            await call(item)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    if phase is not None:
        phase.requests += len(items)
        phase.wall_s += wall
        phase.latencies_ms.extend(latencies)
        phase.round_throughputs.append(len(items) / wall)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def model_cpu_s(client: httpx.AsyncClient) -> float:
    """The server's `evoq_engine_model_cpu_seconds_total`: CPU time of its model thread so far."""
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("evoq_engine_model_cpu_seconds_total "):
            return float(line.split()[1])
    raise RuntimeError("the server's /metrics has no evoq_engine_model_cpu_seconds_total")


class HTTPScorer:
    """One POST /v1/score with one image; checks the answer is what the benchmark expects."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        samples: int,
        expect_cached: bool,
        all_valid: bool = True,
        mode: str = "sampled",
    ) -> None:
        self.client = client
        self.samples = samples if mode == "sampled" else 0  # a fast score samples nothing
        self.expect_cached = expect_cached
        self.all_valid = all_valid  # constrained decoding on the demo model: every sample parses
        self.mode = mode
        self.form = {"samples": str(samples), "mode": mode}

    async def __call__(self, data: bytes) -> None:
        response = await self.client.post(
            "/v1/score", files={"images": ("image.jpg", data, "image/jpeg")}, data=self.form
        )
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/score answered {response.status_code}: {response.text[:300]}")
        [result] = response.json()["results"]
        valid_ok = result["valid_samples"] == self.samples or not self.all_valid
        same = result["samples"] == self.samples and result["mode"] == self.mode
        if result["cached"] != self.expect_cached or not same or not valid_ok:
            raise RuntimeError(f"unexpected result (cached should be {self.expect_cached}): {result}")


def http_scorer(client: httpx.AsyncClient, samples: int, expect_cached: bool) -> HTTPScorer:
    """An HTTPScorer that does not insist on every sample parsing (for engines without a constraint)."""
    return HTTPScorer(client, samples, expect_cached, all_valid=False)


class EngineScorer:
    """`score_image` on the engine with the image the service would have decoded from the same bytes."""

    def __init__(self, engine, samples: int, sampling, settings) -> None:
        self.engine = engine
        self.samples = samples
        self.sampling = sampling
        self.settings = settings
        self.decoded: dict[bytes, Image.Image] = {}

    def prepare(self, images: list[bytes]) -> None:
        """Decode exactly as the service does, before the clock starts (the engine takes pixels)."""
        from iqa.images import decode_image

        for data in images:
            self.decoded[data] = decode_image(
                data,
                max_bytes=self.settings.max_upload_bytes,
                max_pixels=self.settings.max_image_pixels,
                min_side=self.settings.min_image_side,
            ).image

    async def __call__(self, data: bytes) -> None:
        from iqa.scoring import score_image

        image = self.decoded.pop(data)
        result = await score_image(
            self.engine, image, self.samples, self.sampling, self.settings.prompt_profile
        )
        if (result.samples, result.valid) != (self.samples, self.samples):
            raise RuntimeError(f"engine returned {result.valid}/{result.samples} valid samples")


# ---- the server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(args: argparse.Namespace, data_dir: Path) -> dict[str, str]:
    """The settings both paths use, as EVOQ_* variables (the child reads them; this process too)."""
    env = {
        "EVOQ_DATA_DIR": str(data_dir),
        "EVOQ_DEVICE": args.device,
        "EVOQ_SCORE_SAMPLES": str(args.samples),
        "EVOQ_MAX_SAMPLES": str(max(64, args.samples)),
        "EVOQ_BATCH_WINDOW_MS": str(args.batch_window_ms),
        # No scheduled evolution round: one would vote with the same engine in the server mid-benchmark.
        "EVOQ_ROUND_MIN_NEW_IMAGES": str(10**9),
    }
    if args.max_new_tokens is not None:
        env["EVOQ_MAX_NEW_TOKENS"] = str(args.max_new_tokens)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


async def start_server(
    env: dict[str, str], work: Path, port: int, workers: int = 1
) -> asyncio.subprocess.Process:
    """`evoq serve` in a child process (its own interpreter, as in production), ready to answer."""
    command = (sys.executable, "-m", "evoq.cli", "serve", "--port", str(port), "--log-level", "warning")
    with (work / "server.log").open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            *command,
            "--workers",
            str(workers),
            cwd=work,  # no stray .env is read
            env={**os.environ, **env, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        while time.monotonic() < deadline:
            if server.returncode is not None:
                raise RuntimeError(f"the server exited; see {work / 'server.log'}")
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    server.terminate()
    await server.wait()
    raise RuntimeError("the server did not become ready in 180 s")


# ---- the run --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, work: Path) -> None:
    env = service_env(args, work / "data")
    os.environ.update(env)

    import torch

    from iqa.demo_model import build_demo_model
    from iqa.engines import build_engine
    from iqa.engines.base import ModelSpec, Sampling
    from iqa.service import DEMO_NAME
    from iqa.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(_env_file=None)  # the same EVOQ_* values the server gets
    model_dir = build_demo_model(settings.demo_model_dir)  # the server finds it there and serves it
    spec = ModelSpec(1, DEMO_NAME, "base", str(model_dir.resolve()), untrained=True)
    # What IQAService.sampling("score") gives for the demo model: settings' values, answers constrained.
    sampling = Sampling(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        constrain="score",
    )
    high = args.concurrency
    console.print(
        f"[bold]EvoQuality serving benchmark[/] on the tiny demo model: device={args.device}, "
        f"torch threads={torch.get_num_threads()} (this process), samples={args.samples}, "
        f"max_new_tokens={settings.max_new_tokens or 'model (48)'}, "
        f"batch window={settings.batch_window_ms} ms, "
        f"{args.requests} requests per setting in {args.rounds} rounds, concurrency 1 and {high}, "
        f"images {args.image_size[0]}x{args.image_size[1]} JPEG, {os.cpu_count()} CPUs"
    )

    port = free_port()
    server = await start_server(env, work, port)
    engine = build_engine(settings, spec)
    await engine.start()
    supply = ImageSupply(tuple(args.image_size))
    paths = ("http", "engine", "http-fast")
    phases = {(path, c): Phase() for path in paths for c in (1, high)}
    scored_over_http: list[bytes] = []
    try:
        limits = httpx.Limits(max_connections=high + 4, max_keepalive_connections=high + 4)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits
        ) as client:
            http_miss = HTTPScorer(client, args.samples, expect_cached=False)
            http_fast = HTTPScorer(client, args.samples, expect_cached=False, mode="fast")
            callers = {"http": http_miss, "http-fast": http_fast}
            on_engine = EngineScorer(engine, args.samples, sampling, settings)

            async def measure(path: str, concurrency: int, count: int, phase: Phase | None) -> None:
                images = supply.take(count)
                if path == "engine":
                    on_engine.prepare(images)
                model_cpu = await model_cpu_s(client)
                batches, own_cpu, server_cpu = (
                    engine.batches_run,
                    time.process_time(),
                    process_cpu_s(server.pid),
                )
                await closed_loop(images, concurrency, callers.get(path, on_engine), phase)
                own_cpu, server_cpu = time.process_time() - own_cpu, process_cpu_s(server.pid) - server_cpu
                model_cpu = await model_cpu_s(client) - model_cpu  # the scrapes' CPU counts as the API's
                if path == "http" and concurrency == 1:
                    scored_over_http.extend(images)
                if phase is None:
                    return
                if path != "engine":
                    phase.cpu_s += server_cpu
                    phase.client_cpu_s += own_cpu
                    phase.model_thread_cpu_s += model_cpu
                else:
                    phase.cpu_s += own_cpu
                    phase.batches = (phase.batches or 0) + engine.batches_run - batches

            with console.status("warming up both paths"):
                for path in paths:
                    for c in (high, 1):
                        await measure(path, c, args.warmup // 2 or 1, None)
            per_round = max(1, args.requests // args.rounds)
            for round_no in range(1, args.rounds + 1):
                for c in (1, high):
                    for path in paths:
                        with console.status(f"round {round_no}/{args.rounds}: {path}, concurrency {c}"):
                            await measure(path, c, per_round, phases[(path, c)])
                line = ", ".join(
                    f"{path} c={c}: {phases[(path, c)].round_throughputs[-1]:.2f}"
                    for c in (1, high)
                    for path in paths
                )
                console.print(f"  round {round_no} (req/s): {line}")
            with console.status("cache hits"):
                hits = Phase()
                repeat = (scored_over_http * (args.cache_requests // max(1, len(scored_over_http)) + 1))[
                    : args.cache_requests
                ]
                http_hit = HTTPScorer(client, args.samples, expect_cached=True)
                await closed_loop(repeat[:4], 1, http_hit, None)  # warm-up
                await closed_loop(repeat, 1, http_hit, hits)
    finally:
        await engine.close()
        server.terminate()
        await server.wait()

    report(phases, hits, high)


def report(phases: dict[tuple[str, int], Phase], hits: Phase, high: int) -> None:
    table = Table(title="POST /v1/score on the tiny demo model", title_justify="left")
    columns = ["path", "c", "requests", "req/s", "p50 ms", "p95 ms", "CPU ms/req", "client CPU ms/req"]
    for name in [*columns, "requests/batch"]:
        table.add_column(name, justify="left" if name == "path" else "right")
    labels = {"http": "HTTP", "engine": "engine", "http-fast": "HTTP, mode=fast"}
    order = list(labels)
    for (path, c), phase in sorted(phases.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        table.add_row(
            labels[path],
            str(c),
            str(phase.requests),
            f"{phase.throughput:.2f}",
            f"{phase.percentile(50):.1f}",
            f"{phase.percentile(95):.1f}",
            f"{phase.cpu_ms_per_request():.0f}",
            f"{phase.cpu_ms_per_request(client=True):.0f}" if path != "engine" else "-",
            f"{phase.requests / phase.batches:.1f}" if phase.batches else "-",
        )
    table.add_row(
        "HTTP cache hit",
        "1",
        str(hits.requests),
        f"{hits.throughput:.1f}",
        f"{hits.percentile(50):.1f}",
        f"{hits.percentile(95):.1f}",
        *(["-"] * 3),
    )
    table.caption = (
        "HTTP: POST /v1/score to `evoq serve` (uvicorn, SQLite, image store) in a child process; engine: "
        "score_image on a LocalEngine in this process. CPU ms/req: CPU time of the serving process per "
        "request; client: the httpx client's."
    )
    console.print(table)

    def ratio(a: Phase, b: Phase) -> tuple[float, float, float]:
        """Pooled a/b throughput, and the lowest and highest of the per-round ratios."""
        rounds = [x / y for x, y in zip(a.round_throughputs, b.round_throughputs, strict=True)]
        return a.throughput / b.throughput, min(rounds), max(rounds)

    def verdict(ok: bool) -> str:
        return "[bold green]PASS[/]" if ok else "[bold red]FAIL[/]"

    targets = Table(title="Ratios and targets", title_justify="left")
    for name in ("figure", "pooled", "rounds (min-max)", "target", ""):
        targets.add_column(name, justify="left" if name == "figure" else "right")
    for path, target in (("http", 3.0), ("engine", 2.0)):
        gain, low, top = ratio(phases[(path, high)], phases[(path, 1)])
        targets.add_row(
            f"batching gain, {path}: c={high} / c=1 req/s",
            f"{gain:.2f}x",
            f"{low:.2f}-{top:.2f}x",
            f">= {target:.2f}x",
            verdict(gain >= target),
        )
    slowdown, low, top = ratio(phases[("engine", high)], phases[("http", high)])
    targets.add_row(
        f"HTTP + storage + DB logging overhead, c={high}: engine / HTTP req/s - 1",
        f"{(slowdown - 1) * 100:+.1f}%",
        f"{(low - 1) * 100:+.0f}% to {(top - 1) * 100:+.0f}%",
        "<= 10%",
        verdict(slowdown - 1 <= 0.10),
    )
    http_cpu, engine_cpu = (phases[(p, high)].cpu_ms_per_request() for p in ("http", "engine"))
    targets.add_row(
        f"server CPU - engine-alone CPU per request, c={high} (includes the model's batching under HTTP)",
        f"{http_cpu - engine_cpu:.1f} ms",
        "",
        "-",
        "",
    )
    for path, label in (("http", "sampled"), ("http-fast", "fast")):
        own = phases[(path, high)].api_cpu_ms_per_request()
        targets.add_row(
            f"the API's own CPU per request, {label}, c={high}: server CPU outside its model thread",
            f"{own:.1f} ms",
            "",
            "<= 4 ms",
            verdict(own <= 4),
        )
    for c in (1, high):
        fast, sampled = phases[("http-fast", c)], phases[("http", c)]
        gain, low, top = ratio(fast, sampled)
        targets.add_row(
            f"fast / sampled req/s over HTTP, c={c} (p50 {fast.percentile(50):.0f} vs "
            f"{sampled.percentile(50):.0f} ms)",
            f"{gain:.1f}x",
            f"{low:.1f}-{top:.1f}x",
            ">= 10x",
            verdict(gain >= 10),
        )
    hit_p50 = hits.percentile(50)
    targets.add_row("cache hit p50", f"{hit_p50:.1f} ms", "", "< 10 ms", verdict(hit_p50 < 10))
    console.print(targets)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="evoq-bench-"))
    try:
        asyncio.run(run(args, work))
    finally:
        if args.keep:
            console.print(f"kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

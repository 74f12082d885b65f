"""vLLM serving benchmark: POST /v1/score through the API against the same requests sent to vLLM directly.

One command, offline, on the tiny demo model: `.venv/bin/python bench/serve_vllm.py` (needs `.venv-vllm`,
built by `scripts/build_vllm_venv.sh`). Written to be merged into `bench/serve.py`, whose helpers it uses.

It builds the demo model into a temporary folder, starts a vLLM server on it (from `.venv-vllm`, as the
tests do) and the API with `EVOQ_ENGINE=vllm` in a child process (temporary SQLite database and image
store). Then, in rounds (so that a busy machine slows both paths alike):

  - HTTP: POST /v1/score through uvicorn, each request a different image (no cache hit), at
    concurrency 1 and N;
  - vLLM direct: the chat-completions requests the engine would send for the same images, built
    before the clock starts (same adapter, sampling, structured-output regex and JPEG data URLs),
    posted straight to vLLM at concurrency 1 and N;
  - n samples in one request against n separate requests (one after the other, and all at once), on
    vLLM directly, each on an image not seen before.

The same HTTP requests with `mode=fast` (one-pass reading: five one-token continuations that share
the prompt through vLLM's prefix cache) run beside them. Targets: at concurrency N the API keeps
>= 0.95x the direct throughput; fast scores >= 10x the sampled requests/s; n samples in one request
cost several times less than n separate requests. Also printed: vLLM start-up time and request latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from serve import HTTPScorer, ImageSupply, Phase, closed_loop, console, http_scorer, start_server  # noqa: E402

from tests.vllm.server import VLLMServer, free_port  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per setting and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each measures every setting once")
    parser.add_argument("--samples", type=int, default=8, help="samples per score request (all requests)")
    parser.add_argument("--concurrency", type=int, default=16, help="the high concurrency (the low one is 1)")
    parser.add_argument("--warmup", type=int, default=16, help="warm-up requests per path before measuring")
    parser.add_argument("--trials", type=int, default=8, help="images in the n-in-one vs n-separate test")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="token budget; default: the model's own (48, much shorter than a real model's reasoning)",
    )
    parser.add_argument(
        "--database-url", default=None, help="the API's database (an empty one); default: a temporary SQLite"
    )
    parser.add_argument("--image-size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    parser.add_argument(
        "--workers", type=int, default=1, help="API processes (evoq serve --workers; vLLM allows 2 here)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, DB)")
    return parser.parse_args(argv)


def service_env(args: argparse.Namespace, work: Path, model_dir: Path, vllm_url: str) -> dict[str, str]:
    """The API's settings, as EVOQ_* variables (the child reads them; this process too)."""
    return {
        "EVOQ_DATA_DIR": str(work / "data"),
        "EVOQ_ENGINE": "vllm",
        "EVOQ_VLLM_URL": vllm_url,
        "EVOQ_MODEL": str(model_dir),  # what vLLM serves, so the engine needs no weight reload
        "EVOQ_SCORE_SAMPLES": str(args.samples),
        "EVOQ_MAX_SAMPLES": str(max(64, args.samples)),
        # No scheduled evolution round: it would run in the API process mid-benchmark.
        "EVOQ_ROUND_MIN_NEW_IMAGES": str(10**9),
        "OMP_NUM_THREADS": "1",
        **({"EVOQ_MAX_NEW_TOKENS": str(args.max_new_tokens)} if args.max_new_tokens else {}),
        **({"EVOQ_DATABASE_URL": args.database_url} if args.database_url else {}),
    }


class DirectRequests:
    """The chat-completions bodies the engine sends for some images, built before the clock starts."""

    def __init__(self, client: httpx.AsyncClient, adapter: str, settings, sampling, max_tokens: int) -> None:
        self.client = client
        self.adapter = adapter
        self.settings = settings
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.payloads: dict[bytes, dict] = {}

    def prepare(self, images: list[bytes], n: int) -> None:
        """Decode as the service does, encode as the engine does (downscaled JPEG data URL)."""
        from iqa.engines.base import GenerationRequest
        from iqa.engines.vllm import chat_payload, image_data_url
        from iqa.images import decode_image
        from iqa.prompts import prompt_set

        profile = self.settings.prompt_profile
        for data in images:
            image = decode_image(
                data,
                max_bytes=self.settings.max_upload_bytes,
                max_pixels=self.settings.max_image_pixels,
                min_side=self.settings.min_image_side,
            ).image
            request = GenerationRequest((image,), prompt_set(profile).score_text, n, self.sampling)
            url = image_data_url(image, self.settings.model_max_pixels)
            self.payloads[data] = chat_payload(self.adapter, request, [url], self.max_tokens, profile)

    async def send(self, data: bytes) -> None:
        payload = self.payloads[data]
        response = await self.client.post("/v1/chat/completions", json=payload)
        if response.status_code != 200 or len(response.json()["choices"]) != payload["n"]:
            raise RuntimeError(f"vLLM answered {response.status_code}: {response.text[:300]}")


async def n_in_one_vs_separate(
    direct: DirectRequests, supply: ImageSupply, samples: int, trials: int
) -> dict[str, Phase]:
    """Wall time for `samples` samples of one image: one request, n sequential, n concurrent."""
    phases = {
        "one request, n samples": Phase(),
        "n requests, one by one": Phase(),
        "n requests at once": Phase(),
    }
    for _ in range(trials):
        for name, phase in phases.items():
            [image] = supply.take(1)  # a new image each time: no prefix or image cache across variants
            direct.prepare([image], samples if name.startswith("one") else 1)
            started = time.perf_counter()
            if name.startswith("one"):
                await direct.send(image)
            elif name.endswith("one by one"):
                for _ in range(samples):
                    await direct.send(image)
            else:
                await asyncio.gather(*(direct.send(image) for _ in range(samples)))
            phase.requests += 1
            phase.latencies_ms.append((time.perf_counter() - started) * 1000)
            phase.wall_s += phase.latencies_ms[-1] / 1000
    return phases


async def run(args: argparse.Namespace, work: Path) -> None:
    from iqa.demo_model import build_demo_model
    from iqa.engines.base import Sampling
    from iqa.engines.vllm import model_max_new_tokens
    from iqa.settings import Settings

    model_dir = build_demo_model(work / "model")
    vllm = VLLMServer(model_dir, work / "vllm.log")
    with console.status("starting vLLM"):
        vllm_start_s = await asyncio.to_thread(vllm.start)
    env = service_env(args, work, model_dir, vllm.url)
    os.environ.update(env)
    settings = Settings(_env_file=None)  # the same EVOQ_* values the server gets
    sampling = Sampling(  # what IQAService.sampling("score") gives for the demo model
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        constrain="score",
    )
    max_tokens = settings.max_new_tokens or model_max_new_tokens(str(model_dir))
    high = args.concurrency
    console.print(
        f"[bold]EvoQuality vLLM serving benchmark[/] on the tiny demo model: vLLM {vllm.url} "
        f"healthy after {vllm_start_s:.1f} s; samples={args.samples}, max_tokens={max_tokens}, "
        f"{args.requests} requests x {args.rounds} rounds per setting, concurrency 1 and {high}, "
        f"images {args.image_size[0]}x{args.image_size[1]} JPEG, {os.cpu_count()} CPUs, "
        f"{args.workers} API worker(s)"
    )
    api_started = time.perf_counter()
    port = free_port()
    server = await start_server(env, work, port, args.workers)
    async with httpx.AsyncClient(base_url=vllm.url) as to_vllm:  # every worker has loaded its adapter
        for _ in range(600):
            models = (await to_vllm.get("/v1/models")).json()["data"]
            if sum(m["id"].startswith("evoq-") for m in models) >= args.workers:
                break
            await asyncio.sleep(0.2)
    api_start_s = time.perf_counter() - api_started
    supply = ImageSupply(tuple(args.image_size))
    paths = ("http", "direct", "http-fast")
    phases = {(path, c): Phase() for path in paths for c in (1, high)}
    limits = httpx.Limits(max_connections=high + 4, max_keepalive_connections=high + 4)
    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as api,
            httpx.AsyncClient(base_url=vllm.url, timeout=600, limits=limits) as to_vllm,
        ):
            adapter = (await api.get("/readyz")).json()["engine"]["adapter"]
            direct = DirectRequests(to_vllm, adapter, settings, sampling, max_tokens)
            calls: dict[str, Callable] = {
                "http": http_scorer(api, args.samples, expect_cached=False),
                "direct": direct.send,
                "http-fast": HTTPScorer(api, args.samples, expect_cached=False, all_valid=False, mode="fast"),
            }

            async def measure(path: str, concurrency: int, count: int, phase: Phase | None) -> None:
                images = supply.take(count)
                if path == "direct":
                    direct.prepare(images, args.samples)
                await closed_loop(images, concurrency, calls[path], phase)

            with console.status("warming up both paths"):
                for path in paths:
                    for c in (high, 1):
                        await measure(path, c, args.warmup // 2 or 1, None)
            for round_no in range(1, args.rounds + 1):
                for c in (1, high):
                    for path in paths:
                        with console.status(f"round {round_no}/{args.rounds}: {path}, concurrency {c}"):
                            await measure(path, c, args.requests, phases[(path, c)])
                        console.print(
                            f"  round {round_no}: {path:6} c={c:<2} "
                            f"{phases[(path, c)].throughput:7.2f} req/s so far"
                        )
            with console.status("n samples in one request vs n requests"):
                samples = await n_in_one_vs_separate(direct, supply, args.samples, args.trials)
    finally:
        server.terminate()
        await server.wait()
        await asyncio.to_thread(vllm.stop)
    report(phases, samples, high, args.samples, vllm_start_s, api_start_s)


def report(
    phases: dict[tuple[str, int], Phase],
    samples: dict[str, Phase],
    high: int,
    n: int,
    vllm_start_s: float,
    api_start_s: float,
) -> None:
    table = Table(title="POST /v1/score with the vLLM engine, tiny demo model", title_justify="left")
    for name in ("path", "concurrency", "requests", "req/s", "p50 ms", "p95 ms"):
        table.add_column(name, justify="left" if name == "path" else "right")
    labels = {
        "http": "HTTP API -> vLLM (engine, DB, store)",
        "direct": "vLLM direct (same requests)",
        "http-fast": "HTTP API, mode=fast (one-pass reading)",
    }
    order = list(labels)
    for (path, c), phase in sorted(phases.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        table.add_row(
            labels[path],
            str(c),
            str(phase.requests),
            f"{phase.throughput:.2f}",
            f"{phase.percentile(50):.1f}",
            f"{phase.percentile(95):.1f}",
        )
    console.print(table)

    cost = Table(title=f"{n} samples of one image, vLLM direct", title_justify="left")
    for name in ("how", "images", "mean ms", "x one request"):
        cost.add_column(name, justify="left" if name == "how" else "right")
    one = samples["one request, n samples"].wall_s / samples["one request, n samples"].requests
    for name, phase in samples.items():
        mean = phase.wall_s / phase.requests
        cost.add_row(
            name.replace("n ", f"{n} "), str(phase.requests), f"{mean * 1000:.0f}", f"{mean / one:.2f}x"
        )
    console.print(cost)

    ratio = phases[("http", high)].throughput / phases[("direct", high)].throughput
    separate = samples["n requests, one by one"].wall_s / samples["one request, n samples"].wall_s
    targets = Table(title="Ratios and targets", title_justify="left")
    for name in ("figure", "value", "target", ""):
        targets.add_column(name, justify="left" if name == "figure" else "right")

    def verdict(ok: bool) -> str:
        return "[bold green]PASS[/]" if ok else "[bold red]FAIL[/]"

    targets.add_row(
        f"API / direct throughput at c={high}", f"{ratio:.2f}x", ">= 0.95x", verdict(ratio >= 0.95)
    )
    for c in (1, high):
        fast, sampled = phases[("http-fast", c)], phases[("http", c)]
        gain = fast.throughput / sampled.throughput
        targets.add_row(
            f"fast / sampled req/s over HTTP, c={c} (p50 {fast.percentile(50):.0f} vs "
            f"{sampled.percentile(50):.0f} ms)",
            f"{gain:.1f}x",
            ">= 10x",
            verdict(gain >= 10),
        )
    targets.add_row(
        f"{n} separate requests / one request of n={n}",
        f"{separate:.2f}x",
        "several x",
        verdict(separate >= 2),
    )
    targets.add_row("vLLM start-up (to /health)", f"{vllm_start_s:.1f} s", "-", "")
    targets.add_row("API start-up (to /readyz, vLLM up)", f"{api_start_s:.1f} s", "-", "")
    console.print(targets)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="evoq-bench-vllm-"))
    try:
        asyncio.run(run(args, work))
    finally:
        if args.keep:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Overload benchmark: with a bounded engine queue, a flood is answered fast, half of it with 503.

`.venv/bin/python bench/overload.py` (offline, the tiny demo model): starts `evoq serve` in a child
process with `EVOQ_MAX_QUEUED_REQUESTS=Q` (default 32), then sends POST /v1/score requests, each with a
new image, from a closed loop of clients:

  - at concurrency Q (the queue bound): every request accepted; their p99 is the reference;
  - at concurrency 256: the accepted requests' p99 (target: within 2x of the reference), how many got
    503 and how fast (target: at once), and whether every accepted request was logged (nothing lost).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from serve import ImageSupply, console, free_port, start_server  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, default=32, help="EVOQ_MAX_QUEUED_REQUESTS")
    parser.add_argument("--flood", type=int, default=256, help="the high concurrency")
    parser.add_argument("--requests", type=int, default=2000, help="requests at the high concurrency")
    parser.add_argument("--samples", type=int, default=2)
    return parser.parse_args(argv)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else float("nan")


async def flood(url: str, images: list[bytes], concurrency: int, samples: int) -> list[tuple[int, float]]:
    """(status, ms) of every request, `concurrency` clients each sending its next one when answered."""
    queue = list(reversed(images))
    out: list[tuple[int, float]] = []
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_client() -> None:
            while queue:
                data = queue.pop()
                started = time.perf_counter()
                response = await client.post(
                    "/v1/score",
                    files={"images": ("i.jpg", data, "image/jpeg")},
                    data={"samples": str(samples)},
                )
                out.append((response.status_code, (time.perf_counter() - started) * 1000))

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return out


async def run(args: argparse.Namespace, work: Path) -> None:
    import sqlalchemy

    port = free_port()
    env = {
        "EVOQ_DATA_DIR": str(work / "data"),
        "EVOQ_DEVICE": "cpu",
        "EVOQ_MAX_QUEUED_REQUESTS": str(args.queue),
        "EVOQ_ROUND_MIN_NEW_IMAGES": str(10**9),
    }
    server = await start_server(env, work, port)
    url = f"http://127.0.0.1:{port}"
    supply = ImageSupply((320, 240))
    try:
        await flood(url, supply.take(args.queue), args.queue, args.samples)  # warm-up
        reference = await flood(url, supply.take(max(4 * args.queue, 200)), args.queue, args.samples)
        flooded = await flood(url, supply.take(args.requests), args.flood, args.samples)
    finally:
        server.terminate()
        await server.wait()
    engine = sqlalchemy.create_engine(f"sqlite:///{work / 'data' / 'evoq.db'}")
    with engine.connect() as connection:
        logged = connection.execute(sqlalchemy.text("select count(*) from predictions")).scalar_one()
    engine.dispose()
    ok_ref = [ms for status, ms in reference if status == 200]
    ok = [ms for status, ms in flooded if status == 200]
    shed = [ms for status, ms in flooded if status == 503]
    other = [status for status, _ in flooded + reference if status not in (200, 503)]
    accepted_total = args.queue + len(ok_ref) + len(ok)  # warm-up requests were all accepted too
    table = Table(title=f"overload: queue bound {args.queue}, flood at concurrency {args.flood}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        f"p99 accepted at c={args.queue} (reference)", f"{p99(ok_ref):.0f} ms ({len(ok_ref)} ok)", ""
    )
    table.add_row(
        f"p99 accepted at c={args.flood}",
        f"{p99(ok):.0f} ms = {p99(ok) / p99(ok_ref):.2f}x ({len(ok)} ok)",
        "<= 2x",
    )
    table.add_row("refused with 503", f"{len(shed)} of {len(flooded)}", "the rest")
    table.add_row("p99 of a 503", f"{p99(shed):.0f} ms", "at once")
    table.add_row("accepted and logged", f"{logged} of {accepted_total}", "all")
    table.add_row("other statuses", str(sorted(set(other))) if other else "none", "none")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="evoq-bench-overload-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()

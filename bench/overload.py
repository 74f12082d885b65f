"""Overload benchmark: with a bounded engine queue, a flood is answered fast, half of it with 503.

`.venv/bin/python bench/overload.py` (offline, the tiny demo model): starts `evoq serve` in a child
process with `EVOQ_MAX_QUEUED_REQUESTS=Q` (default 32), then sends POST /v1/score requests, each with a
new image, from a closed loop of clients:

  - at concurrency Q (the queue bound): every request accepted; their p99 is the reference;
  - at concurrency 256 for 30 s, each refused request sent again at once: the accepted requests' p99
    (target: within 2x of the reference), how many got 503 and how fast (target: at once), and
    whether every accepted request was logged (nothing lost).

The load generator writes prebuilt requests on raw connections: httpx cost about 20 ms of CPU per
request on this 2-core machine, which made the flood measure its own queue.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from serve import ImageSupply, console, free_port, start_server  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, default=32, help="EVOQ_MAX_QUEUED_REQUESTS")
    parser.add_argument("--flood", type=int, default=256, help="the high concurrency")
    parser.add_argument("--requests", type=int, default=2000, help="most images sent at the high concurrency")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the flood lasts")
    parser.add_argument("--samples", type=int, default=2)
    return parser.parse_args(argv)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else float("nan")


def score_request(port: int, image: bytes, samples: int) -> bytes:
    """A complete POST /v1/score, built once before the clock starts: the load generator shares this
    machine's two cores with the server, and httpx spent about 20 ms of CPU per request here, so at
    c=256 the latencies measured were this process's own queue (the server answered /healthz in 3 ms
    meanwhile)."""
    boundary = "evoqbenchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="samples"\r\n\r\n{samples}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="i.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, float]:
    """(status, whether the server keeps the connection open, Retry-After seconds or 0); the body is
    read and dropped."""
    status = int((await reader.readuntil(b"\r\n")).split()[1])
    length, keep, retry_after = 0, True, 0.0
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            keep = False
        elif name.lower() == "retry-after":
            retry_after = float(value)
    await reader.readexactly(length)
    return status, keep, retry_after


async def flood(
    port: int,
    images: list[bytes],
    concurrency: int,
    samples: int,
    seconds: float | None = None,
    polite: bool = False,
) -> list[tuple[int, float]]:
    """(status, ms) of every request: `concurrency` clients, each sending its next request when
    answered (a new connection when the server closed the last one), until the images are used up or
    `seconds` have passed. A refused request is sent again, at once or, by `polite` clients, after
    its Retry-After; an image is used up when it is accepted (a 503 stores nothing of it)."""
    queue = [score_request(port, image, samples) for image in reversed(images)]
    out: list[tuple[int, float]] = []
    deadline = time.perf_counter() + seconds if seconds else float("inf")

    async def one_client() -> None:
        reader = writer = None
        request = None
        while (request is not None or queue) and time.perf_counter() < deadline:
            request = request or queue.pop()
            started = time.perf_counter()
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            status, keep, retry_after = await read_response(reader)
            out.append((status, (time.perf_counter() - started) * 1000))
            if status != 503:
                request = None
            elif polite:
                await asyncio.sleep(retry_after)
            if not keep:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

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
    supply = ImageSupply((320, 240))
    try:
        await flood(port, supply.take(args.queue), args.queue, args.samples)  # warm-up
        reference = await flood(port, supply.take(max(4 * args.queue, 200)), args.queue, args.samples)
        floods = {
            "worst clients (resend at once)": await flood(
                port, supply.take(args.requests), args.flood, args.samples, args.seconds
            ),
            "clients honouring Retry-After": await flood(
                port, supply.take(args.requests), args.flood, args.samples, args.seconds, polite=True
            ),
        }
    finally:
        server.terminate()
        await server.wait()
    engine = sqlalchemy.create_engine(f"sqlite:///{work / 'data' / 'evoq.db'}")
    with engine.connect() as connection:
        logged = connection.execute(sqlalchemy.text("select count(*) from predictions")).scalar_one()
    engine.dispose()
    ok_ref = [ms for status, ms in reference if status == 200]
    every = [row for rows in floods.values() for row in rows] + reference
    other = [status for status, _ in every if status not in (200, 503)]
    accepted_total = args.queue + sum(status == 200 for status, _ in every)  # and the warm-up's
    table = Table(
        title=f"overload: queue bound {args.queue}, {args.seconds:.0f} s at concurrency {args.flood}"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        f"p99 accepted at c={args.queue} (reference)", f"{p99(ok_ref):.0f} ms ({len(ok_ref)} ok)", ""
    )
    for name, flooded in floods.items():
        ok = [ms for status, ms in flooded if status == 200]
        shed = [ms for status, ms in flooded if status == 503]
        table.add_row(name, "", "")
        table.add_row(
            f"  p99 accepted at c={args.flood}",
            f"{p99(ok):.0f} ms = {p99(ok) / p99(ok_ref):.2f}x ({len(ok)} ok, {len(ok) / args.seconds:.1f}/s)",
            "<= 2x",
        )
        table.add_row("  refused with 503", f"{len(shed)} of {len(flooded)}", "the rest")
        table.add_row("  p99 of a 503", f"{p99(shed):.0f} ms", "at once")
    table.add_row("accepted and logged", f"{logged} of {accepted_total}", "all")
    table.add_row("other statuses", str(sorted(set(other))) if other else "none", "none")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="evoq-bench-overload-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()

"""The `evoq` command. Heavy imports stay inside the commands so `evoq --help` is instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="EvoQuality Service: self-improving image-quality assessment.", no_args_is_help=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Start the HTTP API (settings from EVOQ_* variables; the embedded default needs none)."""
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level=log_level)


@app.command("demo-model")
def demo_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model into.")],
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
) -> None:
    """Build the tiny untrained Qwen2.5-VL used by the demo and the tests (offline, about a second)."""
    from iqa.demo_model import build_demo_model

    typer.echo(build_demo_model(out_dir, seed=seed))


@app.command()
def migrate() -> None:
    """Apply the database migrations (run once before starting several API replicas)."""
    from iqa.db import upgrade_database
    from iqa.settings import get_settings

    upgrade_database(get_settings().database_url or "")
    typer.echo("database is at the newest migration")


if __name__ == "__main__":
    app()

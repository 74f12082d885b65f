"""Live HTTP servers for the API tests: real uvicorn, real database (SQLite or PostgreSQL), real demo model.

`LiveServer` runs `uvicorn.Server` on an ephemeral loopback port in a background thread with its own
event loop, and gives the tests an httpx client, a SQLAlchemy engine of their own on the same database
(to assert rows), the image store folder, and a way to run a coroutine inside the server's loop.

Servers are module-scoped where tests can share one (`server`, once per database backend); tests that
change a server's state for good start their own with `start_server`.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.app import create_app
from iqa.db import make_engine
from iqa.demo_model import build_demo_model
from iqa.models import Comparison, Image, ModelVersion, Prediction
from iqa.service import DEMO_NAME, IQAService
from iqa.settings import Settings
from tests import imagegen
from tests.conftest import POSTGRES_SERVER_URL, POSTGRES_START_COMMAND

STARTUP_TIMEOUT_S = 60.0

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


# ---- images -----------------------------------------------------------------------------------------


def jpeg(seed: int = 0, w: int = 64, h: int = 48) -> bytes:
    """A small photo-like JPEG; distinct seeds give distinct bytes."""
    return imagegen.encode(imagegen.photo(w, h, seed=seed), "JPEG")


def png(seed: int = 0, w: int = 64, h: int = 48) -> bytes:
    return imagegen.encode(imagegen.photo(w, h, seed=seed), "PNG")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(stem: str, data: bytes) -> tuple[str, bytes, str]:
    """A multipart file tuple with the extension and image/* type a browser would send."""
    kind = "png" if data.startswith(b"\x89PNG") else "jpeg"
    return (f"{stem}.{'png' if kind == 'png' else 'jpg'}", data, f"image/{kind}")


def form_fields(form: dict[str, Any]) -> dict[str, str]:
    """Form values as a browser sends them (booleans as true/false)."""
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in form.items()}


def unique_seed() -> int:
    """A seed no other test of the session uses, so shared servers never see a test's image before it."""
    return uuid.uuid4().int % 2**31


def error_of(response: httpx.Response) -> dict:
    """The `{"error": {"type", "message"}}` body, checked for shape."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---- databases --------------------------------------------------------------------------------------


@contextmanager
def fresh_database(backend: str, folder: Path) -> Iterator[str]:
    """URL of a new, empty database (not yet migrated: the app migrates at start-up).

    PostgreSQL gets a uniquely named database of its own on the test server, dropped afterwards, so a
    test may break it (drop, rename) without touching any other test's data.
    """
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'db' / 'evoq.db'}"
        return
    admin = create_engine(
        f"{POSTGRES_SERVER_URL}/postgres", isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"evoq_api_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_SERVER_URL} ({exc.orig}). "
            f"Start it with: {POSTGRES_START_COMMAND}",
            pytrace=False,
        )
    try:
        yield f"{POSTGRES_SERVER_URL}/{name}"
    finally:
        with admin.connect() as connection:
            for candidate in (name, f"{name}_gone"):  # a test may have renamed it
                connection.execute(text(f'DROP DATABASE IF EXISTS "{candidate}" WITH (FORCE)'))
        admin.dispose()


# ---- the server ---------------------------------------------------------------------------------------


class LiveServer:
    """A real uvicorn server for `settings`, on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="evoq-test-server", daemon=True)
        self._error: BaseException | None = None
        self.url = ""
        self.http: httpx.Client
        self.db = make_engine(settings.database_url or "")
        self.store_root = Path(settings.image_store or settings.data_dir / "images")

    def _run(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await self._server.serve()

        try:
            asyncio.run(serve())
        except BaseException as error:  # reported by start()
            self._error = error

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self._error!r}")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60.0)
        return self

    def stop(self) -> None:
        if self.url:
            self.http.close()
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.db.dispose()
        assert not self._thread.is_alive(), "the server thread did not stop"

    # ---- the running service ----------------------------------------------------------------------------
    @property
    def service(self) -> IQAService:
        return self.app.state.service

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        """Run `coroutine` inside the server's event loop (where the engine lives) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    # ---- requests -----------------------------------------------------------------------------------
    def score(self, *images: bytes, **form: Any) -> httpx.Response:
        """POST /v1/score with `images` as files named img0, img1, ... and their image/* type."""
        files = [("images", upload(f"img{i}", data)) for i, data in enumerate(images)]
        return self.http.post("/v1/score", files=files, data=form_fields(form))

    def compare(self, a: bytes, b: bytes, **form: Any) -> httpx.Response:
        files = [("image_a", upload("a", a)), ("image_b", upload("b", b))]
        return self.http.post("/v1/compare", files=files, data=form_fields(form))

    def rank(self, *images: bytes, **form: Any) -> httpx.Response:
        files = [("images", upload(f"img{i}", data)) for i, data in enumerate(images)]
        return self.http.post("/v1/rank", files=files, data=form_fields(form))

    # ---- the database and the store, read independently of the server ----------------------------------
    def session(self) -> Session:
        return Session(self.db, expire_on_commit=False)

    def image_row(self, sha: str) -> Image | None:
        with self.session() as session:
            return session.scalars(select(Image).where(Image.sha256 == sha)).first()

    def image_rows(self, sha: str) -> list[Image]:
        with self.session() as session:
            return list(session.scalars(select(Image).where(Image.sha256 == sha)))

    def predictions(self, sha: str) -> list[Prediction]:
        """Predictions of the image with `sha`, oldest first."""
        with self.session() as session:
            return list(
                session.scalars(
                    select(Prediction)
                    .join(Image, Prediction.image_id == Image.id)
                    .where(Image.sha256 == sha)
                    .order_by(Prediction.id)
                )
            )

    def comparison(self, comparison_id: int) -> Comparison | None:
        with self.session() as session:
            return session.get(Comparison, comparison_id)

    def active_version(self) -> ModelVersion:
        with self.session() as session:
            return session.scalars(select(ModelVersion).where(ModelVersion.status == "active")).one()

    def count(self, table: type) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(table)) or 0

    def counts(self) -> dict[str, int]:
        return {t.__tablename__: self.count(t) for t in (Image, Prediction, Comparison)}

    def stored_path(self, sha: str) -> Path:
        return self.store_root / sha[:2] / sha[2:4] / sha

    def stored_files(self) -> list[Path]:
        """Every file in the image store (temp files included, so leftovers would show)."""
        if not self.store_root.exists():
            return []
        return sorted(p for p in self.store_root.rglob("*") if p.is_file())


def make_settings(demo_model_dir: Path, data_dir: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings for a test server: the demo model on CPU, nothing read from `.env` or the environment."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "model": str(demo_model_dir),
        "model_name": DEMO_NAME,
        "device": "cpu",
        "score_samples": 2,
        "compare_votes": 2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# ---- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny untrained demo model, built once per test session."""
    return build_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="session")
def start_server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LiveServer]]:
    """Factory: `start_server(database_url, **settings)` starts a server; all are stopped at the end
    of the session unless the test stops them first (stopping twice is harmless)."""
    started: list[LiveServer] = []

    def start(database_url: str, data_dir: Path | None = None, **overrides: Any) -> LiveServer:
        folder = data_dir or tmp_path_factory.mktemp("data")
        server = LiveServer(make_settings(demo_model_dir, folder, database_url, **overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server._thread.is_alive():
            server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(
    backend: str, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One server per test module and database backend, on a fresh database of its own."""
    folder = tmp_path_factory.mktemp(f"server-{backend}")
    with fresh_database(backend, folder) as url:
        live = LiveServer(make_settings(demo_model_dir, folder, url)).start()
        try:
            yield live
        finally:
            live.stop()

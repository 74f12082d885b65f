"""The round-2 option through the worker: an admin's override reaches the round, and the variants'
same-reference pairs stay out of the database (their images are not client images) but in the version.

The round is real: database, image store, the demo model voting and scoring, GRPO in a child process.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from sqlalchemy import func, select

from iqa import registry
from iqa.db import make_engine, make_sessionmaker, upgrade_database
from iqa.models import EvolutionRound, Image, ModelVersion, PseudoLabel
from iqa.settings import Settings
from iqa.store import ImageStore
from tests.worker.conftest import log_photos
from tests.worker.test_inprocess_rounds import TINY_ROUND
from trainer.config import RoundOverrides
from trainer.lifecycle import WorkerEngines, create_round, execute_round


def test_admin_variant_override_reaches_the_round_and_variants_stay_out_of_the_database(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'evoq.db'}"
    upgrade_database(url)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        database_url=url,
        model=str(demo_model_dir),
        device="cpu",
        **TINY_ROUND,
    )
    assert settings.round_variants_per_image == 0  # off unless asked for
    sessions = make_sessionmaker(make_engine(url))
    store = ImageStore(tmp_path / "images")
    log_photos(sessions, store, 5)
    stored_files = sorted(store.root.rglob("*"))
    # What the admin route stores for POST /admin/evolutions {"variants_per_image": 1, "variant_pairs": 2}.
    overrides = RoundOverrides(variants_per_image=1, variant_pairs=2, seed=0)
    with sessions() as session:
        base = registry.ensure_base_version(session, "demo (untrained)", str(demo_model_dir), True)
        round_id = create_round(session, "manual", overrides, base.id).id

    state = asyncio.run(execute_round(round_id, settings, sessions, WorkerEngines(settings, sessions)))

    with sessions() as session:
        row = session.get_one(EvolutionRound, round_id)
        assert state in ("succeeded", "rejected"), row.error  # either way the version is recorded
        version = session.get_one(ModelVersion, row.result_version_id)
        manifest = version.manifest
        assert manifest["settings"]["variants_per_image"] == 1 and manifest["settings"]["variant_pairs"] == 2
        assert manifest["pool"]["variants"] == 5 and manifest["pseudo_labels"]["variant_pairs"] == 2
        stored = session.scalar(
            select(func.count()).select_from(PseudoLabel).where(PseudoLabel.round_id == round_id)
        )
        assert stored == manifest["pseudo_labels"]["random_pairs"] == TINY_ROUND["round_pairs"]
        assert session.scalar(select(func.count()).select_from(Image)) == 5  # no variant became an image
    assert sorted(store.root.rglob("*")) == stored_files  # nor went into the image store
    rows = json.loads((Path(version.path) / "pseudo_labels.json").read_text())
    assert sorted(r["kind"] for r in rows) == ["random"] * 6 + ["same-reference"] * 2  # the version keeps all

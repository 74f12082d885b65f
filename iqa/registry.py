"""Model versions: which checkpoint is active, and how a row becomes an engine `ModelSpec`."""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from iqa.engines.base import ModelSpec
from iqa.models import ModelVersion, utcnow

log = logging.getLogger(__name__)


def to_spec(version: ModelVersion) -> ModelSpec:
    """The engine's view of a version row."""
    return ModelSpec(
        version_id=version.id,
        name=version.name,
        kind=version.kind,  # type: ignore[arg-type]
        path=version.path,
        base_path=version.base_path,
        untrained=version.untrained,
    )


def active_version(session: Session) -> ModelVersion | None:
    """The version new requests should be answered by."""
    return session.scalars(select(ModelVersion).where(ModelVersion.status == "active")).first()


def root_of(session: Session, version: ModelVersion) -> ModelVersion:
    """The base model a lineage of evolved versions started from."""
    while version.parent_id is not None:
        version = session.get_one(ModelVersion, version.parent_id)
    return version


def mark_active(session: Session, version: ModelVersion) -> None:
    """Make `version` the only active row (the caller commits)."""
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == "active", ModelVersion.id != version.id)
        .values(status="retired")
    )
    version.status = "active"
    version.activated_at = utcnow()


def ensure_base_version(session: Session, name: str, path: str, untrained: bool) -> ModelVersion:
    """Register the configured base model and return the version to serve.

    A version evolved from this base stays active across restarts; configuring a different base
    model activates that one instead.
    """
    base = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).first()
    if base is None:
        base = ModelVersion(name=name, kind="base", path=path, untrained=untrained)
        session.add(base)
        session.flush()
    elif base.path != path:
        base.path = path
    active = active_version(session)
    if active is None or root_of(session, active).id != base.id:
        if active is not None:
            log.info("configured model %s replaces active version %s", name, active.name)
        mark_active(session, base)
        active = base
    session.commit()
    return active


def register_version(
    session: Session,
    name: str,
    kind: str,
    path: str,
    base_path: str | None,
    parent_id: int | None,
    untrained: bool,
    metrics: dict | None = None,
    manifest: dict | None = None,
) -> ModelVersion:
    """Add a checkpoint as a new, not yet active version (the caller commits)."""
    version = ModelVersion(
        name=name,
        kind=kind,
        path=path,
        base_path=base_path,
        parent_id=parent_id,
        untrained=untrained,
        metrics=metrics,
        manifest=manifest,
    )
    session.add(version)
    session.flush()
    return version


def list_versions(session: Session) -> list[ModelVersion]:
    """Every version, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())).all())

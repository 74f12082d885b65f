"""Versioned checkpoint folders of an evolution, and how a model path is understood as part of a lineage.

A round writes `<out>/vNNN/`: either a PEFT LoRA adapter (`adapter_config.json`,
`adapter_model.safetensors`) that applies to the lineage's base model, or full weights
(`config.json`, `model.safetensors`), always with the base model's processor, tokenizer and chat-template
files beside them, and `manifest.json` saying where the version came from and how it scored. Both forms
load in `iqa.engines.hf_loading.load_model` (through `ModelSource.spec`) and in vLLM (a LoRA via
`/v1/load_lora_adapter`, full weights as a model folder or by `reload_weights`).

The folder is written under a hidden staging name and renamed into place last, so a crashed round never
leaves a `vNNN` folder that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from iqa.demo_model import is_demo_model
from iqa.engines.base import ModelSpec

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "evoq-checkpoint/1"
# What a manifest must hold; `trainer.round` fills every key.
MANIFEST_KEYS = (
    "format",
    "name",
    "version",
    "round",
    "kind",
    "created_at",
    "base_model",
    "adapter_base",
    "parent",
    "reference_model",
    "settings",
    "pool",
    "pseudo_labels",
    "training",
    "metrics",
    "timings",
)
# Files that make up a Qwen-VL processor (tokenizer, image processor, chat template), copied from the base.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)
_VERSION_DIR = re.compile(r"^v(\d{3,})$")

ModelKind = Literal["base", "lora", "full"]


@dataclass(frozen=True)
class ModelSource:
    """A model as a member of an evolution lineage (plain data: it crosses into the training process).

    `root` is the base model the lineage started from (the KL reference of every round); for a LoRA,
    `adapter_base` is the model the adapter applies to (the root, unless a LoRA was trained on a full
    fine-tune). `untrained` follows the root: descendants of the random demo model stay marked.
    """

    path: str
    kind: ModelKind
    root: str
    name: str
    version: int = 0
    round: int = 0
    adapter_base: str | None = None
    untrained: bool = False

    def spec(self, version_id: int | None = None) -> ModelSpec:
        """The engine's view of this model; `version_id` defaults to the lineage version."""
        return ModelSpec(
            version_id=self.version if version_id is None else version_id,
            name=self.name,
            kind=self.kind,
            path=self.path,
            base_path=self.adapter_base,
            untrained=self.untrained,
        )


def _is_local(path: str) -> bool:
    return Path(path).exists()


def _absolute(path: str) -> str:
    """Local folders as absolute paths (manifests and adapter configs record them); hub ids as given."""
    return str(Path(path).resolve()) if _is_local(path) else path


def resolve_model(path: str | Path) -> ModelSource:
    """Read a model path: an evolved checkpoint (it has a manifest) or a base model (folder or hub id)."""
    text = _absolute(str(path))
    manifest_path = Path(text) / MANIFEST
    if not manifest_path.is_file():
        untrained = _is_local(text) and is_demo_model(text)
        name = Path(text).name if _is_local(text) else text
        return ModelSource(path=text, kind="base", root=text, name=name, untrained=untrained)
    manifest = json.loads(manifest_path.read_text())
    base = manifest["base_model"]
    return ModelSource(
        path=text,
        kind=manifest["kind"],
        root=base["path"],
        name=manifest["name"],
        version=manifest["version"],
        round=manifest["round"],
        adapter_base=manifest.get("adapter_base"),
        untrained=bool(base.get("untrained", False)),
    )


def root_name(source: ModelSource) -> str:
    """A short name for the lineage's base model (the folder name or the hub id's last part)."""
    return Path(source.root).name or source.root.rstrip("/").split("/")[-1]


def next_version(out_dir: Path) -> int:
    """One more than the highest `vNNN` folder (finished or staging) in `out_dir`; 1 for an empty one."""
    numbers = [0]
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            match = _VERSION_DIR.match(entry.name.removeprefix(".").split(".")[0])
            if match:
                numbers.append(int(match.group(1)))
    return max(numbers) + 1


def version_dir_name(version: int) -> str:
    """`v001`, `v002`, ...: sorts by name up to 999 versions, still unique after."""
    return f"v{version:03d}"


def staging_dir(out_dir: Path, version: int) -> Path:
    """A fresh hidden folder to write version `version` into before it is published."""
    path = out_dir / f".{version_dir_name(version)}.partial-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish(staging: Path, out_dir: Path, version: int) -> Path:
    """Rename the finished staging folder to `vNNN`; refuses to replace an existing version."""
    final = out_dir / version_dir_name(version)
    if final.exists():
        raise FileExistsError(f"{final} already exists; versions are never overwritten")
    staging.rename(final)
    return final


def _processor_source(root: str) -> Path:
    """A local folder holding the root's processor files (the hub cache for a hub id)."""
    if _is_local(root):
        return Path(root)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(root, allow_patterns=list(PROCESSOR_FILES)))


def copy_processor_files(root: str, dest: Path) -> list[str]:
    """Copy the base model's processor, tokenizer and chat-template files into `dest`; returns their names.

    Copied rather than re-saved: where torchvision is missing the loaded processor is an image-only
    stand-in class, and saving it would write that class name into `processor_config.json`.
    """
    source = _processor_source(root)
    copied = []
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"no processor or tokenizer files found for base model {root}")
    return copied


def utc_now() -> str:
    """An ISO-8601 UTC timestamp for manifests."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json`; every key of MANIFEST_KEYS must be present (None where it does not apply)."""
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"manifest lacks {missing}")
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder."""
    return json.loads((Path(folder) / MANIFEST).read_text())

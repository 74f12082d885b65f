"""`evoq evolve` and `evoq eval` end to end through the real console script, on the tiny model (CPU)."""

from __future__ import annotations

import asyncio
import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iqa.demo_model import build_demo_model
from iqa.engines.base import Sampling
from iqa.models import Image
from iqa.prompts import parse_score
from tests.api.conftest import demo_model_dir, start_server  # noqa: F401
from tests.imagegen import blurred, noisy, photo
from trainer import checkpoint
from trainer.cli import MosColumns, read_mos_csv
from trainer.round import local_engine, score_images

EVOQ = Path(sys.executable).parent / "evoq"


def evoq(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(EVOQ), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pool")
    for k in range(10):
        image = photo(seed=k // 3)
        image = [image, blurred(image, 2.0), noisy(image, 30.0, seed=k)][k % 3]
        image.save(folder / f"img{k:02d}.{'png' if k % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return folder


@pytest.fixture(scope="module")
def evolved(demo: Path, image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    # Two rounds: the adapter of round 1 votes in round 2 and is trained further.
    done = evoq(
        "evolve",
        *("--images", str(image_dir), "--model", str(demo), "--out", str(out)),
        *("--rounds", "2", "--pairs", "12", "--votes", "4", "--generations", "2", "--steps", "2"),
        *("--max-new-tokens", "16", "--eval-samples", "2", "--learning-rate", "1e-3", "--seed", "7"),
    )
    assert done.stdout.split() == [str(out / "v001"), str(out / "v002")]
    return out


def lora_b(folder: Path) -> dict[str, torch.Tensor]:
    weights = load_file(folder / "adapter_model.safetensors")
    return {k: v for k, v in weights.items() if "lora_B" in k}


def test_evolve_publishes_complete_versioned_checkpoints(evolved: Path, demo: Path, image_dir: Path) -> None:
    root = str(demo.resolve())
    first, second = (checkpoint.read_manifest(evolved / v) for v in ("v001", "v002"))
    for version, manifest in enumerate((first, second), start=1):
        assert set(checkpoint.MANIFEST_KEYS) <= set(manifest)
        assert manifest["version"] == manifest["round"] == version
        assert manifest["kind"] == "lora" and manifest["adapter_base"] == root
        assert manifest["base_model"] == {"path": root, "untrained": True}
        assert manifest["reference_model"] == root  # every round's KL reference is the root
        assert manifest["pool"]["images"] == 10 and manifest["pool"]["rejected"] == 1  # broken.png
        assert manifest["settings"]["votes"] == 4 and manifest["settings"]["train"]["generations"] == 2
        labels = manifest["pseudo_labels"]
        assert labels["pairs"] == 12 and labels["votes"] == 48 and labels["invalid_votes"] == 0
        training = manifest["training"]
        assert (
            training["steps"] == 2 and training["parse_failure_rate"] == 0.0 and training["lone_images"] == 0
        )
        assert training["reward_first"] is not None and training["trainable_parameters"] > 0
        for when in ("before", "after"):
            metrics = manifest["metrics"][when]
            assert metrics["parse_failure_rate"] == 0.0 and metrics["images"] > 0
            assert set(metrics) >= {"holdout_agreement", "score_spread", "mean_score"}
        assert manifest["timings"]["training_s"] > 0
    assert first["parent"]["kind"] == "base"
    assert second["parent"] == {
        "path": str(evolved / "v001"),
        "name": first["name"],
        "kind": "lora",
        "version": 1,
    }
    assert second["metrics"]["before"]["model"] == first["name"]  # round 1's model voted in round 2

    # Weights change: LoRA B starts at zero; round 2 moves round 1's adapter further.
    b1, b2 = lora_b(evolved / "v001"), lora_b(evolved / "v002")
    assert all("visual" not in k for k in b1) and any(v.abs().sum() > 0 for v in b1.values())
    assert any(not torch.equal(b1[k], b2[k]) for k in b1)


def test_evolved_checkpoint_reloads_in_the_local_engine(evolved: Path, image_dir: Path) -> None:
    source = checkpoint.resolve_model(evolved / "v002")
    assert (source.kind, source.version, source.untrained) == ("lora", 2, True)

    async def score() -> list:
        async with local_engine(source.spec()) as engine:
            assert engine.active.name == source.name
            image = photo(seed=1)
            return await score_images(
                engine, [image], 3, Sampling(max_new_tokens=16, constrain="score"), "evoquality"
            )

    (result,) = asyncio.run(score())
    assert result.valid == 3 and 1.0 <= result.score <= 5.0
    assert all(parse_score(c) is not None for c in result.completions)


def test_eval_prints_the_three_correlations(evolved: Path, image_dir: Path, tmp_path: Path) -> None:
    images = sorted(image_dir.glob("img*"))[:6]
    lines = ["image,mos"] + [f"{p},{1 + k * 0.5}" for k, p in enumerate(images)]
    (tmp_path / "mos.csv").write_text("\n".join(lines) + "\n")
    done = evoq(
        "eval", "--csv", str(tmp_path / "mos.csv"), "--model", str(evolved / "v001"), "--samples", "2"
    )
    out = done.stdout
    for name in ("PLCC", "SRCC", "KRCC"):
        assert name in out
    row = next(line for line in out.splitlines() if re.search(r"\b6\b", line) and "/" in line)
    numbers = re.findall(r"-?\d+\.\d{4}|\s-\s", row)
    assert len(numbers) == 3  # a value (or '-' when undefined) per correlation


def test_read_mos_csv_skips_the_header_and_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("path,mos\nx.png,3.5\n/abs/y.png,1\n\n")
    assert read_mos_csv(tmp_path / "a.csv") == [(tmp_path / "x.png", 3.5), (Path("/abs/y.png"), 1.0)]
    (tmp_path / "b.csv").write_text("x.png,3.5\ny.png,good\n")
    with pytest.raises(ValueError, match="not a number"):
        read_mos_csv(tmp_path / "b.csv")


def test_read_mos_csv_by_column_names_as_koniq_publishes_it(tmp_path: Path) -> None:
    """KonIQ-10k's `koniq10k_scores_and_distributions.csv`: quoted headers, images in another folder."""
    (tmp_path / "koniq.csv").write_text(
        '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"\n'
        '"826373.jpg",0,0,25,73,7,105,3.828571,0.527278,77.383621\n'
        '"100066.jpg",1,4,9,71,19,104,3.990385,0.749881,80.983636\n'
    )
    columns = MosColumns(image="image_name", mos="MOS", images_dir=tmp_path / "1024x768")
    assert read_mos_csv(tmp_path / "koniq.csv", columns) == [
        (tmp_path / "1024x768" / "826373.jpg", 3.828571),
        (tmp_path / "1024x768" / "100066.jpg", 3.990385),
    ]
    with pytest.raises(ValueError, match="missing"):
        read_mos_csv(tmp_path / "koniq.csv", MosColumns(image="image_name", mos="mos"))


def test_eval_writes_per_image_scores_and_evaluates_a_running_service(
    evolved: Path,
    image_dir: Path,
    tmp_path: Path,
    start_server,  # noqa: F811
) -> None:
    images = sorted(image_dir.glob("img*"))[:5]
    lines = ["file,score_mos"] + [f"{p.name},{1 + k * 0.5}" for k, p in enumerate(images)]
    (tmp_path / "mos.csv").write_text("\n".join(lines) + "\n")
    options = ["--image-column", "file", "--mos-column", "score_mos", "--images-dir", str(image_dir)]
    done = evoq(
        "eval", "--csv", str(tmp_path / "mos.csv"), "--model", str(evolved / "v001"), "--samples", "2",
        "--prompt-profile", "evoquality", "--out", str(tmp_path / "per-image.csv"), *options,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "per-image.csv").open()))
    assert [Path(r["path"]).name for r in rows] == [p.name for p in images]
    assert all(1.0 <= float(r["score"]) <= 5.0 and r["valid_samples"] == "2" for r in rows)
    assert [float(r["mos"]) for r in rows] == [1.0, 1.5, 2.0, 2.5, 3.0]

    server = start_server(f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path / "data")
    remote = evoq("eval", "--csv", str(tmp_path / "mos.csv"), "--url", server.url, "--samples", "2", *options)
    assert remote.returncode == 0, remote.stderr
    assert "demo (untrained)" in remote.stdout and "SRCC" in remote.stdout
    assert server.count(Image) == 5  # the service logged what it scored

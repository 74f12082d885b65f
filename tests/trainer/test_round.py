"""A round through the Engine interface (a scripted engine, as vLLM would be) with real GRPO in a child
process; gate metrics; checkpoint folders and manifests; a failing child."""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from iqa.demo_model import build_demo_model
from iqa.engines.base import GenerationRequest, GenerationResult, ModelSpec, ReadingRequest, ReadingResult
from iqa.prompts import prompt_set
from iqa.reading import answer_prefix
from iqa.scoring import ScoreResult
from tests.imagegen import photo
from trainer import checkpoint
from trainer.checkpoint import resolve_model
from trainer.config import RoundConfig, TrainSettings
from trainer.process import TrainingFailed
from trainer.round import gate_metrics, run_round
from trainer.voting import make_label


def grey(level: int) -> Image.Image:
    return Image.new("RGB", (32, 32), (level, level, level))


def grey_pool(tmp_path: Path, count: int, step: int) -> Path:
    """A pool folder of `count` flat greys, `step` apart in brightness (the scripted engine's order)."""
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    for k in range(count):
        grey(step * k + 20).save(pool_dir / f"g{k}.png")
    return pool_dir


class BrightnessEngine:
    """Scores an image by its brightness and votes for the brighter one; answers as the active spec."""

    def __init__(self, spec: ModelSpec) -> None:
        self.active = spec

    @staticmethod
    def answer(images: tuple[Image.Image, ...], text: str) -> str:
        levels = [image.getpixel((0, 0))[0] for image in images]
        if text == prompt_set("evoquality").score_text:
            return f"{1 + 4 * levels[0] / 255:.2f}"
        return "0" if levels[0] > levels[1] else "1"

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        answer = self.answer(request.images, request.text)
        return GenerationResult([f"<think>ok</think> \\boxed{{{answer}}}"] * request.n, self.active)

    async def read(self, request: ReadingRequest) -> ReadingResult:
        """The same opinions read in one pass: all the probability on the answer's next character."""
        answer = self.answer(request.images, request.text)
        rows = []
        for prefix in request.prefixes:
            written = prefix[len(answer_prefix("evoquality")) :]  # "" or "d."
            following = answer[len(written)] if answer.startswith(written) else None
            rows.append([0.0 if c == following else -30.0 for c in request.candidates])
        return ReadingResult(rows, self.active)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo"))


@dataclass(frozen=True)
class Engines:
    """`RoundEngines` from one opener: the parent and the candidate are opened the same way."""

    open: Callable
    beside: bool = False  # the parent's held-out evaluation runs beside the training

    def parent(self, spec: ModelSpec):
        return self.open(spec)

    candidate = parent

    def holds_parent_while_training(self, spec: ModelSpec) -> bool:
        return self.beside


def test_a_round_through_the_engine_interface_publishes_a_complete_version(
    demo: Path, tmp_path: Path
) -> None:
    pool_dir = grey_pool(tmp_path, 6, 40)
    opened: list[ModelSpec] = []

    @asynccontextmanager
    async def open_engine(spec: ModelSpec):
        opened.append(spec)
        yield BrightnessEngine(spec)

    stages: list[str] = []
    config = RoundConfig(
        pairs=10,
        votes=2,
        holdout=0.3,
        eval_samples=2,
        max_new_tokens=16,
        train=TrainSettings(generations=2, steps=1, images_per_step=2, learning_rate=1e-3),
    )
    result = asyncio.run(
        run_round(
            demo,
            pool_dir,
            tmp_path / "out",
            config,
            engines=Engines(open_engine),
            progress=lambda stage, done, total: stages.append(stage),
        )
    )

    assert result.path == tmp_path / "out" / "v001" and result.path.is_dir()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v001"]  # no staging folder left behind
    assert [s.kind for s in opened] == ["base", "lora"]  # the parent votes, the candidate is scored
    assert opened[1].base_path == str(demo.resolve()) and opened[1].untrained
    assert {"voting", "scoring-before", "training", "scoring-after"} <= set(stages)

    manifest = checkpoint.read_manifest(result.path)
    assert set(checkpoint.MANIFEST_KEYS) <= set(manifest)
    assert manifest["kind"] == "lora" and manifest["round"] == 1 and manifest["parent"]["kind"] == "base"
    labels = manifest["pseudo_labels"]
    assert labels["pairs"] == 10 and labels["holdout_pairs"] == 3 and labels["train_pairs"] == 7
    assert labels["invalid_votes"] == 0 and labels["ties"] == 0
    # The scripted engine orders images exactly as it votes: agreement 1 both times, no parse failure.
    for when in ("before", "after"):
        metrics = manifest["metrics"][when]
        assert metrics["holdout_agreement"] == 1.0 and metrics["parse_failure_rate"] == 0.0
        assert metrics["score_spread"] > 0
    assert manifest["training"]["steps"] == 1 and manifest["training"]["lone_images"] == 0
    rows = json.loads((result.path / "pseudo_labels.json").read_text())
    assert sorted(row["split"] for row in rows) == ["holdout"] * 3 + ["train"] * 7
    assert (result.path / "adapter_model.safetensors").is_file() and (
        result.path / "tokenizer.json"
    ).is_file()

    source = resolve_model(result.path)
    assert (source.kind, source.version, source.root) == ("lora", 1, str(demo.resolve()))
    assert source.spec().base_path == str(demo.resolve())


class RecordingEngine(BrightnessEngine):
    """BrightnessEngine that logs each reading of the parent in `events`, and may fail on them."""

    def __init__(self, spec: ModelSpec, events: list[str], fail_reading: bool = False) -> None:
        super().__init__(spec)
        self.events = events
        self.fail_reading = fail_reading

    async def read(self, request: ReadingRequest) -> ReadingResult:
        if self.active.kind == "base":
            self.events.append("parent read")
            if self.fail_reading:
                raise RuntimeError("the parent's engine broke")
        return await super().read(request)


def _overlap_round(demo: Path, tmp_path: Path, events: list[str], fail_reading: bool = False):
    pool_dir = grey_pool(tmp_path, 6, 40)

    @asynccontextmanager
    async def open_engine(spec: ModelSpec):
        yield RecordingEngine(spec, events, fail_reading)

    config = RoundConfig(
        pairs=10,
        votes=2,
        holdout=0.3,
        eval_samples=1,
        max_new_tokens=16,
        train=TrainSettings(generations=2, steps=2, images_per_step=2, learning_rate=1e-3),
    )
    return run_round(
        demo,
        pool_dir,
        tmp_path / "out",
        config,
        engines=Engines(open_engine, beside=True),
        progress=lambda stage, done, total: events.append(f"{stage} {done}"),
    )


def test_the_parents_evaluation_runs_beside_the_training_when_its_engine_stays_loaded(
    demo: Path, tmp_path: Path
) -> None:
    """A vLLM server or the serving engine holds the parent during training anyway: its held-out
    evaluation then overlaps the training child (whose start-up alone takes seconds) instead of
    delaying it."""
    events: list[str] = []
    result = asyncio.run(_overlap_round(demo, tmp_path, events))
    started, first_step = events.index("training 0"), events.index("training 1")
    reads = [k for k, event in enumerate(events) if event == "parent read"]
    assert reads and all(started < k < first_step for k in reads), events
    assert not any(event.startswith("scoring-before") for event in events)  # training's steps are shown
    before = result.manifest["metrics"]["before"]
    assert before["holdout_read_agreement"] == 1.0 and len(before["holdout_read_pairs"]) == 3


def test_a_parent_evaluation_failing_beside_the_training_stops_it_and_leaves_no_version(
    demo: Path, tmp_path: Path
) -> None:
    events: list[str] = []
    with pytest.raises(RuntimeError, match="parent's engine broke"):
        asyncio.run(_overlap_round(demo, tmp_path, events, fail_reading=True))
    assert "training 0" in events and "training 2" not in events  # stopped before it finished
    assert list((tmp_path / "out").iterdir()) == []
    assert multiprocessing.active_children() == []  # the training child was killed and reaped


def test_a_round_with_variants_votes_and_trains_on_same_reference_pairs(demo: Path, tmp_path: Path) -> None:
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    for k in range(4):
        photo(64, 48, seed=k).save(pool_dir / f"p{k}.png")
    config = RoundConfig(
        pairs=4,
        votes=2,
        holdout=0.25,
        eval_samples=1,
        max_new_tokens=16,
        device="cpu",
        variants_per_image=2,
        variant_pairs=4,
        train=TrainSettings(generations=2, steps=1, images_per_step=2, learning_rate=1e-3),
    )
    # The demo model votes, is trained and scored: the default local engine, no script.
    result = asyncio.run(run_round(demo, pool_dir, tmp_path / "out", config))

    manifest = result.manifest
    assert manifest["pool"]["images"] == 4 and manifest["pool"]["variants"] == 8
    assert manifest["settings"]["variants_per_image"] == 2 and manifest["settings"]["variant_pairs_used"] == 4
    labels = manifest["pseudo_labels"]
    assert (labels["pairs"], labels["random_pairs"], labels["variant_pairs"]) == (8, 4, 4)

    folder = result.path / manifest["pool"]["variants_dir"]
    index = json.loads((folder / "variants.json").read_text())
    assert sorted(v["id"] for v in index) == sorted(f"p{k}.png#v0{m}" for k in range(4) for m in (1, 2))
    for variant in index:
        assert variant["id"].startswith(variant["reference"] + "#")
        with Image.open(folder / variant["file"]) as image:  # kept with the version, at the pool's size
            assert image.format == "PNG" and image.size == (64, 48)

    rows = json.loads((result.path / "pseudo_labels.json").read_text())
    same = [row for row in rows if row["kind"] == "same-reference"]
    assert len(same) == 4 and sum(row["kind"] == "random" for row in rows) == 4
    for row in rows:
        assert row["votes_i"] + row["votes_j"] + row["invalid"] == config.votes
        references = {row["image_i"].split("#")[0], row["image_j"].split("#")[0]}
        variants = ("#" in row["image_i"]) + ("#" in row["image_j"])
        if row["kind"] == "same-reference":
            assert len(references) == 1 and variants >= 1
        else:
            assert len(references) == 2 and variants == 0  # random pairs join original images only
    # The training process loaded every image of the training pairs by path, variants included.
    trained = {row[key] for row in rows if row["split"] == "train" for key in ("image_i", "image_j")}
    assert any("#" in image for image in trained)
    assert manifest["training"]["train_images"] == len(trained)


def test_a_failing_training_process_raises_and_leaves_no_version(demo: Path, tmp_path: Path) -> None:
    pool_dir = grey_pool(tmp_path, 4, 50)

    @asynccontextmanager
    async def open_engine(spec: ModelSpec):
        yield BrightnessEngine(spec)

    # 2 images x 3 generations cannot be split into 4 micro-batches: the child raises at once.
    config = RoundConfig(
        pairs=5,
        votes=2,
        eval_samples=1,
        train=TrainSettings(generations=3, images_per_step=2, micro_batches=4),
    )
    with pytest.raises(TrainingFailed, match="divisible"):
        asyncio.run(run_round(demo, pool_dir, tmp_path / "out", config, engines=Engines(open_engine)))
    assert list((tmp_path / "out").iterdir()) == []


def score(value: float | None, valid: int = 2, samples: int = 2) -> ScoreResult:
    spec = ModelSpec(0, "m", "base", "m")
    return ScoreResult(value, 0.0, valid, samples, [value] * samples, [""] * samples, spec)


def test_gate_metrics() -> None:
    holdout = [make_label(0, 1, 3, 1, 0), make_label(1, 2, 2, 2, 0), make_label(2, 3, 0, 4, 0)]
    metrics = gate_metrics({0: score(4.0), 1: score(2.0), 2: score(3.0), 3: score(None, 0)}, holdout)
    assert metrics["holdout_agreement"] == 1.0  # pair (2, 3) has no score for 3, the tie is skipped
    assert metrics["parse_failure_rate"] == 0.25
    assert metrics["score_spread"] == pytest.approx(math.sqrt(2 / 3))
    assert metrics["images"] == 4 and metrics["pairs"] == 3 and metrics["decided_pairs"] == 2
    assert gate_metrics({}, [])["holdout_agreement"] is None  # NaN is written as null


def test_versions_are_numbered_staged_and_never_overwritten(tmp_path: Path) -> None:
    assert checkpoint.next_version(tmp_path / "absent") == 1
    staging = checkpoint.staging_dir(tmp_path, 1)
    assert checkpoint.next_version(tmp_path) == 2  # a round in progress holds its number
    published = checkpoint.publish(staging, tmp_path, 1)
    assert published.name == "v001" and checkpoint.next_version(tmp_path) == 2
    with pytest.raises(FileExistsError):
        checkpoint.publish(checkpoint.staging_dir(tmp_path, 1), tmp_path, 1)
    with pytest.raises(ValueError, match="lacks"):
        checkpoint.write_manifest(published, {"format": checkpoint.MANIFEST_FORMAT})


def test_resolve_model_reads_bases_and_hub_ids(demo: Path) -> None:
    base = resolve_model(demo)
    assert (base.kind, base.root, base.version, base.untrained) == ("base", str(demo.resolve()), 0, True)
    hub = resolve_model("ByteDance/EvoQuality")
    assert (hub.kind, hub.root, hub.untrained, checkpoint.root_name(hub)) == (
        "base",
        "ByteDance/EvoQuality",
        False,
        "EvoQuality",
    )

"""Training runs in processes of its own: fresh CUDA state, memory returned at exit, killable.

`train_in_child` is the default: one spawned process runs `trainer.grpo.train_grpo`. With
`TrainSettings.processes` > 1, `train_distributed` runs it as a torchrun job instead (one rank per GPU,
gloo on CPU): every rank trains on its share of each generation batch (whole pairs on every rank, see
`trainer.batching`), TRL and accelerate read the ranks from torchrun's environment, and a DeepSpeed
config (`TrainSettings.deepspeed`, e.g. ZeRO-3 for full fine-tuning) goes to the trainer as the parent
method (VisualQuality-R1) passes it. torchrun rather than `accelerate launch`, because accelerate starts
several CPU processes only through MPI. Both report steps to `progress` and stop when `stop` is set.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import TrainJob

if TYPE_CHECKING:
    from trainer.round import Progress
STEP_PREFIX = "EVOQ_STEP "  # how the main rank of a torchrun job reports a finished step on stdout


class TrainingFailed(RuntimeError):
    """The training process raised (the message holds its traceback) or died."""


def train(
    job: TrainJob, progress: Progress | None = None, stop: threading.Event | None = None
) -> dict[str, Any]:
    """Train `job` in the way its settings ask for: one child process, or a torchrun job."""
    if job.settings.processes > 1:
        return train_distributed(job, progress, stop)
    return train_in_child(job, progress, stop)


def die_with_parent(parent_pid: int) -> None:
    """Linux: the trainer is killed when the process that started it dies, so a killed round (or bench)
    never leaves an orphaned training running for minutes. Elsewhere a no-op."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _quiet_training_process() -> None:
    """The lowest CPU priority (on a machine that also serves requests, the scoring engine keeps the CPU
    it needs) and no per-step chatter from transformers."""
    import warnings

    os.nice(19)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # TRL's and transformers' renames


def _child_main(job: TrainJob, messages: Any, parent_pid: int) -> None:
    """Entry point of the training process: report steps, then the stats or the traceback."""
    die_with_parent(parent_pid)
    _quiet_training_process()
    try:
        from trainer.grpo import train_grpo

        stats = train_grpo(job, on_step=lambda step, total: messages.put(("step", (step, total))))
        messages.put(("done", stats))
    except BaseException:
        messages.put(("error", traceback.format_exc()))
        raise


def train_in_child(
    job: TrainJob, progress: Progress | None = None, stop: threading.Event | None = None
) -> dict[str, Any]:
    """Run `trainer.grpo.train_grpo(job)` in a spawned process; setting `stop` kills it (TrainingFailed)."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    # Not a daemon, so the trainer may start processes of its own; it is killed below if we fail.
    process = context.Process(target=_child_main, args=(job, messages, os.getpid()), name="evoq-grpo")
    process.start()
    outcome: tuple[str, Any] | None = None
    try:
        while outcome is None:
            if stop is not None and stop.is_set():
                raise TrainingFailed("training was stopped: the round failed beside it")
            try:
                kind, payload = messages.get(timeout=0.5)
            except queue.Empty:
                if not process.is_alive():
                    break
                continue
            if kind == "step":
                if progress is not None:
                    progress("training", *payload)
            else:
                outcome = (kind, payload)
        process.join()
    finally:
        if process.is_alive():
            process.kill()
            process.join()
    if outcome is None:
        raise TrainingFailed(f"the training process died (exit code {process.exitcode}) without a result")
    kind, payload = outcome
    if kind == "error":
        raise TrainingFailed(f"training failed in the child process:\n{payload}")
    return payload


def train_distributed(
    job: TrainJob, progress: Progress | None = None, stop: threading.Event | None = None
) -> dict[str, Any]:
    """Run `job` as a torchrun job of `job.settings.processes` ranks; the main rank's stats, with every
    rank's share of the rollouts under `ranks`. Setting `stop` kills the whole job (TrainingFailed)."""
    ranks = job.settings.processes
    with tempfile.TemporaryDirectory(prefix="evoq-torchrun-") as scratch:
        folder = Path(scratch)
        (folder / "job.pkl").write_bytes(pickle.dumps(job))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "trainer.process", str(folder / "job.pkl"), str(folder), str(os.getpid()),
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        steps: queue.Queue[tuple[int, int]] = queue.Queue()
        tail: deque[str] = deque(maxlen=40)
        reader = threading.Thread(target=_read_output, args=(process, steps, tail), daemon=True)
        reader.start()
        try:
            while process.poll() is None or not steps.empty():
                if stop is not None and stop.is_set():
                    raise TrainingFailed("training was stopped: the round failed beside it")
                try:
                    step, total = steps.get(timeout=0.5)
                except queue.Empty:
                    continue
                if progress is not None:
                    progress("training", step, total)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # torchrun and every rank
            process.wait()
            reader.join(timeout=5)
        if process.returncode != 0:
            log = "".join(tail)
            raise TrainingFailed(f"the torchrun job failed (exit code {process.returncode}):\n{log}")
        shares = [json.loads((folder / f"rank{k}.json").read_text()) for k in range(ranks)]
    stats = dict(shares[0])
    stats["ranks"] = [
        {key: share[key] for key in ("process_index", "rollouts", "lone_images", "images_seen")}
        for share in shares
    ]
    return stats


def _read_output(process: subprocess.Popen, steps: queue.Queue, tail: deque) -> None:
    for line in process.stdout:
        if line.startswith(STEP_PREFIX):
            step, total = line[len(STEP_PREFIX) :].split()
            steps.put((int(step), int(total)))
        else:
            tail.append(line)


def _rank_main(job_file: str, out_dir: str, round_pid: str) -> None:
    """One rank of a torchrun job: train, report steps (main rank), write this rank's stats."""
    rank = int(os.environ.get("RANK", "0"))
    die_with_parent(os.getppid())  # torchrun's agent; it was started in a group the round kills
    _quiet_training_process()
    from trainer.grpo import train_grpo

    job: TrainJob = pickle.loads(Path(job_file).read_bytes())

    def on_step(step: int, total: int) -> None:
        if rank == 0:
            print(f"{STEP_PREFIX}{step} {total}", flush=True)

    stats = train_grpo(job, on_step=on_step)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(stats, default=str))


if __name__ == "__main__":
    _rank_main(*sys.argv[1:4])

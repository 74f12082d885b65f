"""How the API hands a queued round to whatever runs it: Celery workers, or this very process."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from kombu.exceptions import OperationalError as BrokerError

from iqa.settings import Settings
from worker.celery_app import EVOLVE_TASK, TRAINING_QUEUE, make_celery

log = logging.getLogger(__name__)


class DispatchUnavailable(RuntimeError):
    """The round cannot be handed over now (the broker is down); the API answers 503."""


def _broker_down(error: Exception) -> str:
    return f"the task broker (Redis) is not answering ({error}); try again later"


class RoundDispatcher(Protocol):
    """Checks that rounds can be run, and starts one."""

    def check(self) -> None:
        """Raise DispatchUnavailable when a round could not be started now."""
        ...

    def submit(self, round_id: int) -> None:
        """Start the queued round `round_id` (returns at once)."""
        ...


class CeleryDispatcher:
    """Sends rounds to the `training` queue of the Celery workers, by task name (no worker code here)."""

    def __init__(self, settings: Settings, broker_timeout_s: float = 3.0) -> None:
        self.app = make_celery(settings)
        self.broker_timeout_s = broker_timeout_s

    def check(self) -> None:
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=self.broker_timeout_s)
        except (BrokerError, OSError) as error:
            raise DispatchUnavailable(_broker_down(error)) from error

    def submit(self, round_id: int) -> None:
        try:
            self.app.send_task(EVOLVE_TASK, args=[round_id], queue=TRAINING_QUEUE, retry=False)
        except (BrokerError, OSError) as error:
            raise DispatchUnavailable(_broker_down(error)) from error


class InProcessDispatcher:
    """Runs rounds inside the API process (the embedded default): same round code, no broker."""

    def __init__(self, service, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop
        self.tasks: set[asyncio.Future] = set()

    def check(self) -> None:
        return None

    def submit(self, round_id: int) -> None:
        from trainer.lifecycle import run_round_in_process

        future = asyncio.run_coroutine_threadsafe(run_round_in_process(self.service, round_id), self.loop)
        self.tasks.add(future)
        future.add_done_callback(self.tasks.discard)

"""The Celery app: rounds on the `training` queue (one at a time), their voting shards on `voting`
(`EVOQ_VOTING_SHARDS`), the schedule on `maintenance`.

Run in production as two processes (see docker-compose.yml):
    celery -A worker.celery_app worker -Q training --pool solo --prefetch-multiplier 1
    celery -A worker.celery_app worker -B -Q maintenance --pool solo   # the one beat, plus its light tasks
    celery -A worker.celery_app worker -Q voting --pool solo            # any number, on any hosts
`--pool solo`: a round runs one at a time in the worker's own process, which may start the training
process (prefork pool children are daemonic and may not); the training process returns its memory when
it exits, and the round's engine is closed after each stage.

Rounds are not acked late: a round killed with its worker is not redelivered (it would run twice after
Redis's visibility timeout); the database marks it failed instead and the next round can run. Nor are
voting shards: the round sends a shard again when its worker's heartbeat stops (`trainer.shards`).
"""

from __future__ import annotations

from celery import Celery

from iqa.settings import Settings, get_settings

TRAINING_QUEUE = "training"
MAINTENANCE_QUEUE = "maintenance"
VOTING_QUEUE = "voting"
EVOLVE_TASK = "worker.tasks.evolve_round"
VOTE_SHARD_TASK = "worker.tasks.vote_shard"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for these settings (tests build their own with a short schedule)."""
    app = Celery("evoquality", include=["worker.tasks"])
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 24 * 3600},
        task_default_queue=MAINTENANCE_QUEUE,
        task_routes={EVOLVE_TASK: {"queue": TRAINING_QUEUE}, VOTE_SHARD_TASK: {"queue": VOTING_QUEUE}},
        task_acks_late=False,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        beat_schedule={
            "evolution-schedule": {
                "task": "worker.tasks.schedule_tick",
                "schedule": settings.round_check_interval_s,
            },
            "retention": {"task": "worker.tasks.retention_tick", "schedule": settings.round_check_interval_s},
        },
    )
    return app


celery_app = make_celery(get_settings())

"""Prometheus metrics of the service's own work, in the process's default registry (`/metrics`).

Counters and histograms count what this process did; what several processes share (images stored,
rounds, the active version) is read from the database at scrape time by `api.observability`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SAMPLES = Counter(
    "evoq_samples_generated", "Completions generated for client requests, by kind (score, vote).", ["kind"]
)
PARSE_FAILURES = Counter(
    "evoq_parse_failures", "Client completions without a parsable answer, by kind (score, vote).", ["kind"]
)
IN_FLIGHT = Gauge(
    "evoq_requests_at_engine",
    "Client requests admitted to the engine now (the bounded queue).",
    multiprocess_mode="livesum",  # under several API workers: the sum over the live ones
)
SHED = Counter("evoq_requests_shed", "Client requests refused with 503 because the engine queue was full.")
UNKEPT = Counter("evoq_unkept_requests", "Requests scored without being stored or logged (keep=false).")
CACHE_HITS = Counter("evoq_cache_hits", "Scores answered from the result cache.")
BATCH_ROWS = Histogram(
    "evoq_engine_batch_rows",
    "Sequences per forward batch of the local engine.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MODEL_CPU = Counter(
    "evoq_engine_model_cpu_seconds",
    "CPU time of the local engine's model thread: image processing, forward passes, decoding (with "
    "torch's intra-op threads at 1, all of the model's CPU; the rest of the process is the API's own).",
)

"""Prometheus metrics: one registry per app (so several apps can live in one process, as in tests)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from .engine import Engine, StepCounts

disable_created_metrics()  # the *_created series only add noise to a scrape
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


def endpoint_label(path: str) -> str:
    """A bounded set of label values: the known routes, the engines route, else "other"."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/engines/") and path.endswith("/completions"):
        return "/v1/engines/completions"
    return "/static" if path.startswith("/static/") else "other"


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("codegen_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("codegen_prompt_tokens", "Prompt tokens accepted", registry=registry)
        self.prompt_computed = Counter("codegen_prompt_tokens_computed", "Prompt tokens whose keys and values were "
                                       "computed", registry=registry)
        self.prompt_reused = Counter("codegen_prompt_tokens_cached", "Prompt tokens whose keys and values were reused "
                                     "from earlier requests (prefix cache)", registry=registry)
        self.evictions = Counter("codegen_prefix_cache_evictions", "Prefix cache entries evicted to make room",
                                 registry=registry)
        self.decode_rows = Counter("codegen_decode_row_steps", "Decoding sequences in forward passes (tokens per "
                                   "forward pass = codegen_decode_tokens_total / this)", registry=registry)
        self.decode_tokens = Counter("codegen_decode_tokens", "Tokens appended by decoding sequences",
                                     registry=registry)
        self.proposed = Counter("codegen_speculative_proposed_tokens", "Speculative tokens verified", registry=registry)
        self.accepted = Counter("codegen_speculative_accepted_tokens", "Speculative tokens kept (acceptance rate = "
                                "this / codegen_speculative_proposed_tokens_total)", registry=registry)
        Gauge("codegen_prefix_cache_bytes", "Memory holding cached keys and values", registry=registry).set_function(
            lambda: engine.scheduler.prefix_cache.used_bytes if engine.scheduler.prefix_cache else 0)
        Gauge("codegen_prefix_cache_capacity_bytes", "The prefix cache's budget", registry=registry).set(
            engine.scheduler.prefix_cache.capacity * engine.scheduler.prefix_cache.bytes_per_token
            if engine.scheduler.prefix_cache else 0)
        self.generated_tokens = Counter("codegen_generation_tokens", "Tokens generated (all sequences)",
                                        registry=registry)
        self.stream_errors = Counter("codegen_stream_errors", "Streams (status 200) that ended in an error event, "
                                     "by reason", ["endpoint", "reason"], registry=registry)
        self.aborted = Counter("codegen_aborted_requests", "Requests ended early", ["reason"], registry=registry)
        self.latency = Histogram("codegen_request_duration_seconds", "Arrival to last token, finished requests",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("codegen_time_to_first_token_seconds", "Arrival to first generated token",
                              ["endpoint"], buckets=TTFT_BUCKETS, registry=registry)
        Gauge("codegen_queue_depth", "Sequences waiting for a decode row", registry=registry).set_function(
            lambda: engine.num_waiting)
        Gauge("codegen_running_sequences", "Sequences in the decode batch", registry=registry).set_function(
            lambda: engine.num_running)
        Gauge("codegen_pending_sequences", "Sequences accepted and not finished", registry=registry).set_function(
            lambda: engine.pending)
        Gauge("codegen_capacity_sequences", "Sequences accepted at once before answering 429",
              registry=registry).set(engine.capacity)
        engine.on_step = self.count_step

    def count_step(self, counts: StepCounts) -> None:
        self.generated_tokens.inc(counts.generated)
        self.prompt_computed.inc(counts.prompt_computed)
        self.prompt_reused.inc(counts.prompt_reused)
        self.evictions.inc(counts.evictions)
        self.decode_rows.inc(counts.decode_rows)
        self.decode_tokens.inc(counts.decode_tokens)
        self.proposed.inc(counts.proposed)
        self.accepted.inc(counts.accepted)


class CountRequests:
    """ASGI middleware counting responses by endpoint and status (pure ASGI, so streams are untouched)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint_label(scope["path"]), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)

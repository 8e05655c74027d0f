"""Prometheus metrics of one app (its own registry, so several apps in one process never mix)."""

from __future__ import annotations

from rag.types import Answer


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("rag_requests_total", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("rag_request_latency_seconds", "request latency", ["route"],
                                 registry=self.registry)
        self.tokens = Counter("rag_tokens_total", "tokens", ["kind"], registry=self.registry)
        self.retrieval = Histogram("rag_retrieval_seconds", "retrieval time per request",
                                   registry=self.registry)
        self.queue_depth = Gauge("rag_queue_depth", "requests being answered (streaming or not)",
                                 registry=self.registry)
        self.ttft = Histogram("rag_time_to_first_token_seconds", "request start to first text",
                              buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                              registry=self.registry)
        self.tokens_per_s = Histogram("rag_output_tokens_per_second", "completion tokens / generation time",
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
                                      registry=self.registry)

    def observe(self, answer: Answer) -> None:
        u, t = answer.usage, answer.timings
        self.tokens.labels("prompt").inc(u.prompt_tokens)
        self.tokens.labels("completion").inc(u.completion_tokens)
        self.retrieval.observe(t.retrieval_s)
        if t.first_token_s is not None:
            self.ttft.observe(t.first_token_s)
        if u.completion_tokens and t.generation_s > 0:
            self.tokens_per_s.observe(u.completion_tokens / t.generation_s)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

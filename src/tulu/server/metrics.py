"""Prometheus metrics of the server (one registry per app, so tests can run several apps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector:
    """Reads queue length, running sequences and KV-cache use from the engine at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        for name, key, help_text in (
            ("tulu_queue_length", "waiting", "Requests waiting to be scheduled"),
            ("tulu_running_sequences", "running", "Sequences being generated"),
            ("tulu_kv_cache_blocks_used", "kv_blocks_used", "KV-cache blocks in use"),
            ("tulu_kv_cache_blocks_total", "kv_blocks_total", "KV-cache blocks in the pool"),
            (
                "tulu_kv_cache_blocks_cached",
                "kv_blocks_cached",
                "Free blocks holding a reusable prefix",
            ),
            (
                "tulu_prefix_cache_hit_rate",
                "prefix_cache_hit_rate",
                "Prefix-cache hits per full prompt block",
            ),
            ("tulu_preemptions", "preemptions", "Sequences preempted since start"),
            ("tulu_lora_adapters_loaded", "lora_adapters", "LoRA adapters loaded (unmerged)"),
            ("tulu_engine_up", "engine_up", "1 while the engine runs, 0 once it has stopped"),
        ):
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], float(stats.get(key, 0)))
            yield family
        # vLLM's prefix_cache_queries / prefix_cache_hits, counted in full prompt blocks: a
        # rate() of the two gives the hit rate over any window.
        for name, key, help_text in (
            ("tulu_prefix_cache_queries", "prefix_cache_queries", "Full prompt blocks looked up"),
            ("tulu_prefix_cache_hits", "prefix_cache_hits", "Full prompt blocks found cached"),
            # As vLLM's spec_decode_num_draft_tokens / spec_decode_num_accepted_tokens: their
            # rate() ratio is the share of proposals kept (--speculative-config).
            (
                "tulu_spec_decode_draft_tokens",
                "spec_decode_draft_tokens",
                "Tokens proposed by n-gram speculative decoding",
            ),
            (
                "tulu_spec_decode_accepted_tokens",
                "spec_decode_accepted_tokens",
                "Proposed tokens the model agreed with",
            ),
        ):
            counter = CounterMetricFamily(name, help_text)
            counter.add_metric([], float(stats.get(key, 0)))
            yield counter


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tulu_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tulu_prompt_tokens", "Prompt tokens processed", registry=self.registry
        )
        self.generation_tokens = Counter(
            "tulu_generation_tokens", "Tokens generated", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "tulu_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "tulu_inter_token_latency_seconds",
            "Time between consecutive generated tokens",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "tulu_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # One series per adapter name: names come from --lora-modules and the (guarded)
        # runtime-loading route, not from requests, so the label set stays small.
        self.lora_requests = Counter(
            "tulu_lora_requests",
            "Generation requests by the LoRA adapter they named",
            ["adapter"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tulu_requests_in_flight",
            "Generation requests admitted and not finished",
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""``/metrics``: the server's state in Prometheus' text format (prometheus-client).

Gauges read at each scrape from the engine (under its lock): KV blocks used and in all, token
occupancy (tokens held over the slots of the blocks in use: the part of those blocks really
filled), the prefix cache's hit rate, requests running and waiting, preemptions so far, and the
prompt tokens each store tier served. Histograms observed as requests finish: time to first
token and time per output token. Each app has a registry of its own.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..engine.params import RequestOutput
from .engine_thread import EngineThread


class _EngineCollector:
    """The engine's gauges, read when scraped."""

    def __init__(self, engine: EngineThread) -> None:
        self.engine = engine

    def collect(self) -> Any:
        llm = self.engine.llm
        with self.engine.lock:
            stats = llm.cache.stats()
            running, waiting = len(llm.scheduler.running), len(llm.scheduler.waiting)
            preemptions = llm.scheduler.num_preemptions
        block_size = llm.cache.config.block_size
        used = int(stats["blocks_used"])
        values = {
            "pagedkv_kv_blocks_used": ("KV blocks in use", used),
            "pagedkv_kv_blocks_total": ("KV blocks in the pool", int(stats["blocks_total"])),
            "pagedkv_kv_token_occupancy": ("tokens held over the slots of the blocks in use",
                                           int(stats["tokens"]) / (used * block_size) if used else 0.0),
            "pagedkv_prefix_cache_hit_rate": ("prompt blocks found in the prefix cache, of those looked up",
                                              float(stats["prefix_hit_rate"])),
            "pagedkv_requests_running": ("requests running", running),
            "pagedkv_requests_waiting": ("requests waiting", waiting),
            "pagedkv_preemptions": ("requests preempted so far", preemptions),
        }
        for name, (doc, value) in values.items():
            yield GaugeMetricFamily(name, doc, value=value)
        tiers = stats.get("tiers")
        if tiers is not None:
            family = GaugeMetricFamily("pagedkv_prompt_tokens_served", "prompt tokens served by each tier",
                                       labels=["tier"])
            for tier, tokens in tiers["tokens"].items():
                family.add_metric([tier], tokens)
            yield family


class Metrics:
    """The registry of one app: the engine's gauges and the request histograms."""

    def __init__(self, engine: EngineThread) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("pagedkv_time_to_first_token_seconds", "seconds from a request's arrival to its "
                              "first token", registry=self.registry)
        self.tpot = Histogram("pagedkv_time_per_output_token_seconds", "seconds per output token after the first",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
                              registry=self.registry)
        self.finished = Gauge("pagedkv_requests_finished", "requests finished", registry=self.registry)

    def observe(self, out: RequestOutput, seconds: float) -> None:
        """A finished request, ``seconds`` after it arrived."""
        self.finished.inc()
        if out.time_to_first_token is not None:
            self.ttft.observe(out.time_to_first_token)
            n = len(out.outputs[0].token_ids)
            if n > 1:
                self.tpot.observe(max(0.0, seconds - out.time_to_first_token) / (n - 1))

    def text(self) -> bytes:
        return generate_latest(self.registry)

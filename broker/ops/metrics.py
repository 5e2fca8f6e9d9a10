"""Prometheus metrics (per process; scrape every worker, or sum them).

Labels are ids and route templates, never tokens, keys or raw paths.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

REQUESTS = Counter(
    "broker_requests", "HTTP requests", ["method", "route", "status"], registry=REGISTRY
)
BROKER_LATENCY = Histogram(
    "broker_added_latency_seconds",
    "Time a request spent in the broker itself (total minus ComfyUI's)",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_LATENCY = Histogram(
    "broker_upstream_latency_seconds",
    "Time spent waiting for ComfyUI",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
PROMPTS = Counter(
    "broker_prompts", "Prompts by final status", ["tenant", "status"], registry=REGISTRY
)
CREDITS_ESTIMATED = Counter(
    "broker_credits_estimated", "Credits reserved (estimate upper bound)", ["tenant"],
    registry=REGISTRY,
)  # fmt: skip
CREDITS_ACTUAL = Counter(
    "broker_credits_actual", "Credits charged at settlement", ["tenant"], registry=REGISTRY
)
BUDGET_REJECTIONS = Counter(
    "broker_budget_rejections", "Prompts refused by a budget", ["tenant", "scope"],
    registry=REGISTRY,
)  # fmt: skip
RATE_LIMITED = Counter(
    "broker_rate_limited", "Prompts refused by a rate limit", ["tenant"], registry=REGISTRY
)
UPSTREAM_HEALTHY = Gauge(
    "broker_upstream_healthy", "1 when the ComfyUI server passes its health checks",
    ["upstream"], registry=REGISTRY,
)  # fmt: skip

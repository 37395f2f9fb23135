"""``GET /metrics`` of the webhooks server: requests, processing outcomes, the inbox and the
notification outbox.

One view however many processes serve the port. ``xswarm webhooks serve --workers N`` runs N
processes behind one ``SO_REUSEPORT`` port, so a scrape lands on whichever worker the kernel
picks; each worker therefore writes its counters to prometheus_client's multiprocess files
(``use_multiprocess``, called in the worker before any metric exists) and every worker
answers with the sum over all of them. Counters of a worker that died stay in its files, so a
restarted worker never makes a total go backwards. A single process (``webhooks serve``, or
the webhooks inside ``xswarm serve``) keeps its counters in memory.

The inbox figures are read from the database at scrape time (they are the same whichever
worker answers), through ``Hub.read``, so inside the runtime that read stays off the loop that
carries the voice tick.

Labels never carry a caller's number, an address or a token: ``route`` is the matched route
template (``unmatched`` for anything else), ``code`` the HTTP status, ``provider`` one of the
inbox's fixed provider names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from engine.store import inbox, outbox

if TYPE_CHECKING:
    from engine.store.db import Database
    from webhooks.hub import Hub

disable_created_metrics()  # no `_created` series beside every counter: Prometheus ignores them in this format

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)
"""Request time: Twilio gives up at 15 s; the targets are p99 <= 30 ms."""
BACKLOG = ("pending", "failed", "dead")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def use_multiprocess(directory: str) -> None:
    """Make this process write its metrics to ``directory`` for the merged view. Call it in a
    worker before the first metric is created (prometheus_client picks its value store then)."""
    os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.MultiProcessValue()


class WebhookMetrics:
    """The webhooks' counters; ``render`` adds the inbox figures and merges the workers."""

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "xswarm_webhook_requests",
            "HTTP requests answered, per route template and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "xswarm_webhook_request_duration_seconds",
            "Time from a request's arrival to its answer, per route template.",
            ["route"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.processed = Counter(
            "xswarm_webhook_events_processed",
            "Inbox events the processor finished, per provider and outcome (done, retry, dead).",
            ["provider", "outcome"],
            registry=self.registry,
        )

    def count(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.duration.labels(route).observe(seconds)

    async def render(self, hub: Hub) -> tuple[bytes, str]:
        """The text exposition: this process's (or every worker's) counters and the inbox."""
        backlog = await hub.read(_inbox_figures)
        unsent = await hub.read(outbox.counts)
        registry = self.registry
        if self.multiprocess_dir:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(
                _Documented(multiprocess.MultiProcessCollector(None, self.multiprocess_dir), self.registry)
            )
        figures = generate_latest(_InboxCollector(backlog)) + generate_latest(_OutboxCollector(unsent))
        return generate_latest(registry) + figures, CONTENT_TYPE_LATEST


def _inbox_figures(db: Database) -> tuple[dict[str, int], int | None]:
    """Rows per open status and the receipt time (ms) of the oldest row still to be applied."""
    counts = {status: 0 for status in BACKLOG}
    counts.update(inbox.open_counts(db))
    return counts, inbox.oldest_open_received_ms(db)


class _Documented(Collector):
    """The workers' merged metrics with their own help text (the files keep only values)."""

    def __init__(self, merged: Collector, own: CollectorRegistry) -> None:
        self.merged = merged
        self.help = {metric.name: metric.documentation for metric in own.collect()}

    def collect(self) -> Iterator[Metric]:
        for metric in self.merged.collect():
            metric.documentation = self.help.get(metric.name, metric.documentation)
            yield metric


class _InboxCollector(Collector):
    def __init__(self, figures: tuple[dict[str, int], int | None]) -> None:
        self.counts, self.oldest_ms = figures

    def collect(self) -> Iterator[Metric]:
        rows = GaugeMetricFamily(
            "xswarm_webhook_inbox_events",
            "Inbox rows not done: pending (new), failed (waiting for a retry), dead (gave up; "
            "`xswarm webhooks inbox --dead`).",
            labels=["status"],
        )
        for status in BACKLOG:
            rows.add_metric([status], float(self.counts[status]))
        yield rows
        age = 0.0 if self.oldest_ms is None else max(0.0, time.time() - self.oldest_ms / 1000)
        yield GaugeMetricFamily(
            "xswarm_webhook_inbox_oldest_open_age_seconds",
            "Age of the oldest pending or failed inbox row (0 when there is none).",
            value=age,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _OutboxCollector(Collector):
    """The notification outbox's rows not sent (database-wide, like the inbox figures)."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        rows = GaugeMetricFamily(
            "xswarm_notify_outbox_messages",
            "Notification outbox rows not sent: pending (queued), failed (waiting for a retry), dead "
            "(gave up; `xswarm notify list --status dead`).",
            labels=["status"],
        )
        for status in BACKLOG:
            rows.add_metric([status], float(self.counts.get(status, 0)))
        yield rows

    def describe(self) -> Iterator[Metric]:
        return iter(())


def middleware(metrics: WebhookMetrics) -> Middleware:
    """Counts every answer, including the errors aiohttp raises as exceptions."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.count(route, exc.status, time.perf_counter() - started)
            raise
        except Exception:  # aiohttp answers it with 500
            metrics.count(route, 500, time.perf_counter() - started)
            raise
        metrics.count(route, response.status, time.perf_counter() - started)
        return response

    return count

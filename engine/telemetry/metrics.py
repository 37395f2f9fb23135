"""Prometheus metrics of one runtime, served by the supervisor server at ``GET /metrics``.

Why a custom collector for most of it: the hot paths (the 80 ms tick, every bridge frame) keep
their own ``engine.telemetry.latency.Histogram`` and plain counters, and observing a second,
locked prometheus histogram per frame would double that cost. The collector reads those
objects only when Prometheus scrapes. Counters that have no other home (webhooks, supervisor
clients) are ordinary prometheus-client metrics in this registry.

Every name starts with ``xswarm_`` and follows Prometheus' conventions: base units
(``_seconds``, ``_bytes``; the hot paths measure milliseconds, converted here at scrape time),
``_total`` on counters only, and no label that holds a caller's number, an address or a token.
Each ``Metrics`` has its own ``CollectorRegistry`` so two runtimes in one process (tests) never
share counters. docs/monitoring.md lists every series and the alerts built on them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from engine.events import Event, SystemSampled, WebhookFailed, WebhookReceived
from engine.host import RuntimeHost
from engine.paths import resolve_paths

disable_created_metrics()  # no `_created` series beside every counter: Prometheus ignores them in this format

if TYPE_CHECKING:
    from engine.models.base import VoiceModel
    from engine.supervisor.server import SupervisorServer


class MetricsHost(RuntimeHost, Protocol):
    """What the metrics read of the runtime (at scrape time, on the runtime loop that answers /metrics)."""

    @property
    def model(self) -> VoiceModel | None: ...
    @property
    def started_at(self) -> float: ...
    @property
    def model_spec(self) -> str: ...
    @property
    def node_state(self) -> str: ...


class Metrics:
    """The registry behind /metrics; subscribes to the bus for webhook counts."""

    def __init__(self, runtime: MetricsHost, *, supervisor: SupervisorServer | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.webhooks = Counter(
            "xswarm_webhooks_received",
            "Webhook deliveries accepted, per provider.",
            ["provider"],
            registry=self.registry,
        )
        self.webhook_failures = Counter(
            "xswarm_webhooks_failed",
            "Webhook deliveries that failed processing, per provider.",
            ["provider", "dead"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "xswarm_supervisor_auth_failures",
            "Refused supervisor logins, per reason.",
            ["reason"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "xswarm_supervisor_dropped",
            "Messages not sent to a slow supervisor (samples superseded, audio too late).",
            ["kind"],
            registry=self.registry,
        )
        self.slow_disconnects = Counter(
            "xswarm_supervisor_slow_disconnects",
            "Supervisors disconnected because they did not keep up.",
            registry=self.registry,
        )
        self.clients = Gauge("xswarm_supervisor_clients", "Connected supervisors.", registry=self.registry)
        if supervisor is not None:
            self.clients.set_function(lambda: supervisor.client_count)
        ProcessCollector(namespace="xswarm", registry=self.registry)  # xswarm_process_*: RSS, CPU, fds
        self.collector = _RuntimeCollector(runtime)
        self.registry.register(self.collector)
        self._unsubscribe: Callable[[], None] | None = runtime.bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        """Bus subscriber (any thread): prometheus-client counters are thread-safe."""
        if isinstance(event, WebhookReceived):
            self.webhooks.labels(provider=event.provider).inc()
        elif isinstance(event, WebhookFailed):
            self.webhook_failures.labels(provider=event.provider, dead=str(event.dead).lower()).inc()
        elif isinstance(event, SystemSampled):
            self.collector.system = event

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


class _RuntimeCollector(Collector):
    """Reads the runtime's live figures at scrape time (on the runtime loop that answers /metrics: reads only)."""

    def __init__(self, runtime: MetricsHost) -> None:
        self.runtime = runtime
        database = runtime.settings.database.path
        self.data_dir = Path(database).parent if database else resolve_paths().data
        """The folder whose file system the disk gauges watch: the database's (worked out once)."""
        self.system: SystemSampled | None = None
        """The newest CPU/RAM/GPU sample from the bus (the runtime's sampler, every second)."""

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        calls = rt.calls
        yield _gauge("xswarm_calls_open", "Live calls on this node.", len(calls))
        model = rt.model
        yield _gauge(
            "xswarm_call_slots", "Call slots of the loaded model (0 before it loads).", model.slots if model else 0
        )
        yield _gauge(
            "xswarm_call_slots_available",
            "Slots a new call could take now (0 while admission is paused).",
            calls.available,
        )
        yield _gauge("xswarm_model_ready", "1 once the model has loaded and serves calls.", float(model is not None))
        yield _gauge(
            "xswarm_node_draining",
            "1 while the node is draining (`xswarm nodes drain`): no new calls, live ones finish.",
            float(rt.node_state == "draining"),
        )
        info = GaugeMetricFamily(
            "xswarm_node_info", "This node's id and the model it serves (value 1).", labels=["node_id", "model"]
        )
        info.add_metric([rt.node_id, model.name if model else rt.model_spec], 1.0)
        yield info
        yield _gauge(
            "xswarm_uptime_seconds", "Seconds since the runtime started.", max(0.0, time.time() - float(rt.started_at))
        )
        scheduler = getattr(rt, "scheduler", None)
        bridge = getattr(rt, "bridge", None)
        if scheduler is not None:
            yield _gauge(
                "xswarm_admission_paused",
                "1 while new calls are refused for lack of headroom (tick work p90 over 90 % of the tick,"
                " or 6+ missed ticks with calls live, in the last 10 s).",
                float(scheduler.headroom() is not None),
            )
        yield from _histogram(
            "xswarm_model_step_duration_seconds",
            "The batched model step alone (model.step), per 80 ms tick.",
            scheduler,
            "model_step_ms",
        )
        yield from _histogram(
            "xswarm_tick_work_duration_seconds",
            "Work per 80 ms tick from its start to the batch's results: gathering frames, the hand-off"
            " to the inference thread, resampling and the model step (admission judges this).",
            scheduler,
            "tick_work_ms",
        )
        yield from _histogram(
            "xswarm_bridge_added_latency_seconds",
            "Latency the bridge adds between a caller frame arriving and its reply going out.",
            bridge,
            "bal_ms",
        )
        yield from _histogram(
            "xswarm_playout_lag_seconds", "Twilio playout lag measured by mark echoes.", bridge, "playout_lag_ms"
        )
        yield from _counter("xswarm_ticks", "80 ms ticks run.", scheduler, "ticks")
        yield from _counter(
            "xswarm_missed_ticks",
            "Ticks that started late because the tick's work overran 80 ms.",
            scheduler,
            "missed_ticks",
        )
        yield from _counter(
            "xswarm_late_frames",
            "Caller frames that missed their tick (concealed with silence).",
            scheduler,
            "late_frames",
        )
        yield from _counter(
            "xswarm_bridge_dropped_frames",
            "Output frames not sent because a caller's socket was congested (the caller hears a gap).",
            bridge,
            "dropped_frames",
        )
        yield from _counter(
            "xswarm_admission_refusals", "Calls refused at admission (no free slot, bad token …).", bridge, "refusals"
        )
        yield from self._gpus()
        yield from _data_filesystem(self.data_dir)
        storage = getattr(rt, "storage", None)
        backup_at = getattr(storage, "last_backup_at", None)
        if backup_at is not None:
            yield _gauge(
                "xswarm_backup_last_success_timestamp_seconds",
                "Unix time of the newest database backup in object storage.",
                backup_at,
            )

    def _gpus(self) -> Iterator[Metric]:
        """GPU memory per card, from the newest system sample (absent without NVIDIA GPUs)."""
        gpus = self.system.gpus if self.system is not None else []
        if not gpus:
            return
        used = GaugeMetricFamily(
            "xswarm_gpu_memory_used_bytes", "GPU memory in use, by every process on the card.", labels=["gpu"]
        )
        total = GaugeMetricFamily("xswarm_gpu_memory_total_bytes", "GPU memory of the card.", labels=["gpu"])
        for index, card in enumerate(gpus):
            used.add_metric([str(index)], float(card["mem_used"]))
            total.add_metric([str(index)], float(card["mem_total"]))
        yield used
        yield total


def _data_filesystem(data: Path) -> Iterator[Metric]:
    """Free and total bytes of the file system holding ``data`` (the database's folder, where
    the storage folder and staged backups live by default)."""
    try:
        usage = shutil.disk_usage(data)
    except OSError:
        return
    yield _gauge("xswarm_data_filesystem_avail_bytes", f"Free bytes on the file system of {data}.", usage.free)
    yield _gauge("xswarm_data_filesystem_size_bytes", f"Size in bytes of the file system of {data}.", usage.total)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _histogram(name: str, doc: str, owner: Any, attr: str) -> Iterator[Metric]:
    """A millisecond latency.Histogram (cumulative buckets, count, sum) as a Prometheus
    histogram in seconds."""
    hist = getattr(owner, attr, None) if owner is not None else None
    if hist is None or not hasattr(hist, "cumulative_buckets"):
        return
    buckets = [(_bound(bound / 1000), float(count)) for bound, count in hist.cumulative_buckets()]
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], buckets, sum_value=float(hist.sum) / 1000)
    yield family


def _counter(name: str, doc: str, owner: Any, attr: str) -> Iterator[Metric]:
    """A plain int counter, or a dict of reason -> int (labelled ``reason``)."""
    value = getattr(owner, attr, None) if owner is not None else None
    if value is None:
        return
    if isinstance(value, dict):
        family = CounterMetricFamily(name, doc, labels=["reason"])
        for reason, count in sorted(value.items()):
            family.add_metric([str(reason)], float(count))
        yield family
    else:
        yield CounterMetricFamily(name, doc, value=float(value))


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else f"{value:g}"

"""Optional OpenTelemetry spans and metrics; free when the ``otel`` extra is not installed.

Nothing here imports opentelemetry until the first span or metric is asked for, and then only if it
is installed. Without an SDK configured by the host, the API hands out no-op tracers and meters.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
SCOPE = "orchestrator_engine"

_lock = threading.Lock()
_loaded = False
_trace: Any = None
_instruments: dict[str, Any] = {}


def _otel() -> Any:
    """Return the opentelemetry.trace module, or None when the extra is not installed."""
    global _loaded, _trace
    if not _loaded:
        with _lock:
            if not _loaded:
                module: Any
                try:
                    from opentelemetry import trace as module
                except ImportError:
                    module = None
                _trace = module
                _loaded = True
    return _trace


def enabled() -> bool:
    """Tell whether OpenTelemetry is installed (spans and metrics are then emitted)."""
    return _otel() is not None


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """Open a span named ``name`` when OpenTelemetry is installed; otherwise do nothing."""
    trace = _otel()
    if trace is None:
        with nullcontext() as nothing:
            yield nothing
        return
    tracer = trace.get_tracer(SCOPE)
    clean = {k: str(v) if not isinstance(v, (bool, int, float, str)) else v for k, v in attributes.items()}
    with tracer.start_as_current_span(name, attributes=clean) as current:
        yield current


def traced(name: str) -> Callable[[F], F]:
    """Decorate a coordinator method so each call is one span."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if _otel() is None:
                return func(*args, **kwargs)
            with span(name):
                return func(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def _instrument(kind: str, name: str, unit: str, description: str) -> Any:
    if _otel() is None:
        return None
    key = f"{kind}:{name}"
    found = _instruments.get(key)
    if found is None:
        from opentelemetry import metrics

        meter = metrics.get_meter(SCOPE)
        factory = meter.create_counter if kind == "counter" else meter.create_histogram
        found = factory(name, unit=unit, description=description)
        with _lock:
            _instruments[key] = found
    return found


def count(name: str, amount: int = 1, **attributes: Any) -> None:
    """Add ``amount`` to counter ``name`` (e.g. ``orchestrator.tasks.completed``)."""
    if amount:
        counter = _instrument("counter", name, "1", name.replace(".", " "))
        if counter is not None:
            counter.add(amount, attributes)


def record_seconds(name: str, seconds: float, **attributes: Any) -> None:
    """Record a duration in seconds on histogram ``name`` (e.g. ready -> start latency)."""
    histogram = _instrument("histogram", name, "s", name.replace(".", " "))
    if histogram is not None:
        histogram.record(seconds, attributes)


def observe_queue_depth(read_depth: Callable[[], int]) -> Any:
    """Register an observable gauge ``orchestrator.queue.depth`` fed by ``read_depth``; None without OTel."""
    if _otel() is None:
        return None
    from opentelemetry import metrics

    def callback(_options: Any) -> Any:
        return [metrics.Observation(read_depth())]

    return metrics.get_meter(SCOPE).create_observable_gauge(
        "orchestrator.queue.depth", callbacks=[callback], unit="1", description="ready task executions"
    )

"""Optional OpenTelemetry spans and metrics; free unless the host has set a tracer or meter provider.

Nothing here imports opentelemetry until the first span or metric is asked for, and then only if it
is installed. Until the host sets a provider (an SDK's, through the API's ``set_*_provider`` or the
``OTEL_PYTHON_*_PROVIDER`` variables) the API would hand out no-op tracers and meters; the engine
then skips building spans and attributes altogether, a cost a worker would otherwise pay per task.
It asks again on every call, so a provider set later is used from then on: cheaply, by reading the
API's provider global (one attribute) rather than calling ``get_*_provider``, which also looks up an
environment variable every time; a provider named by those variables is found if they were set before
the engine first asked. Providers are set once, so once one is seen it is not asked about again.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
SCOPE = "orchestrator_engine"

_lock = threading.Lock()
_loaded = False
_trace: Any = None
_metrics: Any = None
_instruments: dict[str, Any] = {}
#: whether a real (SDK) tracer / meter provider has been seen; providers are set once in OTel
_tracer_set = False
_meter_set = False
#: whether OTEL_PYTHON_TRACER_PROVIDER / OTEL_PYTHON_METER_PROVIDER were set when OTel was loaded
_env_tracer = False
_env_meter = False
#: what a private attribute of the OTel API reads as when this version of the API has no such name
_MISSING = object()


def _otel() -> Any:
    """Return the opentelemetry.trace module, or None when the extra is not installed."""
    global _loaded, _trace, _metrics, _env_tracer, _env_meter
    if not _loaded:
        with _lock:
            if not _loaded:
                module: Any
                meters: Any
                try:
                    from opentelemetry import metrics as meters
                    from opentelemetry import trace as module
                except ImportError:
                    module = meters = None
                _trace, _metrics = module, meters
                _env_tracer = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
                _env_meter = "OTEL_PYTHON_METER_PROVIDER" in os.environ
                _loaded = True
    return _trace


def _tracing() -> Any:
    """Return opentelemetry.trace when spans are recorded: installed, and a tracer provider is set."""
    global _tracer_set
    if _tracer_set:
        return _trace
    trace = _otel()
    if trace is None or _unset(trace, "_TRACER_PROVIDER", _env_tracer):
        return None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None  # the API's stand-in until a provider is set: every span would be a no-op
    _tracer_set = True
    return trace


def _metering() -> Any:
    """Return opentelemetry.metrics when measurements are recorded: installed, and a meter provider is set."""
    global _meter_set
    if _meter_set:
        return _metrics
    if _otel() is None:
        return None
    internal = getattr(_metrics, "_internal", None)
    if internal is not None and _unset(internal, "_METER_PROVIDER", _env_meter):
        return None
    # the API's stand-in until a provider is set (a private class: should its name change, the engine
    # only goes back to handing its measurements to the no-op stand-in)
    if type(_metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider":
        return None
    _meter_set = True
    return _metrics


def _unset(module: Any, name: str, from_env: bool) -> bool:
    """Tell, by one attribute read, that the API's global provider ``name`` is surely not set yet.

    False means "ask the API": the provider is set, the environment names one, or this version of the
    API keeps it under another name (then every call pays the API's own, slower check).
    """
    return not from_env and getattr(module, name, _MISSING) is None


def enabled() -> bool:
    """Tell whether OpenTelemetry is installed (spans and metrics are then emitted)."""
    return _otel() is not None


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """Open a span named ``name`` when spans are recorded (see ``_tracing``); otherwise do nothing.

    The context manager yields the span, or None when none is recorded.
    """
    trace = _tracing()
    if trace is None:
        return _NO_SPAN
    return _span(trace, name, attributes)


#: what ``span`` returns while no span is recorded: one shared, reusable no-op
_NO_SPAN: AbstractContextManager[None] = nullcontext()


@contextmanager
def _span(trace: Any, name: str, attributes: dict[str, Any]) -> Iterator[Any]:
    tracer = trace.get_tracer(SCOPE)
    clean = {k: str(v) if not isinstance(v, (bool, int, float, str)) else v for k, v in attributes.items()}
    with tracer.start_as_current_span(name, attributes=clean) as current:
        yield current


def traced(name: str) -> Callable[[F], F]:
    """Decorate a coordinator method so each call is one span."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if _tracing() is None:
                return func(*args, **kwargs)
            with span(name):
                return func(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def _instrument(kind: str, name: str, unit: str, description: str) -> Any:
    metrics = _metering()
    if metrics is None:
        return None
    key = f"{kind}:{name}"
    found = _instruments.get(key)
    if found is None:
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


_depth_readers: dict[int, tuple[str, Callable[[], int | None]]] = {}
_gauge: Any = None


def observe_queue_depth(owner: object, namespace: str | None, read_depth: Callable[[], int | None]) -> Any:
    """Report ``orchestrator.queue.depth`` (ready executions) through ``read_depth`` while ``owner`` lives.

    OpenTelemetry keeps the first instrument registered under a name, so one gauge serves every worker
    in the process: its callback asks each live worker, once per namespace. Returns None without OTel.
    """
    global _gauge
    if _otel() is None:
        return None
    from opentelemetry import metrics

    key = id(owner)
    with _lock:
        _depth_readers[key] = (namespace or "*", read_depth)
    weakref.finalize(owner, _depth_readers.pop, key, None)

    def callback(_options: Any) -> Any:
        seen: dict[str, int] = {}
        for ns, reader in list(_depth_readers.values()):
            if ns not in seen:
                depth = reader()
                if depth is not None:
                    seen[ns] = depth
        return [metrics.Observation(depth, {"namespace": ns}) for ns, depth in seen.items()]

    with _lock:
        if _gauge is None:
            _gauge = metrics.get_meter(SCOPE).create_observable_gauge(
                "orchestrator.queue.depth",
                callbacks=[callback],
                unit="1",
                description="ready task executions",
            )
    return _gauge


def forget_queue_depth(owner: object) -> None:
    """Stop asking ``owner`` for the queue depth (a worker calls this when it stops)."""
    with _lock:
        _depth_readers.pop(id(owner), None)

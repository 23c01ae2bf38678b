"""OpenTelemetry: spans per coordinator call and per task execution, metrics, and no cost without it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from orchestrator_engine import (
    EngineConfig,
    StartWorkflowRequest,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowState,
)
from orchestrator_engine.worker import Worker

otel_sdk = pytest.importorskip("opentelemetry.sdk")


@pytest.fixture(scope="module")
def exporters() -> Any:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return spans, reader


def _metric_points(reader: Any, task_types: set[str] | None = None) -> dict[str, float]:
    """Sum each metric's points; with ``task_types``, only points carrying one of them."""
    data = reader.get_metrics_data()
    out: dict[str, float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if task_types is not None and point.attributes.get("task_type") not in task_types:
                        continue
                    raw: Any = getattr(point, "value", None) or getattr(point, "count", 0)
                    value = float(raw)
                    out[metric.name] = out.get(metric.name, 0) + value
    return out


def test_spans_and_metrics_cover_coordinator_calls_and_task_executions(
    exporters: Any, pool: ConnectionPool[Any], engine_config: EngineConfig
) -> None:
    spans, reader = exporters
    workflows = WorkflowCoordinator(pool, engine_config)
    workflows.register_workflow(
        WorkflowDefinition(
            "otel", "pair", [TaskDefinition("otel_a"), TaskDefinition("otel_b", depends_on=["otel_a"])]
        )
    )
    instance = workflows.start_workflow(StartWorkflowRequest("otel", "pair", "run-1"))
    with Worker(pool, {"otel_a": lambda ctx: 1, "otel_b": lambda ctx: 2}, config=engine_config):
        deadline = time.monotonic() + 30
        while workflows.get_workflow(instance.instance_id).state is WorkflowState.RUNNING:
            assert time.monotonic() < deadline, "workflow did not complete"
            time.sleep(0.02)
        # the gauge is read while the worker runs; a stopped worker reports no depth
        assert "orchestrator.queue.depth" in _metric_points(reader)
    names = [s.name for s in spans.get_finished_spans()]
    assert "orchestrator.start_workflow" in names
    assert "orchestrator.poll_tasks" in names
    assert "orchestrator.complete_tasks" in names  # the worker completes in groups
    task_spans = [s for s in spans.get_finished_spans() if s.name == "orchestrator.task"]
    mine = [s for s in task_spans if s.attributes["instance_id"] == str(instance.instance_id)]
    assert sorted(s.attributes["task_id"] for s in mine) == ["otel_a", "otel_b"]
    points = _metric_points(reader, {"otel_a", "otel_b"})
    assert points["orchestrator.tasks.started"] == 2
    assert points["orchestrator.tasks.completed"] == 2
    assert points["orchestrator.tasks.ready_to_start"] == 2  # histogram: one observation per task


def test_importing_the_engine_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, orchestrator_engine, orchestrator_engine.worker; print('opentelemetry' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_opentelemetry_spans_and_metrics_are_no_ops() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from orchestrator_engine import telemetry\n"
        "with telemetry.span('x', a=1): pass\n"
        "telemetry.count('c'); telemetry.record_seconds('h', 0.1)\n"
        "print(telemetry.enabled(), telemetry.observe_queue_depth(object(), None, lambda: 1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False None"


def test_spans_are_skipped_until_the_host_sets_a_tracer_provider() -> None:
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "from orchestrator_engine import telemetry\n"
        "with telemetry.span('before', a=1) as current: print(current is None)\n"
        "spans = InMemorySpanExporter()\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(spans))\n"
        "trace.set_tracer_provider(provider)\n"
        "with telemetry.span('after', a=1) as current: print(current is None)\n"
        "print([s.name for s in spans.get_finished_spans()])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["True", "False", "['after']"]


def test_a_provider_named_by_the_environment_is_used_from_the_first_span() -> None:
    # the engine's cheap "no provider yet" check must not hide one the OTEL_PYTHON_* variables name
    code = (
        "from orchestrator_engine import telemetry\n"
        "with telemetry.span('first', a=1) as current: print(current is None)\n"
        "print(telemetry._metering() is not None)\n"
    )
    env = {
        **os.environ,
        "OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider",
        "OTEL_PYTHON_METER_PROVIDER": "sdk_meter_provider",
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split("\n")[:2] == ["False", "True"]

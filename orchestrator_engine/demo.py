"""The demo a newcomer runs first: an order saga on an embedded (or given) PostgreSQL."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TextIO

from .config import EngineConfig, create_pool, redact_dsn
from .coordinators import StartWorkflowRequest, WorkflowCoordinator
from .definitions import RetryPolicy, TaskDefinition, WorkflowDefinition
from .migrator import migrate
from .models import WorkflowState
from .worker import TaskContext, Worker

NAMESPACE = "demo"
RETRY = RetryPolicy(
    max_attempts=3, initial_interval=timedelta(milliseconds=50), max_interval=timedelta(seconds=1)
)

ORDER_SAGA = WorkflowDefinition(
    namespace=NAMESPACE,
    name="order",
    tasks=(
        TaskDefinition("reserve_inventory", retry=RETRY, compensation="release_inventory"),
        TaskDefinition(
            "charge_card", depends_on=["reserve_inventory"], retry=RETRY, compensation="refund_card"
        ),
        TaskDefinition("ship_order", depends_on=["charge_card"], retry=RETRY),
    ),
)


def _order(ctx: TaskContext) -> dict[str, Any]:
    data: dict[str, Any] = ctx.input["workflow"]
    return data


def reserve_inventory(ctx: TaskContext) -> dict[str, Any]:
    order = _order(ctx)
    return {"reservation": f"res-{order['order']}", "items": order["items"]}


def charge_card(ctx: TaskContext) -> dict[str, Any]:
    order = _order(ctx)
    if order["card"] == "flaky" and ctx.attempt == 1:
        raise ConnectionError("payment gateway timed out")
    if order["card"] == "declined":
        raise ValueError("card declined")
    return {"charge": f"ch-{order['order']}", "amount": order["items"] * 10}


def ship_order(ctx: TaskContext) -> dict[str, Any]:
    order = _order(ctx)
    if order["address"] == "nowhere":
        raise RuntimeError("no carrier delivers there")
    return {"tracking": f"trk-{order['order']}"}


def release_inventory(ctx: TaskContext) -> dict[str, Any]:
    return {"released": ctx.input["output"]["reservation"]}


def refund_card(ctx: TaskContext) -> dict[str, Any]:
    return {"refunded": ctx.input["output"]["charge"]}


HANDLERS = {
    "reserve_inventory": reserve_inventory,
    "charge_card": charge_card,
    "ship_order": ship_order,
    "release_inventory": release_inventory,
    "refund_card": refund_card,
}


def orders(count: int) -> list[dict[str, Any]]:
    """Return ``count`` orders: most succeed, some retry, some compensate."""
    out = []
    for i in range(count):
        card = "declined" if i % 7 == 3 else "flaky" if i % 5 == 1 else "ok"
        address = "nowhere" if i % 11 == 6 else "street"
        out.append({"order": i, "items": 1 + i % 4, "card": card, "address": address})
    return out


def expected_state(order: dict[str, Any]) -> WorkflowState:
    if order["card"] == "declined" or order["address"] == "nowhere":
        return WorkflowState.COMPENSATED
    return WorkflowState.COMPLETED


@contextmanager
def _server(dsn: str | None, out: TextIO) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from .embedded import EmbeddedPostgres

    print("starting an embedded PostgreSQL ...", file=out, flush=True)
    with EmbeddedPostgres() as server:
        print(f"  PostgreSQL {server.version} on {redact_dsn(server.dsn())}", file=out, flush=True)
        yield server.dsn()


def run_demo(dsn: str | None = None, *, count: int = 40, workers: int = 2, out: TextIO = sys.stdout) -> int:
    """Run the order saga demo; return 0 when every workflow ends as designed."""
    with _server(dsn, out) as target:
        config = EngineConfig(
            dsn=target,
            lease_duration=timedelta(seconds=10),
            renewal_interval=timedelta(seconds=3),
            poll_interval=timedelta(milliseconds=500),
        )
        applied = migrate(config)
        print(f"migrated schema {config.schema!r}: {applied or 'already up to date'}", file=out)
        pool = create_pool(config, max_size=4 + 3 * workers)
        try:
            return _run(pool, config, count, workers, out)
        finally:
            pool.close()


def _run(pool: Any, config: EngineConfig, count: int, workers: int, out: TextIO) -> int:
    coordinator = WorkflowCoordinator(pool, config)
    coordinator.register_workflow(ORDER_SAGA)
    batch = orders(count)
    run_tag = str(int(time.time() * 1000))
    started = time.perf_counter()
    instances = coordinator.start_workflows(
        [StartWorkflowRequest(NAMESPACE, ORDER_SAGA.name, f"order-{run_tag}-{o['order']}", o) for o in batch]
    )
    print(f"started {len(instances)} order workflows; running {workers} workers", file=out, flush=True)
    pool_workers = [
        Worker(pool, HANDLERS, namespace=NAMESPACE, concurrency=4, config=config) for _ in range(workers)
    ]
    for w in pool_workers:
        w.start()
    try:
        states = _watch(coordinator, [i.instance_id for i in instances], out)
    finally:
        for w in pool_workers:
            w.stop(timeout=10)
    elapsed = time.perf_counter() - started
    wrong = [
        o["order"]
        for o, i in zip(batch, instances, strict=True)
        if states[i.instance_id] != expected_state(o)
    ]
    tasks = [t for i in instances for t in coordinator.list_tasks(i.instance_id)]
    retries = sum(1 for t in tasks if t.attempt_number > 1)
    summary = Counter(s.value for s in states.values())
    rows = [
        ("workflows", str(len(instances))),
        ("completed", str(summary.get("COMPLETED", 0))),
        ("compensated", str(summary.get("COMPENSATED", 0))),
        ("other", str(len(instances) - summary.get("COMPLETED", 0) - summary.get("COMPENSATED", 0))),
        ("task executions", str(len(tasks))),
        ("retries", str(retries)),
        ("elapsed", f"{elapsed:.2f} s"),
        ("throughput", f"{len(tasks) / elapsed:.0f} task executions/s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nsummary", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value:>24}", file=out)
    if wrong:
        print(f"unexpected outcome for orders {wrong}", file=out)
        return 1
    print("every order ended as designed: the declined and undeliverable ones were compensated", file=out)
    return 0


def _watch(coordinator: WorkflowCoordinator, ids: list[Any], out: TextIO) -> dict[Any, WorkflowState]:
    terminal = (WorkflowState.COMPLETED, WorkflowState.COMPENSATED, WorkflowState.CANCELLED)
    deadline = time.monotonic() + 120
    while True:
        states = {i: coordinator.get_workflow(i).state for i in ids}
        counts = Counter(s.value for s in states.values())
        line = "  ".join(f"{k.lower()}={v}" for k, v in sorted(counts.items()))
        print(f"\r  {line:<78}", end="", file=out, flush=True)
        if all(s in terminal for s in states.values()) or time.monotonic() > deadline:
            print(file=out)
            return states
        time.sleep(0.2)

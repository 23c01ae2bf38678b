"""One repository per table: each method runs one named statement and never commits."""

from __future__ import annotations

from .base import Row
from .definitions import DefinitionRepository
from .events import EventRepository
from .executions import ExecutionRepository
from .instances import InstanceRepository
from .maintenance import MaintenanceRepository
from .workers import WorkerRepository


class Repositories:
    """Bundle the repositories of one schema."""

    def __init__(self, schema: str) -> None:
        self.definitions = DefinitionRepository(schema)
        self.instances = InstanceRepository(schema)
        self.executions = ExecutionRepository(schema)
        self.events = EventRepository(schema)
        self.maintenance = MaintenanceRepository(schema)
        self.workers = WorkerRepository(schema)


__all__ = [
    "DefinitionRepository",
    "EventRepository",
    "ExecutionRepository",
    "InstanceRepository",
    "MaintenanceRepository",
    "Repositories",
    "Row",
    "WorkerRepository",
]

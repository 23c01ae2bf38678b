-- orchestrator-engine initial schema.
-- Applied with search_path set to the engine's schema (default "orchestrator"), so names are unqualified.
-- Every child table carries workflow_instance_id so the schema can be distributed by it later.

CREATE TABLE workflow_definitions (
    namespace     text        NOT NULL,
    name          text        NOT NULL,
    version       integer     NOT NULL,
    definition    jsonb       NOT NULL,
    content_hash  text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_workflow_definitions PRIMARY KEY (namespace, name, version),
    CONSTRAINT ck_workflow_definitions_version CHECK (version >= 1)
);

CREATE TABLE workflow_instances (
    instance_id        uuid        NOT NULL,
    namespace          text        NOT NULL,
    workflow_name      text        NOT NULL,
    workflow_version   integer     NOT NULL,
    run_id             text        NOT NULL,
    state              text        NOT NULL,
    input              jsonb,
    output             jsonb,
    sequence_number    bigint      NOT NULL DEFAULT 0,
    -- forward tasks not yet completed; 0 means the workflow is complete
    pending_tasks      integer     NOT NULL,
    -- compensation executions not yet completed while compensating
    pending_compensations integer  NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_workflow_instances PRIMARY KEY (instance_id),
    CONSTRAINT uk_idempotency UNIQUE (namespace, workflow_name, run_id),
    CONSTRAINT fk_workflow_instances_definition FOREIGN KEY (namespace, workflow_name, workflow_version)
        REFERENCES workflow_definitions (namespace, name, version),
    CONSTRAINT ck_workflow_instances_state CHECK (state IN
        ('RUNNING', 'PAUSED', 'COMPLETED', 'FAILED', 'CANCELLED', 'COMPENSATING', 'COMPENSATED')),
    CONSTRAINT ck_workflow_instances_sequence CHECK (sequence_number >= 0)
);

CREATE INDEX ix_workflow_instances_finished ON workflow_instances (updated_at)
    WHERE state IN ('COMPLETED', 'CANCELLED', 'COMPENSATED', 'FAILED');

CREATE TABLE task_executions (
    execution_id        uuid        NOT NULL,
    workflow_instance_id uuid       NOT NULL,
    namespace           text        NOT NULL,
    task_id             text        NOT NULL,
    task_type           text        NOT NULL,
    -- FORWARD for the DAG's own tasks, COMPENSATION for the saga's undo steps
    kind                text        NOT NULL DEFAULT 'FORWARD',
    idempotency_key     text        NOT NULL,
    attempt_number      integer     NOT NULL DEFAULT 1,
    -- lease lapses carried over every attempt of the task; they count against max_attempts
    lapse_count         integer     NOT NULL DEFAULT 0,
    max_attempts        integer     NOT NULL,
    state               text        NOT NULL,
    depends_on          text[]      NOT NULL,
    deps_remaining      integer     NOT NULL,
    input               jsonb,
    output              jsonb,
    error               jsonb,
    lease_holder        uuid,
    lease_expires_at    timestamptz,
    fence_token         bigint      NOT NULL DEFAULT 0,
    timeout             interval,
    deadline_at         timestamptz,
    ready_at            timestamptz,
    started_at          timestamptz,
    finished_at         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_task_executions PRIMARY KEY (execution_id),
    CONSTRAINT uk_task_executions_idempotency_key UNIQUE (idempotency_key),
    CONSTRAINT fk_task_executions_instance FOREIGN KEY (workflow_instance_id)
        REFERENCES workflow_instances (instance_id) ON DELETE CASCADE,
    CONSTRAINT ck_task_executions_state CHECK (state IN
        ('PENDING', 'READY', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    CONSTRAINT ck_task_executions_kind CHECK (kind IN ('FORWARD', 'COMPENSATION')),
    CONSTRAINT ck_task_executions_attempt CHECK (attempt_number >= 1 AND max_attempts >= 1),
    CONSTRAINT ck_task_executions_fence CHECK (fence_token >= 0),
    CONSTRAINT ck_task_executions_running_has_lease CHECK
        (state <> 'RUNNING' OR (lease_holder IS NOT NULL AND lease_expires_at IS NOT NULL))
);

-- "next ready task" is an index scan over ready rows only, oldest first
CREATE INDEX ix_task_executions_ready ON task_executions (ready_at)
    WHERE state = 'READY';
-- lapsed-lease reclaim scans running rows only, earliest expiry first
CREATE INDEX ix_task_executions_lease ON task_executions (lease_expires_at)
    WHERE state = 'RUNNING';
CREATE INDEX ix_task_executions_instance ON task_executions (workflow_instance_id, task_id);

CREATE TABLE execution_leases (
    lease_key            uuid        NOT NULL,
    workflow_instance_id uuid        NOT NULL,
    holder_id            uuid,
    expires_at           timestamptz,
    fence_token          bigint      NOT NULL DEFAULT 1,
    CONSTRAINT pk_execution_leases PRIMARY KEY (lease_key),
    CONSTRAINT fk_execution_leases_instance FOREIGN KEY (workflow_instance_id)
        REFERENCES workflow_instances (instance_id) ON DELETE CASCADE,
    CONSTRAINT ck_execution_leases_fence CHECK (fence_token >= 1)
);

CREATE INDEX ix_execution_leases_instance ON execution_leases (workflow_instance_id);

CREATE TABLE events (
    event_id             uuid        NOT NULL,
    workflow_instance_id uuid        NOT NULL,
    sequence_number      bigint      NOT NULL,
    event_type           text        NOT NULL,
    payload              jsonb       NOT NULL,
    idempotency_key      text        NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_events PRIMARY KEY (event_id),
    CONSTRAINT uk_events_sequence UNIQUE (workflow_instance_id, sequence_number),
    CONSTRAINT uk_events_idempotency_key UNIQUE (idempotency_key),
    CONSTRAINT fk_events_instance FOREIGN KEY (workflow_instance_id)
        REFERENCES workflow_instances (instance_id) ON DELETE CASCADE,
    CONSTRAINT ck_events_sequence CHECK (sequence_number >= 1)
);

-- name: event_insert_many
INSERT INTO {schema}.events
    (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key)
SELECT gen_random_uuid(), r.workflow_instance_id, r.sequence_number, r.event_type, r.payload, r.idempotency_key
FROM jsonb_to_recordset(%(rows)s::jsonb)
    AS r(workflow_instance_id uuid, sequence_number bigint, event_type text, payload jsonb, idempotency_key text)

-- name: event_list_for_instance
SELECT * FROM {schema}.events WHERE workflow_instance_id = %(instance_id)s ORDER BY sequence_number

-- name: event_notify_ready
SELECT pg_notify(%(channel)s, %(payload)s)

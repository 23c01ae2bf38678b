-- name: event_list_for_instance
SELECT * FROM {schema}.events WHERE workflow_instance_id = %(instance_id)s ORDER BY sequence_number

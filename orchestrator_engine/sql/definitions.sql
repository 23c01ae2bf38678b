-- name: definition_insert_if_absent
INSERT INTO {schema}.workflow_definitions (namespace, name, version, definition, content_hash)
VALUES (%(namespace)s, %(name)s, %(version)s, %(definition)s::jsonb, %(content_hash)s)
ON CONFLICT ON CONSTRAINT pk_workflow_definitions DO NOTHING
RETURNING namespace

-- name: definition_get
SELECT namespace, name, version, definition, content_hash
FROM {schema}.workflow_definitions
WHERE namespace = %(namespace)s AND name = %(name)s AND version = %(version)s

-- name: definition_get_latest
SELECT namespace, name, version, definition, content_hash
FROM {schema}.workflow_definitions
WHERE namespace = %(namespace)s AND name = %(name)s
ORDER BY version DESC
LIMIT 1

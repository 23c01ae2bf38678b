-- event_id(idempotency_key): the id of the event with that idempotency key, in one place.
--
-- Since the ids stopped being random, every statement that writes events wrote the same expression
-- out: a version-8 UUID made of the first 16 bytes of the SHA-256 of the key's UTF-8 bytes (its
-- version and variant digits set to 8). convert_to, not the text's bytes as sent, so a session's
-- client_encoding cannot change an id. Keys are unique by construction (check_invariants:
-- event-keys-unique), so ids are too.
-- A SQL function with a single expression and no settings of its own is inlined where it is called:
-- the statements' plans hold the expression itself, at no cost per call. STABLE (convert_to reads
-- the database's encoding), not STRICT: either would stop the inlining if it were stricter than the
-- body. The body is parsed now (a SQL-standard body), so the caller's search_path cannot change it.
-- Creating a function locks no table; an older engine never calls it.

CREATE FUNCTION event_id(idempotency_key text) RETURNS uuid
LANGUAGE sql
STABLE
PARALLEL SAFE
RETURN overlay(overlay(encode(substr(sha256(convert_to(idempotency_key, 'UTF8')), 1, 16), 'hex')
                       placing '8' from 13) placing '8' from 17)::uuid;

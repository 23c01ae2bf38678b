"""Specification of EngineConfig: parsing, the Java service's config shapes, validation, secrecy."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from orchestrator_engine.config import EngineConfig, build_dsn, create_pool, parse_duration, redact_dsn

SECRET = "s3cr3t p@ss'word"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("500ms", timedelta(milliseconds=500)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
        ("1.5s", timedelta(seconds=1.5)),
        ("45", timedelta(seconds=45)),
        (" 10S ", timedelta(seconds=10)),
        ("PT30S", timedelta(seconds=30)),
        ("PT1H2M3S", timedelta(hours=1, minutes=2, seconds=3)),
    ],
)
def test_parse_duration_accepts_spring_style_values(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "30 sec", "-5s", "5x", "P", "PT", "s", "1h30m"])
def test_parse_duration_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["ms", "s", "m", "h"]))
def test_parse_duration_round_trips_integer_amounts(amount: int, unit: str) -> None:
    factor = {"ms": timedelta(milliseconds=1), "s": timedelta(seconds=1), "m": timedelta(minutes=1)}
    assert parse_duration(f"{amount}{unit}") == amount * factor.get(unit, timedelta(hours=1))


def test_defaults_match_the_java_service() -> None:
    config = EngineConfig(dsn="postgresql://localhost/orchestrator")
    assert config.schema == "orchestrator"
    assert config.lease_duration == timedelta(seconds=30)
    assert config.renewal_interval == timedelta(seconds=10)
    assert config.poll_interval == timedelta(seconds=1)
    assert config.reclaim_interval == timedelta(seconds=1)
    assert config.max_payload_bytes == 1_048_576
    assert config.notify is True


def test_from_mapping_reads_the_java_yaml_shape() -> None:
    config = EngineConfig.from_mapping(
        {
            "orchestrator": {
                "lease": {
                    "default-duration": "45s",
                    "renewal-interval": "15000ms",
                    "reclaim-interval": "250ms",
                },
                "datasource": {
                    "url": "jdbc:postgresql://db.example:5433/orchestrator?sslmode=disable",
                    "username": "orchestrator",
                    "password": SECRET,
                },
                "schema": "orch_tenant",
            }
        }
    )
    assert config.lease_duration == timedelta(seconds=45)
    assert config.renewal_interval == timedelta(seconds=15)
    assert config.reclaim_interval == timedelta(milliseconds=250)
    assert config.schema == "orch_tenant"
    assert conninfo.conninfo_to_dict(config.dsn) == {
        "host": "db.example",
        "port": "5433",
        "dbname": "orchestrator",
        "sslmode": "disable",
        "user": "orchestrator",
        "password": SECRET,
    }


def test_from_mapping_accepts_numbers_and_optional_sections() -> None:
    config = EngineConfig.from_mapping(
        {"orchestrator": {"datasource": {"url": "postgresql:///x"}, "lease": {"default-duration": 60}}}
    )
    assert config.lease_duration == timedelta(seconds=60)
    assert config.dsn == "postgresql:///x"


def test_from_mapping_requires_a_datasource_url() -> None:
    with pytest.raises(ValueError, match=r"datasource\.url"):
        EngineConfig.from_mapping({"orchestrator": {"lease": {"default-duration": "30s"}}})


def test_from_env_reads_orchestrator_variables() -> None:
    environ = {
        "ORCHESTRATOR_DATASOURCE_URL": "jdbc:postgresql://localhost:5432/orchestrator",
        "ORCHESTRATOR_DATASOURCE_USERNAME": "orch",
        "ORCHESTRATOR_DATASOURCE_PASSWORD": SECRET,
        "ORCHESTRATOR_LEASE_DEFAULT_DURATION": "1m",
        "ORCHESTRATOR_LEASE_RENEWAL_INTERVAL": "20s",
        "ORCHESTRATOR_LEASE_RECLAIM_INTERVAL": "0",
        "ORCHESTRATOR_SCHEMA": "engine",
    }
    config = EngineConfig.from_env(environ)
    assert config.lease_duration == timedelta(minutes=1)
    assert config.renewal_interval == timedelta(seconds=20)
    assert config.reclaim_interval == timedelta(0)
    assert config.schema == "engine"
    params = conninfo.conninfo_to_dict(config.dsn)
    assert (params["user"], params["password"], params["dbname"]) == ("orch", SECRET, "orchestrator")


def test_from_env_without_url_names_the_variable() -> None:
    with pytest.raises(ValueError, match="ORCHESTRATOR_DATASOURCE_URL"):
        EngineConfig.from_env({})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dsn": "  "}, "dsn must not be empty"),
        ({"dsn": "host=x port"}, "not a valid libpq"),
        ({"lease_duration": timedelta(0)}, "lease_duration must be a positive"),
        ({"renewal_interval": timedelta(seconds=-1)}, "renewal_interval must be a positive"),
        ({"poll_interval": timedelta(0)}, "poll_interval must be a positive"),
        ({"reclaim_interval": timedelta(seconds=-1)}, "reclaim_interval must be a timedelta >= 0"),
        ({"renewal_interval": timedelta(seconds=30)}, "must be shorter than"),
        ({"schema": "Orchestrator"}, "schema"),
        ({"schema": "drop table x;--"}, "schema"),
        ({"schema": "a" * 64}, "schema"),
        ({"schema": ""}, "schema"),
        ({"max_payload_bytes": 0}, "max_payload_bytes"),
    ],
)
def test_invalid_settings_raise_value_error(overrides: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {"dsn": "postgresql://localhost/x", **overrides}
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    config = EngineConfig(dsn="postgresql://localhost/x")
    with pytest.raises(AttributeError):
        config.schema = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://orch:{SECRET.replace(' ', '%20').replace('@', '%40')}@localhost:5432/db",
        conninfo.make_conninfo("host=localhost dbname=db", password=SECRET),
        "postgresql://localhost/db?password=hunter2&sslmode=disable",
    ],
)
def test_password_never_appears_in_repr(dsn: str) -> None:
    config = EngineConfig(dsn=dsn)
    password = conninfo.conninfo_to_dict(dsn)["password"]
    assert password
    assert str(password) not in repr(config)
    assert str(password) not in str(config)
    assert str(password) not in config.redacted_dsn
    assert "***" in repr(config)


def test_redact_dsn_keeps_everything_but_the_password() -> None:
    assert redact_dsn("postgresql://u:pw@h:5432/db?sslmode=disable") == (
        "postgresql://u:***@h:5432/db?sslmode=disable"
    )
    assert redact_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
    assert conninfo.conninfo_to_dict(redact_dsn("host=h password=pw user=u")) == {
        "host": "h",
        "user": "u",
        "password": "***",
    }
    assert redact_dsn("host='unterminated password=pw") == "<invalid dsn>"


def test_build_dsn_quotes_credentials() -> None:
    dsn = build_dsn("postgresql://localhost/db", "us er", "pa'ss word")
    params = conninfo.conninfo_to_dict(dsn)
    assert (params["user"], params["password"]) == ("us er", "pa'ss word")
    assert build_dsn("jdbc:postgresql://localhost/db") == "postgresql://localhost/db"


def test_pool_hands_out_autocommit_connections_named_for_the_engine(
    pool: ConnectionPool[psycopg.Connection[Any]],
) -> None:
    with pool.connection() as conn:
        assert conn.autocommit
        row = conn.execute("SELECT current_setting('application_name')").fetchone()
    assert row == ("orchestrator-engine",)
    assert pool.max_size == 20


def _backend_query(dsn: str, pid: int) -> str:
    with psycopg.connect(dsn, autocommit=True) as other:
        row = other.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    assert row is not None
    return str(row[0])


def test_pool_checkout_of_a_quiet_connection_sends_nothing(engine_config: EngineConfig) -> None:
    with create_pool(engine_config, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            pid = conn.execute("SELECT pg_backend_pid() AS marker_query").fetchone()[0]  # type: ignore[index]
        with pool.connection() as conn:
            # a round-trip check would have run an empty query on that backend by now
            assert "marker_query" in _backend_query(engine_config.dsn, pid)
            assert conn.info.backend_pid == pid


def test_pool_replaces_a_connection_the_server_terminated_while_idle(engine_config: EngineConfig) -> None:
    with create_pool(engine_config, min_size=2, max_size=2) as pool:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
        with psycopg.connect(engine_config.dsn, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        for _ in range(4):  # every pooled connection checked out in turn: none is the dead one
            with pool.connection() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
                assert conn.info.backend_pid != pid


def test_create_pool_fails_fast_on_an_unreachable_server() -> None:
    config = EngineConfig(dsn="postgresql://orch:hunter2@127.0.0.1:1/db?connect_timeout=1")
    with pytest.raises(PoolTimeout):
        create_pool(config, open_timeout=1.0)


def test_rollback_conn_sees_the_migrated_schema_and_leaves_no_trace(
    rollback_conn: psycopg.Connection[Any],
) -> None:
    rollback_conn.execute(
        "INSERT INTO orchestrator.workflow_definitions (namespace, name, version, definition, content_hash)"
        " VALUES ('ns', 'wf', 1, '{}', 'h')"
    )
    assert rollback_conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

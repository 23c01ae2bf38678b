"""Engine configuration: one frozen EngineConfig, its parsers, and the connection pool it opens."""

from __future__ import annotations

import os
import re
import select
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool

SCHEMA_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MASK = "***"

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_SIMPLE_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h|d)?$")
# Spring Boot (the Java service's config) also accepts ISO-8601 durations such as PT30S.
_ISO_DURATION = re.compile(
    r"^P(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$", re.IGNORECASE
)


def parse_duration(text: str) -> timedelta:
    """Parse `30s`, `500ms`, `5m`, `1h`, `2d`, `PT30S` or a bare number of seconds into a timedelta."""
    value = text.strip()
    simple = _SIMPLE_DURATION.match(value.lower())
    if simple:
        amount, unit = simple.groups()
        return timedelta(seconds=float(amount) * _UNIT_SECONDS[unit or "s"])
    iso = _ISO_DURATION.match(value)
    if iso and value.upper() not in ("P", "PT"):
        parts = {k: float(v) if v else 0.0 for k, v in iso.groupdict().items()}
        return timedelta(days=parts["d"], hours=parts["h"], minutes=parts["m"], seconds=parts["s"])
    raise ValueError(f"invalid duration {text!r}: expected e.g. '30s', '500ms', '5m', '1h' or seconds")


def redact_dsn(dsn: str) -> str:
    """Return the DSN with its password replaced by `***`, keeping URL or key=value form."""
    if dsn.startswith(("postgresql://", "postgres://")):
        return _redact_url(dsn)
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # an unparsable DSN may still hold a password somewhere; show nothing of it
        return "<invalid dsn>"
    if "password" in params:
        params["password"] = _MASK
    return conninfo.make_conninfo("", **params)


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{_MASK}@{hosts}"
    query = "&".join(
        f"password={_MASK}" if pair.split("=", 1)[0] == "password" else pair
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True, repr=False)
class EngineConfig:
    """Settings shared by every engine component; build one and pass it to create_pool and migrate."""

    dsn: str
    schema: str = "orchestrator"
    lease_duration: timedelta = timedelta(seconds=30)
    renewal_interval: timedelta = timedelta(seconds=10)
    poll_interval: timedelta = timedelta(seconds=1)
    #: how often a polling coordinator looks for lapsed leases (capped at a tenth of lease_duration);
    #: zero looks on every poll
    reclaim_interval: timedelta = timedelta(seconds=1)
    max_payload_bytes: int = 1_048_576
    notify: bool = True
    #: idle workers wait in waiting_workers, and a start leases its lone ready task to one of them
    #: (needs notify); see docs/concepts/leases-and-fencing.md
    direct_dispatch: bool = True
    application_name: str = "orchestrator-engine"

    def __post_init__(self) -> None:
        if not self.dsn.strip():
            raise ValueError("dsn must not be empty")
        try:
            conninfo.conninfo_to_dict(self.dsn)
        except psycopg.ProgrammingError:
            # the driver's message may quote the DSN, password included
            raise ValueError(f"dsn is not a valid libpq connection string: {redact_dsn(self.dsn)}") from None
        if not SCHEMA_PATTERN.fullmatch(self.schema):
            raise ValueError(f"schema {self.schema!r} must match {SCHEMA_PATTERN.pattern}")
        for name in ("lease_duration", "renewal_interval", "poll_interval"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ValueError(f"{name} must be a positive timedelta, got {value!r}")
        if not isinstance(self.reclaim_interval, timedelta) or self.reclaim_interval < timedelta(0):
            raise ValueError(f"reclaim_interval must be a timedelta >= 0, got {self.reclaim_interval!r}")
        if self.renewal_interval >= self.lease_duration:
            # a lease renewed no sooner than it lapses is lost on every tick
            raise ValueError(
                f"renewal_interval ({self.renewal_interval}) must be shorter than "
                f"lease_duration ({self.lease_duration})"
            )
        if isinstance(self.max_payload_bytes, bool) or self.max_payload_bytes < 1:
            raise ValueError(f"max_payload_bytes must be >= 1, got {self.max_payload_bytes!r}")

    def __repr__(self) -> str:
        return (
            f"EngineConfig(dsn={self.redacted_dsn!r}, schema={self.schema!r}, "
            f"lease_duration={self.lease_duration!r}, renewal_interval={self.renewal_interval!r}, "
            f"poll_interval={self.poll_interval!r}, reclaim_interval={self.reclaim_interval!r}, "
            f"max_payload_bytes={self.max_payload_bytes!r}, "
            f"notify={self.notify!r}, direct_dispatch={self.direct_dispatch!r}, "
            f"application_name={self.application_name!r})"
        )

    @property
    def redacted_dsn(self) -> str:
        """Return the DSN with the password masked, for logs and error messages."""
        return redact_dsn(self.dsn)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> EngineConfig:
        """Build a config from the Java service's YAML shape (`orchestrator: {lease:, datasource:, ...}`)."""
        root = mapping.get("orchestrator", mapping)
        if not isinstance(root, Mapping):
            raise ValueError("'orchestrator' must be a mapping")
        datasource = _section(root, "datasource")
        lease = _section(root, "lease")
        url = datasource.get("url")
        if not url:
            raise ValueError("orchestrator.datasource.url is required")
        kwargs: dict[str, Any] = {
            "dsn": build_dsn(str(url), datasource.get("username"), datasource.get("password"))
        }
        durations = {
            "lease_duration": lease.get("default-duration"),
            "renewal_interval": lease.get("renewal-interval"),
            "reclaim_interval": lease.get("reclaim-interval"),
            "poll_interval": root.get("poll-interval"),
        }
        kwargs.update({k: _as_duration(v) for k, v in durations.items() if v is not None})
        if root.get("schema") is not None:
            kwargs["schema"] = str(root["schema"])
        if root.get("max-payload-bytes") is not None:
            kwargs["max_payload_bytes"] = int(root["max-payload-bytes"])
        if root.get("notify") is not None:
            kwargs["notify"] = _as_bool(root["notify"])
        if root.get("direct-dispatch") is not None:
            kwargs["direct_dispatch"] = _as_bool(root["direct-dispatch"])
        return cls(**kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> EngineConfig:
        """Build a config from ORCHESTRATOR_* variables (the Java service's Spring names, upper-cased)."""
        url = environ.get("ORCHESTRATOR_DATASOURCE_URL")
        if not url:
            raise ValueError("ORCHESTRATOR_DATASOURCE_URL is not set")
        datasource = {
            "url": url,
            "username": environ.get("ORCHESTRATOR_DATASOURCE_USERNAME"),
            "password": environ.get("ORCHESTRATOR_DATASOURCE_PASSWORD"),
        }
        lease = {
            "default-duration": environ.get("ORCHESTRATOR_LEASE_DEFAULT_DURATION"),
            "renewal-interval": environ.get("ORCHESTRATOR_LEASE_RENEWAL_INTERVAL"),
            "reclaim-interval": environ.get("ORCHESTRATOR_LEASE_RECLAIM_INTERVAL"),
        }
        root: dict[str, Any] = {
            "datasource": datasource,
            "lease": lease,
            "schema": environ.get("ORCHESTRATOR_SCHEMA"),
            "poll-interval": environ.get("ORCHESTRATOR_POLL_INTERVAL"),
            "max-payload-bytes": environ.get("ORCHESTRATOR_MAX_PAYLOAD_BYTES"),
            "notify": environ.get("ORCHESTRATOR_NOTIFY"),
            "direct-dispatch": environ.get("ORCHESTRATOR_DIRECT_DISPATCH"),
        }
        return cls.from_mapping({"orchestrator": root})


def build_dsn(url: str, username: str | None = None, password: str | None = None) -> str:
    """Turn a JDBC or libpq URL plus separate credentials into one libpq DSN."""
    base = url.removeprefix("jdbc:")
    extra = {k: v for k, v in (("user", username), ("password", password)) if v is not None}
    if not extra:
        return base
    try:
        # make_conninfo quotes values, so passwords with spaces or quotes survive
        return conninfo.make_conninfo(base, **extra)
    except psycopg.ProgrammingError:
        raise ValueError(
            f"datasource url is not a valid libpq connection string: {redact_dsn(base)}"
        ) from None


def _section(root: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = root.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"orchestrator.{key} must be a mapping")
    return value


def _as_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return parse_duration(str(value))


def _as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"invalid boolean {value!r}")


def _check_and_sweep(conn: psycopg.Connection[Any]) -> None:
    if _quiet(conn):
        return
    try:
        ConnectionPool.check_connection(conn)
    except Exception:
        pool = _POOLS.get(id(conn))
        if pool is not None:
            pool.check()  # drop every dead idle connection now, so the retry gets a live one
        raise


def _quiet(conn: psycopg.Connection[Any]) -> bool:
    """Return True when an idle connection's socket has nothing to read: alive, as far as a check can tell.

    A server that ends a session (shutdown, restart, pg_terminate_backend, a crash of the backend)
    sends an error message or at least closes the socket, which makes it readable; so does a
    notification. A quiet socket skips the round trip of the full check, which would find no more:
    a server that vanished without a word answers neither.
    """
    if conn.closed or conn.broken:
        return False
    try:
        fd = conn.pgconn.socket
        if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return not poller.poll(0)
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError, psycopg.OperationalError):
        return False
    return not readable


#: pools by the id of each connection they opened, so a failed check can sweep its own pool
_POOLS: weakref.WeakValueDictionary[int, ConnectionPool[Any]] = weakref.WeakValueDictionary()


def create_pool(
    config: EngineConfig, *, open_timeout: float = 30.0, **pool_kwargs: Any
) -> ConnectionPool[psycopg.Connection[Any]]:
    """Open a psycopg pool for the engine, waiting until min_size connections are ready.

    Connections are autocommit (coordinators open their own transactions) and are checked on
    checkout, so connections killed by a server restart are replaced instead of handed out. The check
    looks at the socket first and only asks the server (a round trip) when something arrived on it:
    a server that ends a session says so or closes the socket. When one check fails, every idle
    connection is checked at once: psycopg_pool would otherwise discover the
    dead ones one checkout at a time, sleeping 1, 2, 4, 8, 16 s in between.
    """
    connect_kwargs: dict[str, Any] = {"autocommit": True}
    if "application_name" not in conninfo.conninfo_to_dict(config.dsn):
        connect_kwargs["application_name"] = config.application_name
    connect_kwargs.update(pool_kwargs.pop("kwargs", None) or {})
    options: dict[str, Any] = {
        "min_size": 1,
        "max_size": 10,
        "check": _check_and_sweep,
        "name": "orchestrator-engine",
    }
    options.update(pool_kwargs)
    user_configure = options.pop("configure", None)

    def configure(conn: psycopg.Connection[Any]) -> None:
        _POOLS[id(conn)] = pool
        if user_configure is not None:
            user_configure(conn)

    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        config.dsn, kwargs=connect_kwargs, open=False, configure=configure, **options
    )
    try:
        pool.open(wait=True, timeout=open_timeout)
    except BaseException:
        pool.close()
        raise
    return pool


__all__ = ["EngineConfig", "build_dsn", "create_pool", "parse_duration", "redact_dsn"]

"""Insert workloads by name: table DDL, shape check, the parameterised insert, teardown.

Each workload has its own table so that runs of different workloads never collide:
``pgtrace_insert`` (insert-bigint), ``pgtrace_insert_cache50``, ``pgtrace_insert_uuidv4``,
``pgtrace_insert_uuidv7``, ``pgtrace_insert_ulid``. Every insert is one row with a
``payload text`` column (NULL when ``payload_bytes`` is 0).
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg

from pgtrace.driver.ids import ulid, uuid7
from pgtrace.errors import ServerError, UsageError

Params = tuple[Any, ...]


@dataclass(frozen=True)
class Column:
    """Expected shape of one column, as the catalog reports it."""

    name: str
    type: str
    identity: str = ""  # pg_attribute.attidentity: "a" always, "d" by default, "" none
    default: str | None = None
    primary_key: bool = False


@dataclass(frozen=True)
class Workload:
    """A named single-row insert workload."""

    name: str
    table: str
    columns: tuple[Column, ...]
    create_sql: str
    insert_columns: tuple[str, ...]
    id_factory: Callable[[], uuid.UUID] | None = None  # driver-generated key, if any
    sequence_cache: int | None = None  # identity sequence cache, if identity
    payload_bytes: int = 0
    description: str = ""
    _payload: str | None = field(default=None, repr=False, compare=False)
    batch_rows: int = 1  # rows per request: a multi-row INSERT, or a COPY
    copy: bool = False   # each request is COPY ... FROM STDIN of batch_rows rows

    @property
    def insert_sql(self) -> str:
        """The insert statement (extended protocol placeholders)."""
        cols = ", ".join(self.insert_columns)
        marks = ", ".join(["%s"] * len(self.insert_columns))
        return f"insert into {self.table} ({cols}) values ({marks})"

    def with_payload(self, payload_bytes: int) -> Workload:
        """This workload with a text payload of ``payload_bytes`` ASCII bytes (0: NULL)."""
        if payload_bytes < 0:
            raise UsageError(f"--payload-bytes must be >= 0, not {payload_bytes}")
        text = None
        if payload_bytes:
            rng = random.Random(payload_bytes)
            text = "".join(rng.choices(string.ascii_letters + string.digits, k=payload_bytes))
        return replace(self, payload_bytes=payload_bytes, _payload=text)

    def batched(self, rows: int, copy: bool = False) -> Workload:
        """This workload with `rows` rows per request, as one INSERT or one COPY."""
        if rows < 1:
            raise UsageError(f"--batch-rows must be >= 1, not {rows}")
        return replace(self, batch_rows=rows, copy=copy)

    @property
    def copy_sql(self) -> bytes:
        """The COPY statement of a copy workload (text format)."""
        return f"copy {self.table} ({', '.join(self.insert_columns)}) from stdin".encode()

    def copy_data(self) -> bytes:
        """batch_rows rows in COPY text format."""
        payload = "\\N" if self._payload is None else self._payload
        if self.id_factory is None:
            row = f"{payload}\n"
            return (row * self.batch_rows).encode()
        return "".join(f"{self.id_factory()}\t{payload}\n"
                       for _ in range(self.batch_rows)).encode()

    @property
    def prepared_sql(self) -> bytes:
        """The insert with $n placeholders (batch_rows value lists), for a prepared statement."""
        cols = ", ".join(self.insert_columns)
        n = len(self.insert_columns)
        rows = ", ".join(
            "(" + ", ".join(f"${r * n + i + 1}" for i in range(n)) + ")"
            for r in range(self.batch_rows)
        )
        return f"insert into {self.table} ({cols}) values {rows}".encode()

    @property
    def param_formats(self) -> list[int]:
        """Wire formats of wire_params(): the uuid key binary (1), the payload text (0)."""
        return ([1, 0] if self.id_factory is not None else [0]) * self.batch_rows

    def params(self) -> Params:
        """Parameters for one insert (Python values, for psycopg's execute)."""
        if self.id_factory is not None:
            return (self.id_factory(), self._payload)
        return (self._payload,)

    def wire_params(self) -> list[bytes | None]:
        """Parameters for one request, encoded for the wire (see param_formats)."""
        payload = None if self._payload is None else self._payload.encode()
        if self.id_factory is not None:
            out: list[bytes | None] = []
            for _ in range(self.batch_rows):
                out += [self.id_factory().bytes, payload]
            return out
        return [payload] * self.batch_rows

    def setup(self, conn: psycopg.Connection[Any]) -> None:
        """Create the table if absent; raise ServerError if it exists with another shape."""
        conn.execute(self.create_sql)
        problems = self.shape_differences(conn)
        if problems:
            raise ServerError(
                f"table {self.table} exists with another shape than workload {self.name} "
                f"needs: {'; '.join(problems)}",
                hint=f"drop it, or run with --drop once: drop table {self.table}",
            )

    def shape_differences(self, conn: psycopg.Connection[Any]) -> list[str]:
        """How the existing table differs from this workload's shape (empty: same)."""
        rows = conn.execute(
            """
            select a.attname, format_type(a.atttypid, a.atttypmod), a.attidentity::text,
                   pg_get_expr(d.adbin, d.adrelid),
                   exists (select 1 from pg_index i where i.indrelid = a.attrelid
                           and i.indisprimary and i.indnatts = 1 and i.indkey[0] = a.attnum)
            from pg_attribute a
            left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
            where a.attrelid = to_regclass(%s) and a.attnum > 0 and not a.attisdropped
            order by a.attnum
            """,
            (self.table,),
        ).fetchall()
        have = {r[0]: Column(r[0], r[1], r[2] or "", r[3], bool(r[4])) for r in rows}
        want = {c.name: c for c in self.columns}
        problems: list[str] = []
        for name in want.keys() - have.keys():
            problems.append(f"column {name} is missing")
        for name in have.keys() - want.keys():
            problems.append(f"unexpected column {name} {have[name].type}")
        for name in sorted(want.keys() & have.keys()):
            w, h = want[name], have[name]
            if w.type != h.type:
                problems.append(f"column {name} is {h.type}, not {w.type}")
            if w.identity != h.identity:
                problems.append(f"column {name} identity is {_ident(h.identity)}, "
                                f"not {_ident(w.identity)}")
            if w.default != h.default:
                problems.append(f"column {name} default is {h.default or 'none'}, "
                                f"not {w.default or 'none'}")
            if w.primary_key != h.primary_key:
                problems.append(f"column {name} is {'' if h.primary_key else 'not '}"
                                f"the primary key")
        if not problems and self.sequence_cache is not None:
            row = conn.execute(
                "select s.seqcache from pg_sequence s"
                " where s.seqrelid = pg_get_serial_sequence(%s, 'id')::regclass",
                (self.table,),
            ).fetchone()
            if row is not None and int(row[0]) != self.sequence_cache:
                problems.append(f"identity sequence cache is {row[0]}, not {self.sequence_cache}")
        return problems

    def teardown(self, conn: psycopg.Connection[Any]) -> None:
        """Drop the table."""
        conn.execute(f"drop table if exists {self.table}")


def _ident(code: str) -> str:
    return {"a": "generated always", "d": "generated by default"}.get(code, "none")


_PAYLOAD = Column("payload", "text")


def _bigint(name: str, table: str, cache: int) -> Workload:
    return Workload(
        name=name,
        table=table,
        columns=(Column("id", "bigint", identity="a", primary_key=True), _PAYLOAD),
        create_sql=f"create table if not exists {table} (id bigint generated always as "
        f"identity (cache {cache}) primary key, payload text)",
        insert_columns=("payload",),
        sequence_cache=cache,
        description=f"bigint identity key, sequence cache {cache}",
    )


def _uuid(name: str, table: str, default: str | None, factory: Callable[[], uuid.UUID] | None,
          what: str) -> Workload:
    clause = f" default {default}" if default else ""
    return Workload(
        name=name,
        table=table,
        columns=(Column("id", "uuid", default=default, primary_key=True), _PAYLOAD),
        create_sql=f"create table if not exists {table} "
        f"(id uuid primary key{clause}, payload text)",
        insert_columns=("payload",) if factory is None else ("id", "payload"),
        id_factory=factory,
        description=what,
    )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        _bigint("insert-bigint", "pgtrace_insert", 1),
        _bigint("insert-bigint-cache50", "pgtrace_insert_cache50", 50),
        _uuid("insert-uuidv4", "pgtrace_insert_uuidv4", "gen_random_uuid()", None,
              "uuid v4 key from the server's gen_random_uuid()"),
        _uuid("insert-uuidv7", "pgtrace_insert_uuidv7", None, uuid7,
              "uuid v7 key (RFC 9562) generated by the driver"),
        _uuid("insert-ulid", "pgtrace_insert_ulid", None, ulid,
              "ULID key generated by the driver, stored as uuid"),
    )
}


def get_workload(name: str, payload_bytes: int = 0, batch_rows: int = 1,
                 copy: bool = False) -> Workload:
    """The workload called ``name`` with the given payload size and rows per request."""
    try:
        base = WORKLOADS[name]
    except KeyError:
        raise UsageError(f"unknown workload {name!r}",
                         hint="one of " + ", ".join(WORKLOADS)) from None
    return base.with_payload(payload_bytes).batched(batch_rows, copy)

"""The search's results store: every evaluated candidate and the search state, in one SQLite file.

Why SQLite: a search runs for days and can be killed at any moment. Each write is one transaction, so after a
``kill -9`` the database holds exactly the committed candidates; :meth:`ResultStore.commit_step` writes a step's
results *and* the serialized search state (controller, optimiser, RNG states, counters) in the same transaction,
so on resume the state always matches the results. WAL journal mode lets readers (``nasfcos report``, a
dashboard) read while the search writes; there is one writer, the search loop.

Candidates are identified by ``Genotype.key()`` (equivalent genotypes share a key). :meth:`ResultStore.add` is
idempotent by key: a genotype that was already evaluated is not stored or counted twice (the first result
stands; the loop should look a key up with :meth:`ResultStore.get` before spending time on it).

Failed candidates (NaN loss, out of memory, a bug in an op) are stored with ``status="failed"``, the error
text and a penalty reward chosen by the loop, so the controller still learns to avoid them; ``"pruned"`` marks
candidates stopped early by the running-average rule. Rewards must be finite (SQLite turns NaN into NULL).
``created_at`` is Unix time in seconds (UTC).

A row is a :class:`CandidateRecord`: the evaluation record of :mod:`nasfcos.search.results`, stored as-is,
plus the candidate's identity. The table has one column per field (tuples and mappings as JSON text), derived
from the dataclass, so the schema cannot drift from the record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import time
import typing
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError
from nasfcos.search.results import STATUSES, EvaluationResult

__all__ = ["SCHEMA_VERSION", "STATE_KEY", "STATUSES", "CandidateRecord", "ResultStore"]

#: Version 2: one column per :class:`CandidateRecord` field (``early_stop_loss``, ``epochs_run``, ``seed`` and
#: ``history`` added; version 1 kept the early-stop loss in meta ``early_stop_loss/<key>``). Version 3: the
#: ``metrics`` column (a pluggable evaluator's own numbers, JSON). Older stores are upgraded when opened for
#: writing, and read through an upgraded in-memory copy when opened read-only.
SCHEMA_VERSION = 3
#: meta key under which :meth:`ResultStore.commit_step` keeps the serialized search state.
STATE_KEY = "search_state"


@dataclass(frozen=True, kw_only=True)
class CandidateRecord(EvaluationResult):
    """One stored candidate: its :class:`EvaluationResult` (with a finite reward: a failed candidate carries
    the loop's penalty) plus its identity. ``id`` and ``created_at`` are filled in by the store."""

    key: str
    genotype_json: str
    actions: tuple[int, ...]
    reward: float
    controller_step: int | None = None
    id: int | None = field(default=None, compare=False)
    created_at: float | None = field(default=None, compare=False)

    @classmethod
    def of(cls, key: str, genotype_json: str, actions: Sequence[int], result: EvaluationResult,
           **identity: Any) -> CandidateRecord:
        """The row of ``result`` (stored as-is) for the candidate ``key``."""
        return cls(key=key, genotype_json=genotype_json, actions=tuple(int(a) for a in actions),
                   **{**result.evaluation_fields(), **identity})

    @classmethod
    def failed(cls, key: str, genotype_json: str, actions: Sequence[int], error: str, penalty: float,
               **fields: Any) -> CandidateRecord:
        """A failed candidate: ``status="failed"``, the error text, and ``penalty`` as its reward."""
        return cls(key=key, genotype_json=genotype_json, actions=tuple(actions), reward=penalty,
                   status="failed", error=error, **fields)


# --------------------------------------------------------------------------------------------------------------
# The schema, derived from CandidateRecord's fields
# --------------------------------------------------------------------------------------------------------------

_SQL_TYPES = {str: "TEXT", float: "REAL", int: "INTEGER", tuple: "TEXT", dict: "TEXT"}  # tuples, dicts: JSON


def _column_types() -> dict[str, tuple[str, bool]]:
    """``name -> (SQL type, nullable)`` for every field but ``id`` (the store's own row id)."""
    hints = typing.get_type_hints(CandidateRecord)
    out = {}
    for f in dataclasses.fields(CandidateRecord):
        if f.name == "id":
            continue
        args = typing.get_args(hints[f.name])
        nullable = type(None) in args
        tp = next(a for a in args if a is not type(None)) if nullable else hints[f.name]
        out[f.name] = (_SQL_TYPES[typing.get_origin(tp) or tp], nullable)
    return out


_TYPES = _column_types()
_COLUMNS = tuple(_TYPES)
_JSON_COLUMNS = frozenset(f.name for f in dataclasses.fields(CandidateRecord)
                          if (typing.get_origin(typing.get_type_hints(CandidateRecord)[f.name]) in (tuple, dict)))
#: The empty value of each JSON column (what a migration writes into a column the old schema lacked).
_EMPTY_JSON = {name: "'{}'" if typing.get_origin(typing.get_type_hints(CandidateRecord)[name]) is dict else "'[]'"
               for name in _JSON_COLUMNS}
_CONSTRAINTS = {"key": "UNIQUE", "status": "CHECK (status IN ({}))".format(", ".join(f"'{s}'" for s in STATUSES))}

_SCHEMA = "\n".join([
    "CREATE TABLE IF NOT EXISTS candidates (",
    "    id INTEGER PRIMARY KEY AUTOINCREMENT,",
    ",\n".join(f"    {name} {sql}{'' if nullable else ' NOT NULL'} {_CONSTRAINTS.get(name, '')}".rstrip()
               for name, (sql, nullable) in _TYPES.items()),
    ");",
    "CREATE INDEX IF NOT EXISTS candidates_reward ON candidates (status, reward);",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);",
])

#: Version 1 column names that differ from version 2's.
_V1_NAMES = {"actions": "actions_json"}
_V1_EARLY_STOP_PREFIX = "early_stop_loss/"


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """Rebuild a version-``version`` ``candidates`` table with today's columns (inside the caller's
    transaction): existing columns are copied (version 1's renamed ones too), new columns are empty (JSON
    columns hold their empty value); from version 1 the early-stop losses move from meta into their rows."""
    old = {row[1] for row in conn.execute("PRAGMA table_info(candidates)")}
    renames = _V1_NAMES if version == 1 else {}
    conn.execute("ALTER TABLE candidates RENAME TO candidates_old")
    conn.execute("DROP INDEX IF EXISTS candidates_reward")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    sources = []
    for name in _COLUMNS:
        if name == "early_stop_loss" and version == 1:
            sources.append(f"(SELECT value FROM meta WHERE meta.key = '{_V1_EARLY_STOP_PREFIX}' || c.key)")
        elif renames.get(name, name) in old:
            sources.append(f"c.{renames.get(name, name)}")
        else:
            sources.append(_EMPTY_JSON.get(name, "NULL"))
    conn.execute(f"INSERT INTO candidates (id, {', '.join(_COLUMNS)}) SELECT c.id, {', '.join(sources)} "
                 "FROM candidates_old AS c ORDER BY c.id")
    conn.execute("DROP TABLE candidates_old")
    if version == 1:
        conn.execute("DELETE FROM meta WHERE key LIKE ?", (_V1_EARLY_STOP_PREFIX + "%",))


def _json_number(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _to_sql(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _JSON_COLUMNS:
        if isinstance(value, dict):
            return json.dumps(dict(value), default=_json_number, sort_keys=True)
        return json.dumps(list(value), default=_json_number)
    sql = _TYPES[name][0]
    return int(value) if sql == "INTEGER" else float(value) if sql == "REAL" else str(value)


def _row_to_record(row: sqlite3.Row) -> CandidateRecord:
    values = {name: row[name] for name in _COLUMNS}
    for name in _JSON_COLUMNS:
        data = json.loads(values[name])
        values[name] = data if isinstance(data, dict) else tuple(data)
    return CandidateRecord(id=row["id"], **values)


def _check_record(record: CandidateRecord) -> None:
    if record.status not in STATUSES:
        raise ValueError(f"candidate {record.key}: status {record.status!r} is not one of {STATUSES}")
    if not isinstance(record.reward, (int, float)) or not math.isfinite(record.reward):
        raise ValueError(
            f"candidate {record.key}: reward must be a finite number (got {record.reward!r}); "
            "record a failed candidate with a finite penalty instead"
        )


class ResultStore:
    """SQLite-backed record of a search. Open with ``ResultStore(path)``; ``readonly=True`` for readers."""

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise UserError(f"{self.path}: results store not found")
            uri = f"file:{self.path.resolve().as_posix()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        try:
            self._initialise()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise UserError(f"{self.path}: not a nasfcos results store ({exc})") from None
        except BaseException:
            self._conn.close()
            raise

    def _initialise(self) -> None:
        conn = self._conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{self.path}: results store schema version {version} is newer than this nasfcos "
                f"(supports {SCHEMA_VERSION})"
            )
        if self.readonly:
            if version == 0:
                raise UserError(f"{self.path}: not a nasfcos results store (no schema)")
            if version < SCHEMA_VERSION:  # read an upgraded copy; the file is left as it is
                memory = sqlite3.connect(":memory:", isolation_level=None)
                conn.backup(memory)
                conn.close()
                self._conn = conn = memory
                conn.row_factory = sqlite3.Row
                self._upgrade(conn, version)
            return
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        self._upgrade(conn, version)

    @staticmethod
    def _upgrade(conn: sqlite3.Connection, version: int) -> None:
        """Create the schema (``version`` 0) or migrate an older one, in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if 0 < version < SCHEMA_VERSION:
                _migrate(conn, version)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls the whole transaction back."""
        if self.readonly:
            raise PermissionError(f"{self.path}: results store opened read-only")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # ------------------------------------------------------------------ writes

    @staticmethod
    def _insert(conn: sqlite3.Connection, record: CandidateRecord, now: float) -> bool:
        _check_record(record)
        values = [_to_sql(name, getattr(record, name)) for name in _COLUMNS]
        if record.created_at is None:
            values[_COLUMNS.index("created_at")] = now
        cursor = conn.execute(
            f"INSERT OR IGNORE INTO candidates ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            values,
        )
        return cursor.rowcount == 1

    def add(self, record: CandidateRecord) -> bool:
        """Store one result in its own transaction; returns False (and changes nothing) if the key exists."""
        with self._transaction() as conn:
            return self._insert(conn, record, time.time())

    def commit_step(
        self,
        results: Iterable[CandidateRecord],
        state_blob: bytes | None = None,
        meta: dict[str, Any] | None = None,
    ) -> list[bool]:
        """Atomically add ``results``, store ``state_blob`` under :data:`STATE_KEY` and set ``meta`` entries.

        Either everything is written or nothing is (an invalid result rolls the whole step back). Returns,
        per result, whether it was new.
        """
        now = time.time()
        with self._transaction() as conn:
            inserted = [self._insert(conn, result, now) for result in results]
            if state_blob is not None:
                self._set_meta(conn, STATE_KEY, state_blob)
            for key, value in (meta or {}).items():
                self._set_meta(conn, key, value)
        return inserted

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: Any) -> None:
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if value is not None and not isinstance(value, (bytes, str, int, float)):
            raise TypeError(f"meta value for {key!r} must be bytes, str, int, float or None (got {type(value)})")
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def set_meta(self, key: str, value: bytes | str | int | float | None) -> None:
        """Set one meta entry in its own transaction."""
        with self._transaction() as conn:
            self._set_meta(conn, key, value)

    # ------------------------------------------------------------------ reads

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def meta_keys(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT key FROM meta ORDER BY key")]

    def state_blob(self) -> bytes | None:
        """The search state last written by :meth:`commit_step` (``None`` for a fresh store)."""
        return self.get_meta(STATE_KEY)

    def get(self, key: str) -> CandidateRecord | None:
        row = self._conn.execute("SELECT * FROM candidates WHERE key = ?", (key,)).fetchone()
        return None if row is None else _row_to_record(row)

    def __contains__(self, key: object) -> bool:
        return self._conn.execute("SELECT 1 FROM candidates WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return self.count()

    def count(self, status: str | None = None) -> int:
        """Number of distinct candidates stored, optionally only those with ``status``."""
        if status is None:
            return self._conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        return self._conn.execute("SELECT COUNT(*) FROM candidates WHERE status = ?", (status,)).fetchone()[0]

    def top_k(self, k: int, status: str | None = "ok") -> list[CandidateRecord]:
        """The ``k`` best candidates by reward (highest first; ties: earliest first); only ``ok`` by default."""
        where, args = ("WHERE status = ?", (status,)) if status is not None else ("", ())
        rows = self._conn.execute(
            f"SELECT * FROM candidates {where} ORDER BY reward DESC, id ASC LIMIT ?", (*args, int(k))
        ).fetchall()
        return [_row_to_record(row) for row in rows]

    def all(self, status: str | None = None) -> list[CandidateRecord]:
        """Every candidate in insertion order."""
        where, args = ("WHERE status = ?", (status,)) if status is not None else ("", ())
        rows = self._conn.execute(f"SELECT * FROM candidates {where} ORDER BY id ASC", args).fetchall()
        return [_row_to_record(row) for row in rows]

    def rewards_in_order(self, status: str | None = None) -> list[float]:
        """Rewards in insertion order (the search's learning curve); failures included unless filtered."""
        where, args = ("WHERE status = ?", (status,)) if status is not None else ("", ())
        return [row[0] for row in self._conn.execute(f"SELECT reward FROM candidates {where} ORDER BY id", args)]

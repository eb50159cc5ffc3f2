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
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "pruned")
#: meta key under which :meth:`ResultStore.commit_step` keeps the serialized search state.
STATE_KEY = "search_state"

_COLUMNS = (
    "key", "genotype_json", "actions_json", "reward", "loss_cls", "loss_reg", "loss_ctr", "ap", "gmacs",
    "params", "wall_time_s", "status", "error", "controller_step", "created_at",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    genotype_json TEXT NOT NULL,
    actions_json TEXT NOT NULL,
    reward REAL NOT NULL,
    loss_cls REAL,
    loss_reg REAL,
    loss_ctr REAL,
    ap REAL,
    gmacs REAL,
    params INTEGER,
    wall_time_s REAL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'pruned')),
    error TEXT,
    controller_step INTEGER,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS candidates_reward ON candidates (status, reward);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value
);
"""


@dataclass(frozen=True)
class CandidateResult:
    """One evaluated candidate. ``id`` and ``created_at`` are filled in by the store."""

    key: str
    genotype_json: str
    actions: tuple[int, ...]
    reward: float
    loss_cls: float | None = None
    loss_reg: float | None = None
    loss_ctr: float | None = None
    ap: float | None = None
    gmacs: float | None = None
    params: int | None = None
    wall_time_s: float | None = None
    status: str = "ok"
    error: str | None = None
    controller_step: int | None = None
    id: int | None = field(default=None, compare=False)
    created_at: float | None = field(default=None, compare=False)

    @classmethod
    def failed(
        cls,
        key: str,
        genotype_json: str,
        actions: Sequence[int],
        error: str,
        penalty: float,
        **fields: Any,
    ) -> CandidateResult:
        """A failed candidate: ``status="failed"``, the error text, and ``penalty`` as its reward."""
        return cls(key=key, genotype_json=genotype_json, actions=tuple(actions), reward=penalty,
                   status="failed", error=error, **fields)

    @property
    def loss_sum(self) -> float | None:
        parts = (self.loss_cls, self.loss_reg, self.loss_ctr)
        return None if any(p is None for p in parts) else sum(parts)  # type: ignore[arg-type]


def _row_to_result(row: sqlite3.Row) -> CandidateResult:
    return CandidateResult(
        key=row["key"],
        genotype_json=row["genotype_json"],
        actions=tuple(json.loads(row["actions_json"])),
        reward=row["reward"],
        loss_cls=row["loss_cls"],
        loss_reg=row["loss_reg"],
        loss_ctr=row["loss_ctr"],
        ap=row["ap"],
        gmacs=row["gmacs"],
        params=row["params"],
        wall_time_s=row["wall_time_s"],
        status=row["status"],
        error=row["error"],
        controller_step=row["controller_step"],
        id=row["id"],
        created_at=row["created_at"],
    )


def _check_result(result: CandidateResult) -> None:
    if result.status not in STATUSES:
        raise ValueError(f"candidate {result.key}: status {result.status!r} is not one of {STATUSES}")
    if not isinstance(result.reward, (int, float)) or not math.isfinite(result.reward):
        raise ValueError(
            f"candidate {result.key}: reward must be a finite number (got {result.reward!r}); "
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
            return
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
    def _insert(conn: sqlite3.Connection, result: CandidateResult, now: float) -> bool:
        _check_result(result)
        values = (
            result.key, result.genotype_json, json.dumps([int(a) for a in result.actions]), float(result.reward),
            result.loss_cls, result.loss_reg, result.loss_ctr, result.ap, result.gmacs,
            None if result.params is None else int(result.params), result.wall_time_s, result.status,
            result.error, result.controller_step, now if result.created_at is None else result.created_at,
        )
        cursor = conn.execute(
            f"INSERT OR IGNORE INTO candidates ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            values,
        )
        return cursor.rowcount == 1

    def add(self, result: CandidateResult) -> bool:
        """Store one result in its own transaction; returns False (and changes nothing) if the key exists."""
        with self._transaction() as conn:
            return self._insert(conn, result, time.time())

    def commit_step(
        self,
        results: Iterable[CandidateResult],
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

    def get(self, key: str) -> CandidateResult | None:
        row = self._conn.execute("SELECT * FROM candidates WHERE key = ?", (key,)).fetchone()
        return None if row is None else _row_to_result(row)

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

    def top_k(self, k: int, status: str | None = "ok") -> list[CandidateResult]:
        """The ``k`` best candidates by reward (highest first; ties: earliest first); only ``ok`` by default."""
        where, args = ("WHERE status = ?", (status,)) if status is not None else ("", ())
        rows = self._conn.execute(
            f"SELECT * FROM candidates {where} ORDER BY reward DESC, id ASC LIMIT ?", (*args, int(k))
        ).fetchall()
        return [_row_to_result(row) for row in rows]

    def all(self, status: str | None = None) -> list[CandidateResult]:
        """Every candidate in insertion order."""
        where, args = ("WHERE status = ?", (status,)) if status is not None else ("", ())
        rows = self._conn.execute(f"SELECT * FROM candidates {where} ORDER BY id ASC", args).fetchall()
        return [_row_to_result(row) for row in rows]

    def rewards_in_order(self, status: str | None = None) -> list[float]:
        """Rewards in insertion order (the search's learning curve); failures included unless filtered."""
        where, args = ("WHERE status = ?", (status,)) if status is not None else ("", ())
        return [row[0] for row in self._conn.execute(f"SELECT reward FROM candidates {where} ORDER BY id", args)]

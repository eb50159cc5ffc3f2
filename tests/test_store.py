"""Results store: idempotent by key, durable across reopen and kill -9, ordering, failures, meta."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nasfcos.errors import UserError
from nasfcos.search.store import SCHEMA_VERSION, STATE_KEY, CandidateRecord, ResultStore


def _result(i: int, reward: float, **fields) -> CandidateRecord:
    return CandidateRecord(key=f"k{i}", genotype_json=f'{{"g": {i}}}', actions=(i, i + 1, 0), reward=reward, **fields)


def test_add_is_idempotent_by_key(tmp_path: Path):
    with ResultStore(tmp_path / "s.db") as store:
        assert store.add(_result(1, -3.0)) is True
        assert store.add(_result(2, -2.0)) is True
        assert store.count() == 2
        # Same key again (even with another reward): not stored, not counted; the first result stands.
        assert store.add(_result(1, -1.0)) is False
        assert store.count() == 2 and len(store) == 2
        assert store.get("k1").reward == -3.0
        assert store.rewards_in_order() == [-3.0, -2.0]
        assert store.commit_step([_result(2, 5.0), _result(3, -4.0)]) == [False, True]
        assert store.count() == 3


def test_roundtrip_of_every_field_and_reopen(tmp_path: Path):
    path = tmp_path / "runs" / "search.db"
    full = _result(7, -2.5, loss_cls=1.0, loss_reg=1.25, loss_ctr=0.25, ap=0.125, gmacs=12.5, params=123456,
                   wall_time_s=33.0, controller_step=4)
    with ResultStore(path) as store:
        store.add(full)
        store.set_meta("counter", 17)
        store.set_meta("note", "hello")
    with ResultStore(path) as store:
        got = store.get("k7")
        assert got == full  # id and created_at are not part of equality
        assert got.id == 1 and abs(got.created_at - time.time()) < 3600
        assert got.actions == (7, 8, 0) and got.loss_sum == 2.5
        assert store.get("missing") is None and "k7" in store and "missing" not in store
        assert store.get_meta("counter") == 17 and store.get_meta("note") == "hello"
        assert store.get_meta("absent", default="d") == "d"
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_top_k_all_and_status_filters(tmp_path: Path):
    with ResultStore(tmp_path / "s.db") as store:
        rewards = [-3.0, -1.0, -2.0, -1.0, -0.5]
        for i, r in enumerate(rewards):
            store.add(_result(i, r))
        store.add(CandidateRecord.failed("bad", "{}", (0, 0, 0), error="RuntimeError: CUDA out of memory",
                                         penalty=-100.0))
        store.add(_result(9, 10.0, status="pruned"))
        top = store.top_k(3)
        # Highest reward first; the tie (-1.0 at k1 and k3) goes to the earlier candidate.
        assert [c.key for c in top] == ["k4", "k1", "k3"]
        assert [c.key for c in store.top_k(1, status=None)] == ["k9"]
        assert [c.key for c in store.all()] == ["k0", "k1", "k2", "k3", "k4", "bad", "k9"]
        assert store.rewards_in_order() == rewards + [-100.0, 10.0]
        assert store.rewards_in_order(status="ok") == rewards
        assert store.count(status="ok") == 5 and store.count("failed") == 1 and store.count("pruned") == 1
        assert len(store.top_k(100)) == 5


def test_failed_candidates_keep_error_and_penalty(tmp_path: Path):
    path = tmp_path / "s.db"
    with ResultStore(path) as store:
        store.add(CandidateRecord.failed("kf", '{"g": 1}', [1, 2], error="loss is NaN at epoch 3", penalty=-50.0,
                                         wall_time_s=1.5))
    with ResultStore(path) as store:
        failed = store.get("kf")
        assert failed.status == "failed" and failed.error == "loss is NaN at epoch 3"
        assert failed.reward == -50.0 and failed.wall_time_s == 1.5 and failed.actions == (1, 2)
        assert store.all(status="failed") == [failed]


def test_invalid_results_roll_back_the_whole_step(tmp_path: Path):
    with ResultStore(tmp_path / "s.db") as store:
        with pytest.raises(ValueError, match="finite"):
            store.commit_step([_result(1, -1.0), _result(2, float("nan"))], state_blob=b"state")
        with pytest.raises(ValueError, match="status"):
            store.add(_result(3, -1.0, status="weird"))
        assert store.count() == 0 and store.state_blob() is None
        store.commit_step([_result(1, -1.0)], state_blob=b"\x00state", meta={"step": 1})
        assert store.count() == 1 and store.state_blob() == b"\x00state" and store.get_meta("step") == 1
        assert store.get_meta(STATE_KEY) == b"\x00state"


def test_not_a_store_is_a_user_error(tmp_path: Path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="junk.db"):
        ResultStore(junk)
    with pytest.raises(UserError, match="not found"):
        ResultStore(tmp_path / "missing.db", readonly=True)


def test_readonly_reader_sees_writer_commits(tmp_path: Path):
    path = tmp_path / "s.db"
    writer = ResultStore(path)
    writer.add(_result(1, -1.0))
    reader = ResultStore(path, readonly=True)
    assert reader.count() == 1
    writer.add(_result(2, -2.0))
    assert reader.count() == 2
    with pytest.raises(PermissionError):
        reader.add(_result(3, -3.0))
    reader.close()
    writer.close()


WRITER = textwrap.dedent(
    """
    import sys
    from nasfcos.search.store import CandidateRecord, ResultStore
    store = ResultStore(sys.argv[1])
    i = 0
    while True:
        results = [CandidateRecord(key=f"k{i}-{j}", genotype_json="{}", actions=(i, j), reward=-float(i))
                   for j in range(3)]
        store.commit_step(results, state_blob=str(i).encode() * 1000, meta={"committed": store.count() + 3})
        i += 1
        if i == 5:
            print("ready", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_kill_9_leaves_a_consistent_store(tmp_path: Path):
    path = tmp_path / "s.db"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with ResultStore(path) as store:
        count = store.count()
        assert count >= 15 and count % 3 == 0
        # Results and state were committed together: the state is the one of the last committed step.
        assert store.get_meta("committed") == count
        last_step = count // 3 - 1
        assert store.state_blob() == str(last_step).encode() * 1000
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


#: The version-1 schema, as nasfcos wrote it before the early-stop loss became a column.
V1_SCHEMA = """
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, genotype_json TEXT NOT NULL,
    actions_json TEXT NOT NULL, reward REAL NOT NULL, loss_cls REAL, loss_reg REAL, loss_ctr REAL, ap REAL,
    gmacs REAL, params INTEGER, wall_time_s REAL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'pruned')), error TEXT, controller_step INTEGER,
    created_at REAL NOT NULL
);
CREATE INDEX candidates_reward ON candidates (status, reward);
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
INSERT INTO candidates VALUES (1, 'ka', '{"a": 1}', '[1, 2]', -2.5, 1.0, 1.0, 0.5, NULL, 0.25, 77, 3.0, 'ok', NULL,
                               0, 1000.0);
INSERT INTO candidates VALUES (2, 'kb', '{"b": 2}', '[0]', -9.0, NULL, NULL, NULL, NULL, NULL, NULL, 1.0, 'failed',
                               'boom', 0, 1001.0);
INSERT INTO meta VALUES ('early_stop_loss/ka', 4.75);
INSERT INTO meta VALUES ('search_state', X'00ff');
PRAGMA user_version = 1;
"""


def _v1_store(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.close()
    return path


def test_version_1_stores_are_upgraded(tmp_path: Path):
    expected_a = CandidateRecord(key="ka", genotype_json='{"a": 1}', actions=(1, 2), reward=-2.5, loss_cls=1.0,
                                 loss_reg=1.0, loss_ctr=0.5, gmacs=0.25, params=77, wall_time_s=3.0,
                                 early_stop_loss=4.75, controller_step=0)
    # Read-only: an upgraded view, the file itself untouched.
    path = _v1_store(tmp_path / "old.db")
    with ResultStore(path, readonly=True) as store:
        assert store.all() == [expected_a, CandidateRecord.failed("kb", '{"b": 2}', (0,), error="boom", penalty=-9.0,
                                                                   wall_time_s=1.0, controller_step=0)]
        assert store.get("ka").created_at == 1000.0 and store.get("kb").early_stop_loss is None
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
    # Writable: migrated in place; the early-stop loss moved from meta into its row.
    with ResultStore(path) as store:
        assert store.get("ka") == expected_a and store.get("ka").id == 1
        assert store.meta_keys() == [STATE_KEY] and store.state_blob() == b"\x00\xff"
        assert store.add(_result(3, -1.0, early_stop_loss=2.0)) and store.get("k3").early_stop_loss == 2.0
        assert [r.key for r in store.top_k(3)] == ["k3", "ka"]
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


#: The version-2 schema (before the ``metrics`` column), as nasfcos wrote it.
V2_SCHEMA = """
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY AUTOINCREMENT, status TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'pruned')),
    reward REAL NOT NULL, loss_cls REAL, loss_reg REAL, loss_ctr REAL, ap REAL, gmacs REAL, params INTEGER,
    wall_time_s REAL, epochs_run INTEGER, early_stop_loss REAL, error TEXT, seed INTEGER, history TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE, genotype_json TEXT NOT NULL, actions TEXT NOT NULL, controller_step INTEGER,
    created_at REAL
);
CREATE INDEX candidates_reward ON candidates (status, reward);
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
INSERT INTO candidates VALUES (1, 'ok', -2.5, 1.0, 1.0, 0.5, NULL, 0.25, 77, 3.0, 2, 4.75, NULL, 11,
                               '[{"epoch": 1}]', 'ka', '{"a": 1}', '[1, 2]', 0, 1000.0);
INSERT INTO meta VALUES ('search_state', X'00ff');
PRAGMA user_version = 2;
"""


def test_version_2_stores_get_the_metrics_column(tmp_path: Path):
    expected = CandidateRecord(key="ka", genotype_json='{"a": 1}', actions=(1, 2), reward=-2.5, loss_cls=1.0,
                               loss_reg=1.0, loss_ctr=0.5, gmacs=0.25, params=77, wall_time_s=3.0, epochs_run=2,
                               early_stop_loss=4.75, seed=11, history=({"epoch": 1},), controller_step=0)
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    conn.executescript(V2_SCHEMA)
    conn.close()
    with ResultStore(path, readonly=True) as store:  # an upgraded view; the file stays version 2
        assert store.all() == [expected] and store.get("ka").metrics == {}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
    with ResultStore(path) as store:
        row = store.get("ka")
        assert row == expected and row.id == 1 and row.history == ({"epoch": 1},) and row.created_at == 1000.0
        assert store.state_blob() == b"\x00\xff"
        assert store.add(_result(2, -1.0, metrics={"latency_ms": 3.5, "diverged": float("nan")}))
    with ResultStore(path, readonly=True) as store:
        assert store.get("k2").metrics == {"latency_ms": 3.5, "diverged": None}  # non-finite kept as None
        assert store.get("k2").to_dict()["metrics"] == {"latency_ms": 3.5, "diverged": None}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3


def test_a_newer_store_is_refused_naming_the_file(tmp_path: Path):
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    for readonly in (False, True):
        with pytest.raises(UserError, match=r"future\.db: results store schema version 99 is newer"):
            ResultStore(path, readonly=readonly)


def test_every_evaluation_field_is_a_column(tmp_path: Path):
    """A field added to the evaluation record is stored without touching the store."""
    import dataclasses

    from nasfcos.search.results import EvaluationResult

    with ResultStore(tmp_path / "s.db") as store:
        columns = {row[1] for row in store._conn.execute("PRAGMA table_info(candidates)")}
    assert {f.name for f in dataclasses.fields(EvaluationResult)} <= columns
    record = _result(1, -1.0, epochs_run=3, seed=11, early_stop_loss=1.5,
                     history=({"epoch": 1, "train_loss": 2.0, "val_loss": None},))
    with ResultStore(tmp_path / "t.db") as store:
        store.add(record)
        got = store.get("k1")
    assert got == record and got.history == record.history and got.evaluation == record.evaluation

"""The proxy-fidelity study (``nasfcos fidelity``): settings, planning, the study end to end with scorers whose
answers are known (tau = 1 / -1, a known seed spread), resume after an interruption and after a SIGKILL, and the
real command with the real trainer and proxy on a tiny synthetic set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fidelity_fakes import SEED_STEP, FakeScorers, reference_ap
from nasfcos.analysis.fidelity import (
    backbone_identity,
    plan_units,
    read_records,
    run_fidelity,
    study_decoders,
)
from nasfcos.analysis.fidelity_config import load_fidelity_config
from nasfcos.analysis.fidelity_report import render_report
from nasfcos.cli import main
from nasfcos.errors import UserError

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

TOY = """\
threads: 1
data: {num_train: 16, num_val: 8, image_size: 64}
backbone: {iters: 2, batch_size: 4, width: 16}
decoders: {random: 5, seed: 3, presets: [fpn-fcos, nas-fcos]}
reference: {width: 16, iters: 3, batch_size: 4, checkpoint_period: 2}
seed_spread: {decoders: [fpn-fcos, random-02], seeds: [0, 1, 2]}
proxy_defaults: {batch_size: 8, device: cpu, threads: 1}
proxies:
  - {name: exact, proxy: {width: 8, epochs: 1}}
  - {name: reversed, proxy: {width: 8, epochs: 2}}
  - {name: other, cache: {crop: 64, images: 8}, proxy: {width: 8, epochs: 1}}
bootstrap: 200
"""


def _config(tmp_path: Path, text: str = TOY, overrides: list[str] | None = None):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return load_fidelity_config(path, overrides or [])


# ---------------------------------------------------------------------------------------------------- settings


def test_config_layers_and_proxy_defaults(tmp_path: Path) -> None:
    cfg = _config(tmp_path, overrides=["reference.iters=7"])
    assert cfg.reference.iters == 7
    exact, reversed_, other = cfg.proxies
    assert (exact.proxy.width, exact.proxy.batch_size, exact.proxy.device) == (8, 8, "cpu")  # defaults folded in
    assert reversed_.proxy.epochs == 2 and other.cache.images == 8
    assert cfg.decoder_names() == ("fpn-fcos", "nas-fcos", *(f"random-0{i}" for i in range(1, 6)))
    shipped = load_fidelity_config(HERE.parent / "configs" / "fidelity-cpu.yaml")
    assert len(shipped.decoder_names()) >= 12 and len(shipped.proxies) >= 3
    assert len(shipped.seed_spread.decoders) >= 2 and len(shipped.seed_spread.seeds) >= 3


@pytest.mark.parametrize("text, message", [
    (TOY + "referense: {iters: 3}\n", "unknown key 'referense'"),
    (TOY.replace("iters: 3,", "iters: three,"), "reference.iters"),
    (TOY.replace("{name: other,", "{name: exact,"), "distinct setting names"),
    (TOY.replace("random-02]", "random-09]"), "seed_spread.decoders"),
    (TOY.replace("width: 8, epochs: 1}}\n  - {name: reversed", "widht: 8}}\n  - {name: reversed"), "widht"),
])
def test_bad_settings_are_one_line_user_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        _config(tmp_path, text)
    assert "\n" not in str(info.value)


def test_cli_bad_key_exits_2_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(TOY + "bootstrapp: 3\n")
    out = tmp_path / "run"
    assert main(["fidelity", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bootstrapp'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_decoders_and_units_are_planned_deterministically(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    decoders = study_decoders(cfg)
    assert [d.name for d in decoders] == list(cfg.decoder_names())
    assert len({d.key for d in decoders}) == len(decoders)  # no duplicates
    assert [d.key for d in study_decoders(cfg)] == [d.key for d in decoders]
    # Growing the random sample keeps the first ones.
    bigger = study_decoders(_config(tmp_path, overrides=["decoders.random=7"]))
    assert [d.key for d in bigger[: len(decoders)]] == [d.key for d in decoders]
    units = plan_units(cfg, decoders, backbone_identity(cfg))
    ids = [u.id for u in units]
    assert len(ids) == len(set(ids))
    # 2 x 3 seed-spread trainings, 3 settings x 7 decoders, then the 5 decoders not yet trained with seed 0.
    assert [u.stage for u in units] == ["seed-spread"] * 6 + ["proxy"] * 21 + ["reference"] * 5
    assert "reference/fpn-fcos/seed-0" in ids and "reference/random-02/seed-2" in ids
    # A changed proxy setting changes only its own units' fingerprints.
    changed = plan_units(_config(tmp_path, TOY.replace("width: 8, epochs: 2", "width: 8, epochs: 3")), decoders,
                         backbone_identity(cfg))
    differs = {u.id for u, v in zip(units, changed) if u.fingerprint != v.fingerprint}
    assert differs == {u.id for u in units if u.id.startswith("proxy/reversed/")}


# ---------------------------------------------------------------------------------------------------- the study


def test_study_end_to_end_with_known_answers(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    scorers = FakeScorers()
    lines: list[str] = []
    summary = run_fidelity(tmp_path / "run", cfg, scorers=scorers, say=lines.append)
    units = plan_units(cfg, study_decoders(cfg), backbone_identity(cfg))
    assert scorers.calls == [u.id for u in units]  # every unit once, in plan order
    assert summary.remaining == 0 and len(summary.ran) == len(units)
    assert any(line.startswith("[proxy 21/21]") and "ETA" in line for line in lines)

    data = json.loads((tmp_path / "run" / "fidelity.json").read_text())
    rows = {(r["setting"], r["reward"]): r for r in data["proxies"]}
    assert set(rows) == {("exact", "loss"), ("exact", "ap"), ("reversed", "loss"), ("other", "loss")}
    for key in (("exact", "loss"), ("exact", "ap")):
        assert rows[key]["tau"]["value"] == pytest.approx(1.0) and rows[key]["rho"]["value"] == pytest.approx(1.0)
        assert rows[key]["top_k_overlap"] == 3 and rows[key]["n"] == 7
        assert rows[key]["tau"]["low"] == pytest.approx(1.0)  # every resample of a perfect ranking is perfect
    assert rows[("reversed", "loss")]["tau"]["value"] == pytest.approx(-1.0)
    assert rows[("reversed", "loss")]["top_k_overlap"] == 0
    assert rows[("exact", "loss")]["seconds_per_candidate"] == pytest.approx(0.5)
    assert data["recommended"]["setting"] == "exact"
    # The reference and its seed spread: AP = base + 0.001 * seed, so each spread decoder has std 0.001.
    assert data["reference"]["random-03"] == pytest.approx(reference_ap("random-03", 0))
    spread = data["seed_spread"]
    for name in ("fpn-fcos", "random-02"):
        assert spread["per_decoder"][name]["std"] == pytest.approx(SEED_STEP)
        assert spread["per_decoder"][name]["mean"] == pytest.approx(reference_ap(name, 1))
    assert spread["pooled_std"] == pytest.approx(SEED_STEP)
    assert spread["ratio"] > 50 and spread["separates"] is True  # APs 0.05-0.35 apart, seeds 0.001 apart
    report = (tmp_path / "run" / "report.md").read_text()
    assert "does not separate decoders" not in report
    # The same tables from a reference whose decoders differ by no more than its seed noise carry the caveat.
    noisy = {**data, "seed_spread": {**spread, "ratio": 1.2, "separates": False}}
    assert "does not separate decoders clearly (across-decoder std / seed std 1.2 < 2)" in render_report(noisy, None)
    assert "| exact | loss (search) |" in report and "Pooled seed-to-seed std: 0.10 AP points" in report
    assert "fewer than the 12" in report
    assert (tmp_path / "run" / "figures" / "fidelity_scatter.png").stat().st_size > 1000

    # A rerun does nothing but rewrite the report; `nasfcos report` on the folder writes the same report.
    again = FakeScorers()
    assert run_fidelity(tmp_path / "run", cfg, scorers=again, say=lambda _: None).ran == [] and again.calls == []
    (tmp_path / "run" / "report.md").unlink()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.md").read_text() == report


def test_interrupted_study_runs_exactly_the_remaining_units(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    run_dir = tmp_path / "run"
    first = FakeScorers(interrupt_at=10)  # Ctrl-C while the 10th unit runs
    with pytest.raises(KeyboardInterrupt):
        run_fidelity(run_dir, cfg, scorers=first, say=lambda _: None)
    assert len(first.calls) == 9 and set(read_records(run_dir)) == set(first.calls)
    second = FakeScorers()
    summary = run_fidelity(run_dir, cfg, scorers=second, say=lambda _: None)
    all_ids = [u.id for u in plan_units(cfg, study_decoders(cfg), backbone_identity(cfg))]
    assert second.calls == [i for i in all_ids if i not in first.calls]
    assert summary.reused == 9 and summary.remaining == 0
    # The interrupted-and-resumed study reports what an uninterrupted one does.
    fresh = tmp_path / "fresh"
    run_fidelity(fresh, cfg, scorers=FakeScorers(), say=lambda _: None)
    resumed = json.loads((run_dir / "fidelity.json").read_text())
    straight = json.loads((fresh / "fidelity.json").read_text())
    assert resumed["proxies"] == straight["proxies"] and resumed["seed_spread"] == straight["seed_spread"]


def test_more_reference_seeds_add_only_their_units_and_average(tmp_path: Path) -> None:
    """Going from one reference seed to three keeps every finished unit and trains only the new seeds; the
    reference is then the mean over the seeds and its noise the pooled seed std / sqrt(3)."""
    import math

    run_dir = tmp_path / "run"
    one = _config(tmp_path)
    run_fidelity(run_dir, one, scorers=FakeScorers(), say=lambda _: None)
    three = _config(tmp_path, overrides=["reference.seeds=[0,1,2]"])
    more = FakeScorers()
    run_fidelity(run_dir, three, scorers=more, say=lambda _: None)
    names = three.decoder_names()
    spread_decoders = {"fpn-fcos", "random-02"}  # trained with seeds 0-2 already by the seed-spread stage
    assert sorted(more.calls) == sorted(f"reference/{n}/seed-{s}" for s in (1, 2) for n in names
                                        if n not in spread_decoders)
    data = json.loads((run_dir / "fidelity.json").read_text())
    for name in names:  # AP = base + SEED_STEP * seed: the mean over seeds 0-2 is the seed-1 value
        assert data["reference"][name] == pytest.approx(reference_ap(name, 1))
    spread = data["seed_spread"]
    assert set(spread["per_decoder"]) == set(names) and spread["pooled_std"] == pytest.approx(SEED_STEP)
    assert spread["reference_std"] == pytest.approx(SEED_STEP / math.sqrt(3))
    assert spread["ratio"] == pytest.approx(spread["across_std"] / spread["reference_std"])
    assert "mean over seeds 0, 1, 2" in (run_dir / "report.md").read_text()
    with pytest.raises(UserError, match="reference.seeds"):
        _config(tmp_path, overrides=["reference.seeds=[1,1]"])


def test_max_units_stages_and_changed_settings(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    run_dir = tmp_path / "run"
    scorers = FakeScorers()
    summary = run_fidelity(run_dir, cfg, scorers=scorers, stages=("proxy",), max_units=4, say=lambda _: None)
    assert scorers.calls == ["proxy/exact/fpn-fcos", "proxy/exact/nas-fcos", "proxy/exact/random-01",
                             "proxy/exact/random-02"]
    assert summary.remaining == 32 - 4
    assert "units not run yet" in (run_dir / "report.md").read_text()  # partial studies get a report too
    run_fidelity(run_dir, cfg, scorers=FakeScorers(), say=lambda _: None)
    # Editing one proxy setting reruns only that setting's units.
    edited = _config(tmp_path, TOY.replace("width: 8, epochs: 2", "width: 8, epochs: 3"))
    rerun = FakeScorers()
    run_fidelity(run_dir, edited, scorers=rerun, say=lambda _: None)
    assert rerun.calls == [f"proxy/reversed/{name}" for name in edited.decoder_names()]
    with pytest.raises(UserError, match="--stages"):
        run_fidelity(run_dir, cfg, scorers=FakeScorers(), stages=("proxies",))


def test_failed_units_are_recorded_counted_and_retried_on_request(tmp_path: Path) -> None:
    class FailingOnce(FakeScorers):
        def proxy(self, unit, ctx):
            result = super().proxy(unit, ctx)
            if unit.id == "proxy/other/nas-fcos":
                return {"status": "failed", "reward": None, "error": "RuntimeError: out of memory"}
            return result

    cfg = _config(tmp_path)
    run_dir = tmp_path / "run"
    run_fidelity(run_dir, cfg, scorers=FailingOnce(), say=lambda _: None)
    data = json.loads((run_dir / "fidelity.json").read_text())
    other = next(r for r in data["proxies"] if r["setting"] == "other")
    assert other["failed"] == 1 and other["n"] == 6
    assert data["units"]["failed"] == ["proxy/other/nas-fcos"]
    again = FakeScorers()
    run_fidelity(run_dir, cfg, scorers=again, retry_failed=True, say=lambda _: None)
    assert again.calls == ["proxy/other/nas-fcos"]


def test_a_second_process_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    import fcntl

    cfg = _config(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a+") as held:  # what a running study holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        scorers = FakeScorers()
        with pytest.raises(UserError, match="another `nasfcos fidelity` is running"):
            run_fidelity(run_dir, cfg, scorers=scorers, say=lambda _: None)
        assert scorers.calls == []
    assert run_fidelity(run_dir, cfg, scorers=FakeScorers(), say=lambda _: None).remaining == 0


def test_sigkilled_command_resumes_with_exactly_the_remaining_units(tmp_path: Path) -> None:
    """A real ``nasfcos fidelity`` process SIGKILLs itself as its 8th unit starts; the rerun does the rest."""
    config = tmp_path / "study.yaml"
    config.write_text(TOY)
    run_dir = tmp_path / "run"
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(SRC), os.environ.get("PYTHONPATH", "")]),
           "NASFCOS_FIDELITY_SCORERS": "fidelity_fakes:make_scorers", "FIDELITY_FAKE_CALLS": str(calls),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nasfcos.cli", "fidelity", "--config", str(config), "--out", str(run_dir)]
    killed = subprocess.run(command, env={**env, "FIDELITY_FAKE_KILL_AT": "8"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = calls.read_text().split()
    assert len(before) == 7 and sorted(read_records(run_dir)) == sorted(before)
    calls.unlink()
    done = subprocess.run([sys.executable, "-m", "nasfcos.cli", "fidelity", "--resume", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = calls.read_text().split()
    cfg = load_fidelity_config(config)
    all_ids = [u.id for u in plan_units(cfg, study_decoders(cfg), backbone_identity(cfg))]
    assert after == [i for i in all_ids if i not in before]
    assert "ran 25 units" in done.stdout and "0 still to run" in done.stdout


# ---------------------------------------------------------------------------------------------------- for real


REAL = """\
threads: 1
data: {num_train: 16, num_val: 8, image_size: 64}
backbone: {iters: 2, batch_size: 4, width: 16}
decoders: {random: 1, seed: 0, presets: [fpn-fcos]}
reference: {width: 16, iters: 3, batch_size: 4, checkpoint_period: 2}
seed_spread: {decoders: [], seeds: [0]}
proxy_defaults: {batch_size: 8, device: cpu, threads: 1, compute_ap: true}
proxies:
  - {name: tiny, cache: {crop: 64}, proxy: {width: 8, epochs: 1}}
bootstrap: 50
"""


def test_real_trainer_and_proxy_with_an_interrupted_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """The real command's scorers on a 16-image set: two decoders trained for 3 steps and scored by a proxy.
    The first reference training is interrupted right after its step-2 checkpoint; the rerun resumes it through
    the trainer's own resume (its log says so) and trains nothing else again."""
    import nasfcos.train.trainer as trainer

    config = tmp_path / "study.yaml"
    config.write_text(REAL)
    run_dir = tmp_path / "run"
    real_save = trainer.save_checkpoint
    saves: list[str] = []

    def save_then_interrupt(path, **kwargs):
        real_save(path, **kwargs)
        saves.append(str(path))
        if "references" in str(path) and kwargs.get("step") == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived right after the checkpoint

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_interrupt)
    assert main(["fidelity", "--config", str(config), "--out", str(run_dir), "--stages", "reference"]) == 130
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    assert read_records(run_dir) == {}

    assert main(["fidelity", "--resume", str(run_dir)]) == 0
    records = read_records(run_dir)
    assert sorted(records) == ["proxy/tiny/fpn-fcos", "proxy/tiny/random-01", "reference/fpn-fcos/seed-0",
                               "reference/random-01/seed-0"]
    for record in records.values():
        assert record["status"] == "ok", record
    for name in ("fpn-fcos", "random-01"):
        assert 0.0 <= records[f"reference/{name}/seed-0"]["result"]["AP"] <= 1.0
        proxy = records[f"proxy/tiny/{name}"]["result"]
        assert proxy["reward"] < 0 and 0.0 <= proxy["ap"] <= 1.0 and proxy["epochs_run"] == 1
    (first,) = [p for p in (run_dir / "references").iterdir() if p.name.startswith("fpn-fcos-")]
    events = [json.loads(line) for line in (first / "log.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.get("event") == "start"]
    assert [(e["step"], e["resumed"]) for e in starts] == [(0, False), (2, True)]
    assert not (first / "checkpoints").exists() and (first / "model_final.pt").is_file()
    report = (run_dir / "report.md").read_text()
    assert "| tiny | loss (search) |" in report and "| tiny | ap |" in report
    assert (run_dir / "figures" / "fidelity_scatter.png").is_file()


@pytest.mark.slow
def test_benchmark_wrapper_quick_modes(tmp_path: Path) -> None:
    """``benchmarks/proxy_fidelity.py --quick``: the study and the timed estimate write well-formed results."""
    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    import proxy_fidelity

    study = proxy_fidelity.main(["--quick", "--threads", "1", "--run", str(tmp_path / "run"),
                                 "--out-dir", str(tmp_path / "out")])
    assert study["units_run_now"] == 10 and study["summary"]["units"]["finished"] == 10
    assert (tmp_path / "out" / "proxy_fidelity.md").read_text().startswith("# Proxy fidelity study")
    estimate = proxy_fidelity.main(["--estimate", "--quick", "--threads", "1", "--sample-iters", "3",
                                    "--sample-decoders", "2", "--out-dir", str(tmp_path / "out")])
    stages = estimate["stages"]
    assert [stages[s]["units"] for s in ("proxy", "seed-spread", "reference")] == [6, 2, 2]
    assert all(s["wall_s"] >= 0 for s in stages.values())
    assert estimate["total_wall_s"] == pytest.approx(sum(s["wall_s"] for s in stages.values()))

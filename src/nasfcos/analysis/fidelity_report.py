"""The numbers, the figure and ``report.md`` of a proxy-fidelity study folder (:mod:`nasfcos.analysis.fidelity`).

:func:`summarise` turns the finished units into the study's tables (``fidelity.json``):

- ``reference``: each decoder's COCO AP after full training, the mean over ``reference.seeds`` (only decoders
  with every one of those seeds finished are ranked);
- ``seed_spread``: per decoder trained with two or more seeds (``seed_spread.decoders`` over
  ``seed_spread.seeds``, and every decoder when ``reference.seeds`` has several) the mean, sample std and range
  of AP, the pooled seed std (the noise of one training), the noise of one reference number (pooled / sqrt(k)
  for a mean of k seeds), the std and range across decoders, and their ratio;
- ``proxies``: one row per proxy setting and reward kind — ``loss`` (minus the meta-val loss sum, the paper's
  reward) and, when the setting computed it (``reward: ap`` or ``compute_ap: true``), ``ap`` (meta-val AP) — with
  Kendall tau and Spearman rho against the reference AP (paired bootstrap intervals), the top-k overlap and the
  seconds per candidate (median of the proxy's own ``wall_time_s``);
- ``recommended``: the cheapest row whose tau lies within the interval of the best row's tau (the rule of
  issue 13 for choosing presets), or ``None``.

Only units whose record matches the current settings (same fingerprint) count; a decoder is ranked by a row
when both its reference and that proxy score succeeded. Partial studies get a report too, with what is missing
said in it. :func:`write_fidelity_report` writes ``fidelity.json``, ``figures/fidelity_scatter.png`` (proxy score
against reference AP, one panel per row) and ``report.md``; ``nasfcos report RUN`` on a study folder calls it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nasfcos.analysis.rank_stats import bootstrap_interval, kendall_tau, seed_spread, spearman_rho, top_k_overlap

__all__ = ["FIGURE", "REPORT", "SEPARATION_RATIO", "SUMMARY", "cheapest_within_best", "is_fidelity_run",
           "plot_fidelity", "summarise", "write_fidelity_report"]

SUMMARY = "fidelity.json"
REPORT = "report.md"
FIGURE = "figures/fidelity_scatter.png"
#: The issue's minimum study size; a smaller study is reported with a warning.
MIN_DECODERS = 12


def is_fidelity_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a fidelity study (its ``fidelity.yaml``)."""
    from nasfcos.analysis.fidelity import CONFIG_FILE

    return (Path(run_dir) / CONFIG_FILE).is_file()


def _ok(records: Mapping[str, Mapping[str, Any]], unit: Any) -> Mapping[str, Any] | None:
    record = records.get(unit.id)
    if record is None or record.get("fingerprint") != unit.fingerprint or record.get("status") != "ok":
        return None
    return record


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _proxy_score(result: Mapping[str, Any], kind: str) -> float | None:
    if kind == "ap":
        return _finite(result.get("ap"))
    parts = [_finite(result.get(name)) for name in ("loss_cls", "loss_reg", "loss_ctr")]
    if any(p is None for p in parts):
        return _finite(result.get("reward"))  # an evaluator that reports only its reward
    return -float(sum(parts))  # type: ignore[arg-type]


#: The reference separates decoders "clearly" when the std of the reference APs across decoders is at least this
#: multiple of the noise of one reference AP (pooled seed std / sqrt(len(reference.seeds))). That noise is in
#: every reference AP, so across_std**2 = true spread**2 + noise**2: at 1 the decoders do not differ at all, at 2
#: their true spread is about 1.7x the noise of one number.
SEPARATION_RATIO = 2.0


def cheapest_within_best(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The row with the fewest seconds per candidate among those whose tau is at least the lower end of the best
    row's tau interval (the best row itself always qualifies); ``None`` when no row has a tau."""
    ranked = [r for r in rows if _finite(r["tau"]["value"]) is not None]
    if not ranked:
        return None
    best = max(ranked, key=lambda r: r["tau"]["value"])
    floor = best["tau"]["low"] if _finite(best["tau"]["low"]) is not None else best["tau"]["value"]
    within = [r for r in ranked if r["tau"]["value"] >= floor]
    return min(within, key=lambda r: (r["seconds_per_candidate"] if r["seconds_per_candidate"] is not None
                                      else math.inf, -r["tau"]["value"]))


def summarise(cfg: Any, decoders: Sequence[Any], units: Sequence[Any], records: Mapping[str, Mapping[str, Any]]
              ) -> dict[str, Any]:
    """The study's tables (module docstring) from its settings, decoders, planned units and unit records."""
    from nasfcos.analysis.fidelity import STAGES

    by_id = {u.id: u for u in units}
    done = {uid: rec for uid, rec in ((u.id, _ok(records, u)) for u in units) if rec is not None}
    failed = sorted(u.id for u in units if u.id in records and records[u.id].get("fingerprint") == u.fingerprint
                    and records[u.id].get("status") != "ok")
    missing = sorted(u.id for u in units if u.id not in records or records[u.id].get("fingerprint") != u.fingerprint)

    def reference_ap(name: str, seed: int) -> float | None:
        record = done.get(f"reference/{name}/seed-{seed}")
        return None if record is None else _finite(record["result"].get("AP"))

    def mean_reference(name: str) -> float | None:
        aps = [reference_ap(name, seed) for seed in cfg.reference.seeds]
        return None if any(ap is None for ap in aps) else statistics.fmean(aps)  # type: ignore[arg-type]

    reference = {d.name: mean_reference(d.name) for d in decoders}
    ranked_ref = {name: ap for name, ap in reference.items() if ap is not None}
    per_seed: dict[str, list[float]] = {}
    for decoder in decoders:
        seeds = list(dict.fromkeys([*(cfg.seed_spread.seeds if decoder.name in cfg.seed_spread.decoders else ()),
                                    *cfg.reference.seeds]))
        aps = [ap for ap in (reference_ap(decoder.name, s) for s in seeds) if ap is not None]
        if decoder.name in cfg.seed_spread.decoders or len(aps) >= 2:
            per_seed[decoder.name] = aps
    spread = seed_spread(per_seed, list(ranked_ref.values()), runs_per_score=len(cfg.reference.seeds))
    seconds_by_stage: dict[str, float] = {}
    for uid, record in records.items():
        if uid in by_id and record.get("fingerprint") == by_id[uid].fingerprint:
            stage = by_id[uid].stage
            seconds_by_stage[stage] = seconds_by_stage.get(stage, 0.0) + float(record.get("seconds") or 0.0)

    rows: list[dict[str, Any]] = []
    proxy_scores: dict[str, dict[str, float]] = {}
    for index, setting in enumerate(cfg.proxies):
        results = {}
        seconds = []
        setting_failed = 0
        for decoder in decoders:
            record = done.get(f"proxy/{setting.name}/{decoder.name}")
            if record is None:
                if f"proxy/{setting.name}/{decoder.name}" in failed:
                    setting_failed += 1
                continue
            results[decoder.name] = record["result"]
            wall = _finite(record["result"].get("wall_time_s")) or _finite(record.get("seconds"))
            if wall is not None:
                seconds.append(wall)
        kinds = ["loss"] + (["ap"] if any(_finite(r.get("ap")) is not None for r in results.values()) else [])
        for kind in kinds:
            scores = {n: s for n, s in ((n, _proxy_score(r, kind)) for n, r in results.items()) if s is not None}
            proxy_scores[f"{setting.name}:{kind}"] = scores
            common = sorted(set(scores) & set(ranked_ref))
            x = [ranked_ref[n] for n in common]
            y = [scores[n] for n in common]
            k = min(cfg.top_k, len(common))
            stats = {}
            for label, fn in (("tau", kendall_tau), ("rho", spearman_rho)):
                if len(common) >= 2:
                    stats[label] = bootstrap_interval(fn, x, y, resamples=cfg.bootstrap, level=cfg.level,
                                                      seed=index).to_dict()
                else:
                    stats[label] = {"value": math.nan, "low": math.nan, "high": math.nan, "level": cfg.level,
                                    "kept": 0, "resamples": cfg.bootstrap}
            p = setting.proxy
            rows.append({
                "setting": setting.name, "reward": kind, "search_reward": p.reward == kind,
                "width": p.width, "epochs": p.epochs, "batch_size": p.batch_size, "crop": setting.cache.crop,
                "images": setting.cache.images, "n": len(common), **stats,
                "top_k": k, "top_k_overlap": top_k_overlap({n: ranked_ref[n] for n in common}, scores, k) if k else 0,
                "seconds_per_candidate": statistics.median(seconds) if seconds else None,
                "seconds_total": sum(seconds), "failed": setting_failed,
            })
    best = cheapest_within_best(rows)
    separates = math.isfinite(spread.ratio) and spread.ratio >= SEPARATION_RATIO
    return {
        "decoders": [{"name": d.name, "kind": d.kind, "key": d.key} for d in decoders],
        "reference": reference,
        "reference_settings": {"iters": cfg.reference.iters, "width": cfg.reference.width,
                               "batch_size": cfg.reference.batch_size, "freeze_at": cfg.reference.freeze_at,
                               "seeds": list(cfg.reference.seeds), "image_size": cfg.data.image_size},
        "seed_spread": {
            "seeds": list(cfg.seed_spread.seeds),
            "per_decoder": {name: dict(zip(("mean", "std", "min", "max", "n"), values))
                            for name, values in spread.per_model.items()},
            "values": per_seed,
            "pooled_std": spread.pooled_std, "reference_std": spread.score_std,
            "across_std": spread.across_std, "across_range": spread.across_range,
            "ratio": spread.ratio,
            "separates": separates, "separation_ratio": SEPARATION_RATIO,
        },
        "proxies": rows,
        "proxy_scores": proxy_scores,
        "recommended": None if best is None else {"setting": best["setting"], "reward": best["reward"]},
        "units": {"total": len(units), "finished": len(done), "failed": failed, "missing": missing},
        "seconds_by_stage": {stage: seconds_by_stage[stage] for stage in STAGES if stage in seconds_by_stage},
    }


# --------------------------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------------------------


def _label(name: str) -> str:
    return name.replace("random-", "r") if name.startswith("random-") else name


def plot_fidelity(summary: Mapping[str, Any], out_png: str | Path) -> Path | None:
    """Proxy score against reference AP, one panel per proxy row; ``None`` when nothing can be drawn yet."""
    from nasfcos.analysis.plots import new_figure, save_figure

    reference = {n: ap for n, ap in summary["reference"].items() if ap is not None}
    rows = [r for r in summary["proxies"] if r["n"] >= 1]
    if not rows or not reference:
        return None
    kinds = {d["name"]: d["kind"] for d in summary["decoders"]}
    spread = {n: v for n, v in summary["seed_spread"]["per_decoder"].items()
              if _finite(v.get("min")) is not None and _finite(v.get("max")) is not None}
    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig = new_figure(figsize=(4.2 * cols, 3.6 * nrows))
    for i, row in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, i + 1)
        scores = summary["proxy_scores"][f"{row['setting']}:{row['reward']}"]
        names = sorted(set(scores) & set(reference))
        for kind, colour, marker in (("random", "#1f77b4", "o"), ("preset", "#d62728", "s")):
            chosen = [n for n in names if kinds.get(n) == kind]
            ax.scatter([100 * reference[n] for n in chosen], [scores[n] for n in chosen], s=22, c=colour,
                       marker=marker, label=kind, alpha=0.85)
        for n in names:  # seed-spread decoders: the range of their AP over seeds, as a horizontal bar
            if n in spread:
                lo, hi = spread[n]["min"], spread[n]["max"]
                ax.errorbar([100 * reference[n]], [scores[n]], fmt="none", ecolor="#7f7f7f", capsize=2, lw=1,
                            xerr=[[100 * max(0.0, reference[n] - lo)], [100 * max(0.0, hi - reference[n])]])
        for n in names:
            ax.annotate(_label(n), (100 * reference[n], scores[n]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        tau, rho = row["tau"]["value"], row["rho"]["value"]
        ax.set_title(f"{row['setting']} ({row['reward']}): tau {_num(tau, '.2f')}, rho {_num(rho, '.2f')}",
                     fontsize=9)  # n/a: a constant score (e.g. AP 0 everywhere) has no ranking
        ax.set_xlabel("reference AP (%)" + ("; bars: range over seeds" if spread else ""), fontsize=8)
        ax.set_ylabel("proxy: -meta-val loss" if row["reward"] == "loss" else "proxy: meta-val AP", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------------------


def _num(value: Any, spec: str = ".3f") -> str:
    number = _finite(value)
    return "n/a" if number is None else format(number, spec)


def _pct(value: Any, spec: str = ".2f") -> str:
    number = _finite(value)
    return "n/a" if number is None else format(100 * number, spec)


def _interval(stat: Mapping[str, Any]) -> str:
    return f"{_num(stat['value'], '.2f')} [{_num(stat['low'], '.2f')}, {_num(stat['high'], '.2f')}]"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _seeds(ref: Mapping[str, Any]) -> str:
    seeds = ref.get("seeds") or [ref.get("seed", 0)]  # results written before reference.seeds had one "seed"
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(str(s) for s in seeds)}"


def render_report(summary: Mapping[str, Any], figure: str | None) -> str:
    """The markdown of :func:`write_fidelity_report`."""
    units = summary["units"]
    decoders = summary["decoders"]
    ref = summary["reference_settings"]
    lines = ["# Proxy fidelity study", ""]
    lines.append(f"{len(decoders)} decoders ({sum(d['kind'] == 'preset' for d in decoders)} presets, "
                 f"{sum(d['kind'] == 'random' for d in decoders)} random samples of the space), "
                 f"{len({r['setting'] for r in summary['proxies']})} proxy settings; "
                 f"{units['finished']} of {units['total']} units finished"
                 + (f", {len(units['failed'])} failed" if units["failed"] else "") + ".")
    lines.append(f"Reference: full training, {ref['iters']} iterations, width {ref['width']}, batch "
                 f"{ref['batch_size']}, {ref['image_size']} px, freeze_at {ref['freeze_at']}, {_seeds(ref)}; "
                 "COCO AP (pycocotools) on the validation split.")
    if summary["seconds_by_stage"]:
        lines.append("Compute so far: " + ", ".join(f"{stage} {_minutes(s)}"
                                                    for stage, s in summary["seconds_by_stage"].items()) + ".")
    if len(decoders) < MIN_DECODERS:
        lines.append(f"*Only {len(decoders)} decoders: fewer than the {MIN_DECODERS} a fidelity measurement needs; "
                     "read the numbers as a smoke test.*")
    if units["missing"]:
        shown = ", ".join(units["missing"][:6]) + (" ..." if len(units["missing"]) > 6 else "")
        lines.append(f"*{len(units['missing'])} units not run yet ({shown}); rerun the same command to finish.*")
    lines.append("")

    lines += ["## Proxy against reference", ""]
    rows = summary["proxies"]
    level = int(round(100 * rows[0]["tau"]["level"])) if rows else 95
    lines += _table(
        ["setting", "reward", "width", "epochs", "batch", "crop", "images", "n", f"Kendall tau [{level} % CI]",
         f"Spearman rho [{level} % CI]", "top-k overlap", "s / candidate"],
        [[r["setting"], r["reward"] + (" (search)" if r["search_reward"] else ""), r["width"], r["epochs"],
          r["batch_size"], r["crop"], r["images"] or "all", r["n"], _interval(r["tau"]), _interval(r["rho"]),
          "n/a (tied)" if r["top_k_overlap"] is None else f"{r['top_k_overlap']}/{r['top_k']}",
          _num(r["seconds_per_candidate"], ".1f")] for r in rows])
    lines.append("")
    lines.append("tau and rho: rank agreement of the proxy score with the reference AP over the decoders both scored "
                 "(1 = same order); intervals: paired bootstrap over decoders. Seconds per candidate: median proxy "
                 "wall time (an AP row shares its setting's run and time).")
    recommended = summary.get("recommended")
    if recommended:
        lines.append(f"Cheapest setting whose tau lies within the interval of the best one: "
                     f"**{recommended['setting']} ({recommended['reward']})**.")
        ranked = [r for r in rows if _finite(r["tau"]["value"]) is not None]
        best = max(ranked, key=lambda r: r["tau"]["value"])
        if not (_finite(best["tau"]["low"]) or 0.0) > 0:
            lines.append(f"*The best tau's interval ({_interval(best['tau'])}) includes 0: no setting is shown to "
                         "rank better than chance, so this choice is by cost alone.*")
        if not summary["seed_spread"].get("separates", True):
            lines.append(f"*The reference does not separate decoders clearly (across-decoder std / seed std "
                         f"{_num(summary['seed_spread']['ratio'], '.1f')} < {SEPARATION_RATIO:g}): its ranking is "
                         "partly seed noise, which caps every tau; choose a preset from this table only with that "
                         "caveat, or raise reference.iters or train every decoder with several reference.seeds.*")
    lines.append("")
    if figure:
        lines += [f"![proxy score against reference AP]({figure})", ""]

    spread = summary["seed_spread"]
    lines += ["## Reference noise: seed-to-seed against across decoders", ""]
    if spread["per_decoder"]:
        lines += _table(["decoder", "seeds", "AP mean (%)", "AP std (%)", "AP min-max (%)"],
                        [[name, v["n"], _pct(v["mean"]), _pct(v["std"]), f"{_pct(v['min'])}-{_pct(v['max'])}"]
                         for name, v in spread["per_decoder"].items()])
        lines.append("")
        runs = len(ref.get("seeds") or [0])
        noise = "" if runs == 1 else (f", so a reference AP (the mean of {runs} seeds) carries "
                                      f"{_pct(spread.get('reference_std'))}")
        lines.append(f"Pooled seed-to-seed std: {_pct(spread['pooled_std'])} AP points{noise}; across the "
                     f"{sum(a is not None for a in summary['reference'].values())} decoders: std "
                     f"{_pct(spread['across_std'])}, range {_pct(spread['across_range'])}; ratio "
                     f"{_num(spread['ratio'], '.1f')} (the reference separates decoders by more than its own noise only "
                     "when this is well above 1).")
    else:
        lines.append("*No seed-spread units finished: the reference's noise is not measured.*")
    lines.append("")

    lines += ["## Per decoder", ""]
    columns = [f"{r['setting']}:{r['reward']}" for r in rows]
    scores = summary["proxy_scores"]
    lines += _table(["decoder", "kind", "reference AP (%)", *columns],
                    [[d["name"], d["kind"], _pct(summary["reference"].get(d["name"])),
                      *[_num(scores.get(c, {}).get(d["name"]), ".4f") for c in columns]] for d in decoders])
    if units["failed"]:
        lines += ["", "Failed units: " + ", ".join(units["failed"]) + "."]
    lines.append("")
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    """NaN / infinity become ``null`` (standard JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_fidelity_report(run_dir: str | Path) -> Path:
    """Write ``fidelity.json``, the scatter figure and ``report.md`` of a study folder; returns the report path."""
    from nasfcos.analysis.fidelity import load_study
    from nasfcos.io import atomic_write_json, atomic_write_text

    run_dir = Path(run_dir)
    cfg, decoders, units, records = load_study(run_dir)
    summary = summarise(cfg, decoders, units, records)
    figure = plot_fidelity(summary, run_dir / FIGURE)
    atomic_write_json(run_dir / SUMMARY, _json_ready(summary))
    return atomic_write_text(run_dir / REPORT, render_report(summary, FIGURE if figure is not None else None))

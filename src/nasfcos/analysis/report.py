"""``report.md`` and its figures for a run folder: what ran, the models, the search, example detections.

A run folder is either a *search run* (``store.sqlite`` written by :class:`~nasfcos.search.store.ResultStore`,
optionally ``log.jsonl``, ``topk/rank*.json``, ``config.yaml``) or a *demo run* (``summary.json`` written by
``nasfcos demo``, with the search in ``search/``). :func:`write_report` writes ``report.md`` and
``figures/*.png`` into that folder, atomically.

Every part is optional except the run itself: a missing or unreadable piece (no ``log.jsonl``, no weights, no
validation images, no sibling ``search-random/``) becomes a short italic note in its section instead of an
error, so a report can be made of a run that is still going or was killed. A folder that is neither kind of
run is a :class:`~nasfcos.errors.UserError`.

Numbers: AP from ``summary.json`` is shown in percent (COCOeval's fractions are multiplied by 100; ``-1``,
pycocotools' "no ground truth", shows as n/a). The search statistics leave failed candidates out (their reward
is a penalty chosen by the loop, not a measurement); the counts show how many there were.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError
from nasfcos.io import atomic_write_text, read_json

__all__ = ["RunFolder", "SearchData", "find_run", "load_search", "write_report"]

FIGURES = "figures"
REPORT = "report.md"
STORE_FILE = "store.sqlite"
SUMMARY_FILE = "summary.json"
RANDOM_SIBLING = "search-random"
DEFAULT_TOP_K = 10

# The search loop logs each controller update's statistics with the ``update/`` prefix (``nasfcos.search.loop``);
# the controller panel draws the PPO trainer's diagnostics (``nasfcos.analysis.plots.CONTROLLER_PANELS``). Logs
# of older versions lack them; for those, these scalars get a generic panel (at most 4, in this order).
_CONTROLLER_PREFIX = "update/"
_CONTROLLER_KEYS = ("entropy", "baseline", "approx_kl", "clip_fraction", "policy_loss", "grad_norm", "batch_reward_mean")


# ----------------------------------------------------------------------------------------------------------
# Reading a run folder
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunFolder:
    """What kind of run a folder holds and where its parts are."""

    root: Path
    kind: str  # "demo" or "search"
    search_dir: Path | None
    summary: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def random_dir(self) -> Path | None:
        """The sibling random-search run used for the PPO-vs-random comparison, if there is one."""
        if self.search_dir is None or self.search_dir.name == RANDOM_SIBLING:
            return None
        candidate = self.search_dir.parent / RANDOM_SIBLING
        return candidate if (candidate / STORE_FILE).is_file() else None


def find_run(run_dir: str | Path) -> RunFolder:
    """Classify ``run_dir``; :class:`UserError` when it is missing or neither a search nor a demo run."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"{root}: run folder not found")
    if (root / SUMMARY_FILE).is_file():
        run = RunFolder(root=root, kind="demo", search_dir=None)
        try:
            summary = read_json(root / SUMMARY_FILE, "demo summary")
            if not isinstance(summary, dict):
                raise UserError(f"{root / SUMMARY_FILE}: expected a JSON object (got {type(summary).__name__})")
            run.summary = summary
        except UserError as exc:
            run.notes.append(f"summary.json could not be read ({exc}); models, examples and timings are skipped")
        search = root / "search"
        if (search / STORE_FILE).is_file():
            run.search_dir = search
        return run
    if (root / STORE_FILE).is_file():
        return RunFolder(root=root, kind="search", search_dir=root)
    raise UserError(
        f"{root}: not a nasfcos run folder (expected {STORE_FILE} of a search run or {SUMMARY_FILE} of a demo run)"
    )


@dataclass
class SearchData:
    """Everything the report uses from one search run folder."""

    path: Path
    results: list[Any]  # CandidateRecord, insertion order
    top: list[Any]  # best ok candidates, best first
    log: list[dict[str, Any]]
    config: dict[str, Any] | None
    meta: dict[str, Any]
    topk_files: list[Path]
    notes: list[str] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return [float(r.reward) for r in self.results]

    @property
    def statuses(self) -> list[str]:
        return [str(r.status) for r in self.results]

    def counted_rewards(self) -> list[float]:
        """Rewards of the candidates that were measured (failed ones carry a penalty instead)."""
        return [float(r.reward) for r in self.results if r.status != "failed"]

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)


def _find_key(tree: Any, names: Sequence[str]) -> Any:
    """First value under any of ``names`` in a nested mapping (breadth first), else ``None``."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, Mapping):
            for name in names:
                if name in node and not isinstance(node[name], Mapping):
                    return node[name]
            queue.extend(v for v in node.values() if isinstance(v, Mapping))
    return None


def load_search(search_dir: str | Path, top_k: int | None = None) -> SearchData:
    """Read a search run: the store (required), then ``log.jsonl``, ``config.yaml``, ``topk/`` if present."""
    from nasfcos.search.store import STATE_KEY, ResultStore

    path = Path(search_dir)
    notes: list[str] = []
    topk_files = sorted((path / "topk").glob("rank*.json")) if (path / "topk").is_dir() else []
    k = top_k or (len(topk_files) if topk_files else DEFAULT_TOP_K)
    with ResultStore(path / STORE_FILE, readonly=True) as store:
        results = store.all()
        top = store.top_k(k)
        meta = {}
        for key in store.meta_keys():
            value = store.get_meta(key)
            if key != STATE_KEY and isinstance(value, (str, int, float)) and len(str(value)) <= 200:
                meta[key] = value
    log: list[dict[str, Any]] = []
    if (path / "log.jsonl").is_file():
        from nasfcos.logs import read_log

        try:
            log = [r for r in read_log(path / "log.jsonl") if isinstance(r, dict)]
        except (OSError, UnicodeDecodeError) as exc:
            notes.append(f"log.jsonl could not be read ({exc.__class__.__name__})")
    else:
        notes.append("no log.jsonl: controller diagnostics are skipped")
    config = None
    if (path / "config.yaml").is_file():
        import yaml

        try:
            loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else None
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
            notes.append(f"config.yaml could not be read ({exc.__class__.__name__})")
    return SearchData(path=path, results=results, top=top, log=log, config=config, meta=meta,
                      topk_files=topk_files, notes=notes)


# ----------------------------------------------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 2, scale: float = 1.0) -> str:
    number = _finite(value)
    return "n/a" if number is None else f"{number * scale:.{digits}f}"


def _fmt_significant(value: Any, digits: int) -> str:
    """``digits`` significant digits: small demo models (0.7109 GMACs) and paper-scale ones (173.8) alike."""
    number = _finite(value)
    return "n/a" if number is None else f"{number:.{digits}g}"


def _fmt_ap(value: Any, scale: float) -> str:
    number = _finite(value)
    return "n/a" if number is None or number < 0 else f"{number * scale:.1f}"


def _fmt_duration(seconds: Any) -> str:
    value = _finite(seconds)
    if value is None:
        return "n/a"
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _note(text: str) -> str:
    return f"_Skipped: {text}._"


def _image(path: Path, root: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(root).as_posix()})"


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------


class _Report:
    """Collects markdown blocks and writes figures under ``root/figures``."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.root = run.root
        self.figures = run.root / FIGURES
        self.blocks: list[str] = []

    def add(self, *blocks: str) -> None:
        self.blocks.extend(b for b in blocks if b)

    def figure(self, name: str) -> Path:
        return self.figures / name

    def image(self, path: Path, alt: str) -> str:
        return _image(path, self.root, alt)

    def text(self) -> str:
        return "\n\n".join(self.blocks).rstrip() + "\n"


def _models(summary: Mapping[str, Any] | None) -> tuple[list[dict[str, Any]], list[str]]:
    if summary is None:
        return [], []
    raw = summary.get("models")
    if not isinstance(raw, list):
        return [], ["summary.json has no list of models"]
    models, notes = [], []
    for k, model in enumerate(raw):
        if isinstance(model, dict) and isinstance(model.get("name"), str):
            models.append(model)
        else:
            notes.append(f"models[{k}] in summary.json is not an object with a name")
    return models, notes


def _header(rep: _Report, search: SearchData | None, models: list[dict[str, Any]]) -> None:
    from nasfcos import __version__

    run = rep.run
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rep.add(f"# nasfcos report: {run.root.resolve().name}")
    what = []
    if run.kind == "demo":
        searched = sum(1 for m in models if m.get("kind") == "searched")
        what.append(f"a demo run (`nasfcos demo`): {len(models)} trained and evaluated model(s) "
                    f"({searched} searched, {len(models) - searched} baseline)")
    else:
        what.append("a search run (`nasfcos search`)")
    if search is not None:
        what.append(f"an architecture search of {len(search.results)} distinct candidates")
    lines = [
        f"This is {' with '.join(what)}.",
        "",
        f"- Run folder: `{run.root}`",
        f"- Report generated: {now} by nasfcos {__version__}",
    ]
    summary = run.summary or {}
    if summary.get("device"):
        lines.append(f"- Device: {summary['device']}")
    rep.add("\n".join(lines))
    for note in run.notes:
        rep.add(_note(note))
    timings = summary.get("timings")
    if isinstance(timings, dict) and timings:
        rows = [[stage, _fmt_duration(seconds)] for stage, seconds in timings.items()]
        total = sum(v for v in (_finite(s) for s in timings.values()) if v is not None)
        rows.append(["**total**", f"**{_fmt_duration(total)}**"])
        rep.add("### Timings", _table(["stage", "wall time"], rows))


def _models_section(rep: _Report, models: list[dict[str, Any]], notes: list[str]) -> None:
    from nasfcos.analysis.plots import ap_scale

    rep.add("## Models")
    for note in notes:
        rep.add(_note(note))
    if not models:
        rep.add(_note("no trained models (this report needs `summary.json` from `nasfcos demo` for them)"))
        return
    scale = ap_scale(models)
    rows = []
    for m in models:
        widths = f"{m.get('fpn_width', '?')}/{m.get('head_width', '?')}"
        rows.append([
            f"**{m['name']}**" if m.get("kind") == "searched" else m["name"], m.get("kind", "?"),
            m.get("backbone", "?"), widths,
            *(_fmt_ap(m.get(key), scale) for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")),
            _fmt(m.get("params_m"), 2), _fmt_significant(m.get("gmacs"), 4), _fmt(m.get("latency_ms"), 1),
            _fmt(m.get("search_reward"), 4),
        ])
    rep.add(
        _table(["model", "kind", "backbone", "FPN/head width", "AP", "AP50", "AP75", "APs", "APm", "APl",
                "params (M)", "GMACs", "latency (ms)", "search reward"], rows),
        "AP columns are COCO AP in percent on the validation split (n/a: not measured, or no objects of that "
        "size). GMACs and latency are for backbone + decoder, without post-processing; search reward is the "
        "proxy-task reward of a searched architecture (for a baseline, where given: the same proxy task run on "
        "its decoder, the reference the searched ones must beat).",
    )
    _noise_paragraph(rep, (rep.run.summary or {}).get("verdict"))


def _noise_paragraph(rep: _Report, verdict: Any) -> None:
    """The demo's verdict: the best searched AP against ``fpn-fcos``'s seed spread at the same budget."""
    if not isinstance(verdict, dict) or not isinstance(verdict.get("baseline"), dict):
        return
    noise = verdict["baseline"]
    aps = noise.get("aps") or []
    rows = [[f"seed {seed}", _fmt_ap(ap, 100.0)] for seed, ap in zip(noise.get("seeds") or [], aps)]
    rep.add(
        "### Searched vs baseline, with the seed noise",
        _table([f"{noise.get('name', 'baseline')} run", "AP (%)"], rows),
        f"**{verdict.get('sentence', '')}** The noise margin is {_verdict_margin_rule()}.",
    )


def _verdict_margin_rule() -> str:
    from nasfcos.analysis.seed_noise import NOISE_MULTIPLIER

    return (f"{NOISE_MULTIPLIER:g} x the baseline's seed std x sqrt(1 + 1/n): the standard deviation of one more "
            "run minus the mean of n, assuming the searched decoder's seed noise is like the baseline's")


def _reward_stats(rep: _Report, search: SearchData, budget: Any, strategy: Any) -> None:
    from nasfcos.analysis.plots import quarter_means

    counted = search.counted_rewards()
    total = len(search.results)
    facts = []
    if strategy is not None:
        facts.append(f"- Strategy: {strategy}")
    if _finite(budget) is not None:
        done = f" ({100 * total / budget:.0f}% done)" if budget else ""
        facts.append(f"- Budget: {int(budget)} candidates{done}")
    else:
        facts.append("- Budget: not recorded in config.yaml")
    facts.append(
        f"- Evaluated: {total} distinct candidates: {search.count('ok')} ok, {search.count('failed')} failed, "
        f"{search.count('pruned')} pruned (early stopping)"
    )
    quarters = quarter_means(counted)
    if quarters is not None:
        q = max(1, len(counted) // 4)
        first, last = quarters
        facts.append(
            f"- Mean reward, first quarter ({q} candidates): {first:.4f}; last quarter ({q} candidates): "
            f"{last:.4f}; change {last - first:+.4f} ({'rising' if last > first else 'not rising'})"
        )
    if search.top:
        best = search.top[0]
        position = next((k + 1 for k, r in enumerate(search.results) if r.key == best.key), "?")
        facts.append(f"- Best reward: {best.reward:.4f} (candidate {position} of {total}, key `{best.key[:12]}`)")
    for key, value in sorted(search.meta.items()):
        if "/" not in key:  # per-candidate bookkeeping (``name/<key>``, as version-1 stores had) is not for the reader
            facts.append(f"- Store meta `{key}`: {value}")
    rep.add("\n".join(facts))


def _update_series(log: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(x, y)`` of ``update/<key>`` over the log's records (x = the record's step, else its index)."""
    xs, ys = [], []
    for index, record in enumerate(log):
        value = _finite(_to_number(record.get(_CONTROLLER_PREFIX + key)))
        if value is None:
            continue
        step = _finite(record.get("step"))
        xs.append(step if step is not None else float(index))
        ys.append(value)
    return xs, ys


def _quarter(values: Sequence[float], last: bool) -> float | None:
    if not values:
        return None
    n = max(1, len(values) // 4)
    part = values[-n:] if last else values[:n]
    return sum(part) / len(part)


def controller_reading(series: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> list[str]:
    """Numbers a reader needs to tell a learning controller from a stalled one (first vs last quarter).

    The closing hint is a heuristic, stated as one: KL exactly 0 in every update means the policy never
    moved; KL below 1e-3 on average with entropy still within 2 % of its maximum means it barely moves.
    """
    lines = []
    ys = {key: list(series[key][1]) for key in series}
    updates = max((len(v) for v in ys.values()), default=0)
    if "kl" in ys:
        lines.append(f"KL(pre || post) per update: first quarter {_fmt(_quarter(ys['kl'], False), 3)}, "
                     f"last quarter {_fmt(_quarter(ys['kl'], True), 3)}")
    if "entropy" in ys and "entropy_max" in ys and len(ys["entropy"]) == len(ys["entropy_max"]):
        ratios = [e / m for e, m in zip(ys["entropy"], ys["entropy_max"]) if m > 0]
        if ratios:
            lines.append(f"entropy / maximum: first quarter {_fmt(100 * _quarter(ratios, False), 0)} %, "
                         f"last quarter {_fmt(100 * _quarter(ratios, True), 0)} %")
    reward = ys.get("reward_mean")
    if reward and "baseline" in ys:
        lines.append(f"batch mean reward: first quarter {_fmt(_quarter(reward, False), 3)}, last quarter "
                     f"{_fmt(_quarter(reward, True), 3)} (baseline at the end {_fmt(ys['baseline'][-1], 3)})")
    if "live_share" in ys:
        lines.append(f"share of the buffer with a gradient: last quarter {_fmt(_quarter(ys['live_share'], True), 2)}")
    if "kl" in ys and ys["kl"]:
        ratio_last = None
        if "entropy" in ys and "entropy_max" in ys and ys["entropy_max"][-1] > 0:
            ratio_last = ys["entropy"][-1] / ys["entropy_max"][-1]
        if all(v == 0 for v in ys["kl"]):
            lines.append("reading: KL is exactly 0 in every update, so the policy never moved (stalled: lr 0, "
                         "or every advantage 0)")
        elif (_quarter(ys["kl"], True) or 0.0) < 1e-3 and ratio_last is not None and ratio_last > 0.98:
            lines.append("reading (heuristic): KL below 1e-3 with entropy at its maximum: the controller barely "
                         "moves")
        elif ratio_last is not None and ratio_last < 0.9:
            lines.append("reading (heuristic): the policy moves (KL > 0) and has become more certain (entropy "
                         "well below its maximum)")
    return [f"{updates} controller updates."] + lines if lines else []


def _controller_section(rep: _Report, search: SearchData) -> None:
    from nasfcos.analysis.plots import CONTROLLER_PANELS, plot_controller_diagnostics, plot_scalar_series

    rep.add("### Controller")
    if not search.log:
        rep.add(_note("no log.jsonl"))
        return
    panel_keys = [key for _, lines in CONTROLLER_PANELS for key, _, _ in lines]
    series = {}
    for key in panel_keys:
        xs, ys = _update_series(search.log, key)
        if not xs and key == "reward_mean":  # a strategy that does not report it: the loop's own batch mean
            xs, ys = _update_series(search.log, "batch_reward_mean")
        if len(ys) >= 2:
            series[key] = (xs, ys)
    if "kl" in series or "entropy_max" in series:
        png = plot_controller_diagnostics(series, rep.figure("controller.png"),
                                          title="Controller diagnostics (log.jsonl, update/*)")
        reading = controller_reading(series)
        rep.add(rep.image(png, "controller diagnostics"),
                "How to read it: a controller that learns pulls the batch reward and the baseline up, its entropy "
                "falls away from the maximum (the masked uniform policy's entropy along the same samples) and "
                "its KL between the policies before and after each update stays clearly above 0; a stalled one "
                "has flat rewards, entropy at the maximum and KL ~ 0 (exactly 0 if it did not move). The live "
                "share is the part of the PPO buffer still inside the clip range (1.0 when the buffer is the "
                "latest batch).",
                "\n".join(f"- {line}" for line in reading))
        return
    # Logs of an older version (approx_kl, clip_fraction computed after the update): the generic panel.
    legacy: dict[str, tuple[list[float], list[float]]] = {}
    for key in _CONTROLLER_KEYS:
        xs, ys = _update_series(search.log, key)
        if len(ys) >= 2:
            legacy[key.replace("_", " ")] = (xs, ys)
        if len(legacy) == 4:
            break
    if not legacy:
        rep.add(_note("log.jsonl has no two controller updates with "
                      f"{', '.join(_CONTROLLER_PREFIX + k for k in ('kl', 'entropy', 'baseline'))}"))
        return
    png = plot_scalar_series(legacy, rep.figure("controller.png"),
                             title="Controller diagnostics from log.jsonl", xlabel="controller update")
    rep.add(rep.image(png, "controller diagnostics"),
            "This log predates the diagnostics of nasfcos.search.ppo (KL on samples of the pre-update policy, "
            "entropy vs its maximum, live share); its approx KL and clip fraction were measured after the "
            "update and cannot tell a learning controller from a stalled one.")


def _to_number(value: Any) -> Any:
    """log.jsonl writes non-finite floats as strings; turn numeric strings back into floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return value


def _best_genotype_section(rep: _Report, search: SearchData) -> None:
    from nasfcos.analysis.arch_graph import genotype_table_md, render_arch

    rep.add("### Best architecture")
    source, text, reward = None, None, None
    if search.top:
        source, text, reward = "results store", search.top[0].genotype_json, search.top[0].reward
    elif search.topk_files:
        source = search.topk_files[0].name
        try:
            text = search.topk_files[0].read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            rep.add(_note(f"{search.topk_files[0]} could not be read ({exc.__class__.__name__})"))
            return
    if text is None:
        rep.add(_note("no successful candidate yet"))
        return
    try:
        genotype = _genotype_from_text(text)
    except UserError as exc:
        rep.add(_note(f"the best genotype ({source}) is not valid: {exc}"))
        return
    title = "Best searched architecture" + (f" (reward {reward:.4f})" if reward is not None else "")
    drawn = render_arch(genotype, rep.figure("best_genotype.png"), title=title)
    how = "Graphviz `dot`" if drawn.engine == "dot" else "matplotlib (Graphviz `dot` not installed)"
    rep.add(
        rep.image(drawn.png, "best architecture"),
        f"Drawn with {how}; DOT source: `{drawn.dot_path.relative_to(rep.root).as_posix()}`. "
        "Boxes are ops (orange: deformable 3x3, green: separable, blue: plain conv, white: skip), ellipses / "
        "purple boxes are aggregations, `/s` is the stride." + (f" {drawn.note}." if drawn.note else ""),
        "```text\n" + genotype.describe() + "\n```",
        genotype_table_md(genotype),
    )


def _decoder_cost_section(rep: _Report, search: SearchData) -> None:
    """The best decoder's parameters, GMACs and CPU latency next to ``fpn-fcos``'s, at the proxy width on the
    search's cache (:mod:`nasfcos.analysis.decoder_costs`), and the cost-aware reward's settings when it was on."""
    import os

    from nasfcos.search.cost_reward import TARGET_META_KEY

    rep.add("### Cost of the best decoder")
    config = search.config or {}
    cost = ((config.get("search") or {}).get("cost_reward") or {}) if isinstance(config.get("search"), Mapping) else {}
    if cost.get("enabled"):
        target = cost.get("target") if cost.get("target") is not None else search.meta.get(TARGET_META_KEY)
        where = ("the configured value" if cost.get("target") is not None
                 else f"`{cost.get('target_arch')}` measured when the search started")
        rep.add(f"The reward was cost-aware (`search.cost_reward`, {cost.get('metric')}, weight {cost.get('weight')}, "
                f"target {_fmt_significant(target, 4)}: {where}): a decoder costlier than the target had its reward "
                "lowered by the factor (cost / target)^weight, a cheaper one raised; the raw rewards are kept as "
                "`metrics.raw_reward`.")
    if not search.top:
        rep.add(_note("no successful candidate yet"))
        return
    cache = config.get("cache")
    proxy = config.get("proxy") if isinstance(config.get("proxy"), Mapping) else {}
    if not isinstance(cache, str) or not os.path.isdir(cache) or not isinstance(proxy.get("width"), int):
        rep.add(_note("the search's feature cache is not here (or config.yaml lacks it): only the search's own "
                      f"GMACs are known ({_fmt(search.top[0].gmacs, 3)} for the best decoder)"))
        return
    from nasfcos.analysis.decoder_costs import compare_decoder_costs
    from nasfcos.space import resolve_arch

    try:
        best = _genotype_from_text(search.top[0].genotype_json)
        rows = compare_decoder_costs({"fpn-fcos": resolve_arch("fpn-fcos"), "best searched": best}, cache,
                                     proxy["width"], fcos=str(proxy.get("fcos", "vanilla")),
                                     concat=str(proxy.get("concat", "grouped")))
    except (UserError, RuntimeError, ValueError, OSError) as exc:
        rep.add(_note(f"the decoder costs could not be measured: {exc}"))
        return
    rep.add(
        _table(["decoder", "params (M)", "GMACs", "x fpn-fcos", "CPU latency (ms)", "x fpn-fcos"],
               [[r["name"], _fmt(r["params_m"], 3), _fmt_significant(r["gmacs"], 4), _fmt(r["gmacs_x"], 2),
                 _fmt(r["latency_ms"], 2), _fmt(r["latency_x"], 2)] for r in rows]),
        f"The decoder alone at the proxy width ({proxy['width']}) on one image of the cache's feature sizes: "
        "parameters and GMACs counted as the search counts them, latency the median of 20 batch-1 forward passes "
        "on the CPU with one thread, measured now on this machine (compare the two rows with each other, not "
        "with another machine)." + ("" if cost.get("enabled") else " The search ranked by its reward alone "
                                    "(`search.cost_reward` was off)."),
    )


def _genotype_from_text(text: str) -> Any:
    """A genotype from JSON text: the genotype object, a released list, or ``{"genotype": {...}, ...}``."""
    import json

    from nasfcos.space.genotype import Genotype

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict) and "genotype" in data and "fpn" not in data:
        data = data["genotype"]
        if isinstance(data, str):
            return Genotype.from_json(data)
    if isinstance(data, list):
        return Genotype.from_released(data)
    return Genotype.from_dict(data)


def _top_k_section(rep: _Report, search: SearchData) -> None:
    rep.add(f"### Top {len(search.top)} candidates" if search.top else "### Top candidates")
    if not search.top:
        rep.add(_note("no successful candidate yet"))
        return
    saved = {p.name for p in search.topk_files}
    rows = []
    for rank, r in enumerate(search.top, start=1):
        params = _finite(r.params)
        rows.append([
            rank, f"{r.reward:.4f}", _fmt(r.loss_cls, 4), _fmt(r.loss_reg, 4), _fmt(r.loss_ctr, 4),
            _fmt(r.gmacs, 2), "n/a" if params is None else f"{params / 1e6:.2f}", _fmt(r.wall_time_s, 1),
            f"`{r.key[:12]}`", _genotype_digest(r.genotype_json),
        ])
    rep.add(
        _table(["rank", "reward", "cls loss", "reg loss", "ctr loss", "GMACs", "params (M)", "eval time (s)", "key",
                "FPN ops / aggregations"], rows),
        "Losses are on the proxy task's meta-validation split; GMACs and parameters are as recorded by the "
        "search (n/a where it recorded none)." + (f" Genotype files: `topk/` ({len(saved)} saved)." if saved else ""),
    )


def _genotype_digest(text: str) -> str:
    """A few words about a genotype for the top-k table: counts of FPN ops and aggregations."""
    try:
        genotype = _genotype_from_text(text)
    except UserError:
        return "invalid genotype"
    if not genotype.searched_fpn:
        return f"plain FPN ({genotype.fpn.conv})"
    counts: dict[str, int] = {}
    for cell in genotype.fpn:
        for name in (cell.op1, cell.op2, cell.agg):
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{c}" for n, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _search_section(rep: _Report, search: SearchData | None) -> None:
    from nasfcos.analysis.plots import plot_reward_curve

    rep.add("## Search")
    if search is None:
        rep.add(_note("no search results in this run (no search/store.sqlite)"))
        return
    for note in search.notes:
        rep.add(_note(note))
    budget = _find_key(search.config, ("budget", "num_candidates", "max_candidates", "candidates"))
    strategy = _find_key(search.config, ("strategy",))
    _reward_stats(rep, search, budget, strategy)
    if search.results:
        png = plot_reward_curve(search.rewards, search.statuses, rep.figure("reward_curve.png"),
                                title="Search reward per candidate (cf. paper Fig. 8)")
        rep.add(rep.image(png, "reward curve"),
                "Each point is one distinct candidate in the order it was evaluated; the black line is the "
                "moving average of the measured rewards (failed candidates left out), the dashed line the best "
                "reward so far. A rising average means the controller is learning to propose better decoders.")
    else:
        rep.add(_note("the results store is empty: no reward curve"))
    _controller_section(rep, search)
    _best_genotype_section(rep, search)
    _decoder_cost_section(rep, search)
    _top_k_section(rep, search)


def _ap_vs_gmacs_section(rep: _Report, models: list[dict[str, Any]]) -> None:
    from nasfcos.analysis.plots import plot_ap_vs_gmacs

    rep.add("## Accuracy against computation")
    usable = [m for m in models if _finite(m.get("AP")) is not None and _finite(m.get("gmacs")) is not None]
    if not usable:
        rep.add(_note("no model with both AP and GMACs in summary.json"))
        return
    png = plot_ap_vs_gmacs(models, rep.figure("ap_vs_gmacs.png"),
                           title="AP against GMACs (cf. paper Fig. 5)")
    rep.add(rep.image(png, "AP against GMACs"),
            "Stars are searched decoders, circles baselines; colours are backbones. Up and to the left is better.")


def _examples_section(rep: _Report, models: list[dict[str, Any]], examples: int, device: str) -> None:
    rep.add("## Example detections")
    if examples <= 0:
        rep.add(_note("examples disabled (--examples 0)"))
        return
    candidates = [m for m in models if isinstance(m.get("weights"), str) and (rep.root / m["weights"]).is_file()]
    if not candidates:
        rep.add(_note("no model weights found in this run folder" if models else "no trained models"))
        return
    best = max(candidates, key=lambda m: _finite(m.get("AP")) if _finite(m.get("AP")) is not None else -math.inf)
    data = (rep.run.summary or {}).get("data")
    if not isinstance(data, dict) or not isinstance(data.get("val_json"), str):
        rep.add(_note("summary.json names no validation data (data.val_json)"))
        return
    try:
        png, shown = _draw_examples(rep, best, data, examples, device)
    except UserError as exc:
        rep.add(_note(f"could not draw examples with {best['name']}: {exc}"))
        return
    rep.add(rep.image(png, "example detections"),
            f"Detections of **{best['name']}** (the best model with weights in this run) on the first {shown} "
            f"validation image{'s' if shown != 1 else ''}: coloured boxes are detections with score >= 0.3 (cf. "
            "paper Fig. 9), thin white boxes the annotated objects.")


def _draw_examples(rep: _Report, model_entry: Mapping[str, Any], data: Mapping[str, Any], examples: int,
                   device: str) -> tuple[Path, int]:
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    from nasfcos.analysis.plots import plot_example_detections
    from nasfcos.data.coco import read_coco
    from nasfcos.nn.device import resolve_device
    from nasfcos.train.trainer import load_trained_model

    target = resolve_device(device)
    val_json = rep.root / str(data["val_json"])
    image_root = rep.root / str(data["val_images"]) if isinstance(data.get("val_images"), str) else None
    dataset = read_coco(val_json, image_root)
    if len(dataset) == 0:
        raise UserError(f"{val_json}: no validation images")
    model, meta = load_trained_model(rep.root / str(model_entry["weights"]))
    model.to(target).eval()
    items = []
    for record in list(dataset.records)[:examples]:
        try:
            with Image.open(record.path) as handle:
                image = handle.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{record.path}: cannot read image ({exc.__class__.__name__})") from None
        with torch.no_grad():
            detection = model([(pil_to_tensor(image).float() / 255.0).to(target)])[0]
        detection = {k: v.detach().cpu() for k, v in detection.items()}
        detection["gt_boxes"] = record.boxes.tolist()
        items.append((image, detection, record.file_name))
    class_names = meta.get("class_names") or list(dataset.class_names)
    png = plot_example_detections(items, rep.figure("examples.png"), class_names,
                                  title=f"{model_entry['name']}: detections on validation images")
    return png, len(items)


def _comparison_section(rep: _Report, search: SearchData | None) -> None:
    from nasfcos.analysis.plots import plot_strategy_comparison, quarter_means

    random_dir = rep.run.random_dir
    if search is None or random_dir is None:
        return  # the comparison is only made when a random-search sibling exists
    rep.add("## PPO against random search")
    try:
        random_search = load_search(random_dir)
    except UserError as exc:
        rep.add(_note(f"{random_dir} could not be read: {exc}"))
        return
    name = str(_find_key(search.config, ("strategy",)) or "PPO")
    name = "PPO" if name.lower() == "ppo" else name
    curves = {f"{name} ({search.path.name}/)": search.counted_rewards(),
              f"random ({random_dir.name}/)": random_search.counted_rewards()}
    rows = []
    for label, data in zip(curves, (search, random_search)):
        counted = data.counted_rewards()
        quarters = quarter_means(counted)
        rows.append([
            label, len(data.results), data.count("failed"),
            "n/a" if quarters is None else f"{quarters[0]:.4f}",
            "n/a" if quarters is None else f"{quarters[1]:.4f}",
            "n/a" if quarters is None else f"{quarters[1] - quarters[0]:+.4f}",
            f"{max(counted):.4f}" if counted else "n/a",
            f"{sum(counted) / len(counted):.4f}" if counted else "n/a",
        ])
    png = plot_strategy_comparison(curves, rep.figure("ppo_vs_random.png"),
                                   title="PPO controller against random search")
    lengths = {len(v) for v in curves.values()}
    rep.add(
        _table(["strategy", "candidates", "failed", "mean reward, first quarter", "mean reward, last quarter",
                "change", "best reward", "mean reward"], rows),
        rep.image(png, "PPO against random search"),
        "Same space and proxy task; a controller that learns shows a moving average that rises above random "
        "search's, which stays flat on average." + (
            " The two runs evaluated different numbers of candidates." if len(lengths) > 1 else ""),
    )


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def write_report(run_dir: str | Path, *, examples: int = 4, device: str = "cpu") -> Path:
    """Write ``report.md`` and ``figures/*.png`` into ``run_dir``; returns the report's path.

    ``examples``: how many validation images to draw detections on (0: none); ``device``: where the example
    detections run. :class:`UserError` when ``run_dir`` is not a search run or a demo run.
    """
    from nasfcos.analysis.fidelity_report import is_fidelity_run, write_fidelity_report

    if is_fidelity_run(run_dir):  # a `nasfcos fidelity` study folder has its own report
        return write_fidelity_report(run_dir)
    run = find_run(run_dir)
    search: SearchData | None = None
    search_note = None
    if run.search_dir is not None:
        try:
            search = load_search(run.search_dir)
        except UserError as exc:
            if run.kind == "search":
                raise
            search_note = f"search results could not be read: {exc}"
    models, model_notes = _models(run.summary)
    rep = _Report(run)
    _header(rep, search, models)
    if run.kind == "demo":
        _models_section(rep, models, model_notes)
    _search_section(rep, search)
    if search_note:
        rep.add(_note(search_note))
    if run.kind == "demo":
        _ap_vs_gmacs_section(rep, models)
        _examples_section(rep, models, examples, device)
    _comparison_section(rep, search)
    return atomic_write_text(run.root / REPORT, rep.text())

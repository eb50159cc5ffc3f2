"""Figures of a run as PNG files: the search's reward curve (paper Fig. 8), AP against GMACs (Fig. 5), PPO
against random search, and example detections (Fig. 9).

Why no ``pyplot``: the report runs inside other programs (the demo, tests, a notebook). Every figure here is a
``matplotlib.figure.Figure`` bound to the Agg canvas, so nothing touches the global pyplot state or needs a
display, and figures are freed as soon as they go out of scope. PNGs are rendered into memory and written
atomically (:func:`nasfcos.io.atomic_write_bytes`), so a killed report never leaves half an image.

Conventions of the search plots: rewards are in insertion order of the results store (one point per distinct
evaluated candidate). Failed candidates carry a penalty reward chosen by the search loop; they are drawn (as
red crosses, pinned to the bottom edge when the penalty is far below the other rewards) but left out of the
moving average and the best-so-far line, which would otherwise mostly show the size of the penalty.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nasfcos.io import atomic_write_bytes

__all__ = [
    "DPI",
    "FIGSIZE",
    "best_so_far",
    "default_window",
    "moving_average",
    "new_figure",
    "CONTROLLER_PANELS",
    "plot_ap_vs_gmacs",
    "plot_controller_diagnostics",
    "plot_example_detections",
    "plot_reward_curve",
    "plot_scalar_series",
    "plot_strategy_comparison",
    "ap_scale",
    "quarter_means",
    "save_figure",
]

#: Default figure size (inches) and resolution: 960 x 600 pixels, readable in a markdown viewer.
FIGSIZE: tuple[float, float] = (8.0, 5.0)
DPI: int = 120

_STATUS_STYLE = {
    "ok": dict(marker="o", s=16, color="#1f77b4", alpha=0.45, label="ok"),
    "pruned": dict(marker="s", s=20, facecolors="none", edgecolors="#ff7f0e", alpha=0.8,
                   label="pruned (stopped early)"),
    "failed": dict(marker="x", s=28, color="#d62728", alpha=0.9, label="failed (penalty reward)"),
}
_SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


# ----------------------------------------------------------------------------------------------------------
# Numbers behind the plots
# ----------------------------------------------------------------------------------------------------------


def default_window(n: int) -> int:
    """Moving-average window for ``n`` points: an eighth of the run, at least 1 and at most 100."""
    return max(1, min(100, n // 8))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean: entry ``i`` is the mean of ``values[max(0, i - window + 1) : i + 1]``.

    The first ``window - 1`` entries average the points seen so far, so the curve starts at the first point
    instead of being shifted right by the window.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 (got {window})")
    out: list[float] = []
    total = 0.0
    for i, value in enumerate(values):
        total += float(value)
        if i >= window:
            total -= float(values[i - window])
        out.append(total / min(i + 1, window))
    return out


def best_so_far(values: Sequence[float | None]) -> list[float]:
    """Running maximum; ``None``/NaN entries are skipped (NaN until the first real value)."""
    out: list[float] = []
    best = math.nan
    for value in values:
        if value is not None and not math.isnan(float(value)):
            best = float(value) if math.isnan(best) else max(best, float(value))
        out.append(best)
    return out


def quarter_means(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean of the first and of the last quarter (``max(1, n // 4)`` points each); ``None`` when empty."""
    n = len(values)
    if n == 0:
        return None
    q = max(1, n // 4)
    head, tail = values[:q], values[n - q:]
    return sum(head) / len(head), sum(tail) / len(tail)


# ----------------------------------------------------------------------------------------------------------
# Figure plumbing
# ----------------------------------------------------------------------------------------------------------


def new_figure(figsize: tuple[float, float] = FIGSIZE, dpi: int = DPI) -> Any:
    """A ``Figure`` on the Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, out_png: str | Path) -> Path:
    """Render ``fig`` to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight", pad_inches=0.15, facecolor="white")
    return atomic_write_bytes(out_png, buffer.getvalue())


def _legend_below(ax: Any, ncol: int) -> None:
    """Legend under the axes, so that it never hides points (the saved PNG grows to fit it)."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=ncol, fontsize=9, frameon=False)


def _boxes_overlap(a: Any, b: Any, pad: float = 2.0) -> bool:
    return not (a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0)


def _declutter_annotations(fig: Any, annotations: list[Any], obstacles: Sequence[tuple[float, float]] = (),
                           max_steps: int = 8) -> None:
    """Move point labels (``ax.annotate`` in offset points) so that they overlap neither each other nor markers.

    Greedy: labels are placed in order at the first free spot among upper right, lower right, upper left and
    lower left of their point, then further above or below; a leader line joins a moved label to its point.
    ``obstacles`` are the marker centres in display pixels, one per annotation, in the same order (labels
    keep clear of the other markers by about a marker's size).
    """
    if not annotations:
        return
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()

    def text_box(note: Any) -> Any:
        note.update_positions(renderer)  # place the text for its current offset
        return Text.get_window_extent(note, renderer)  # the text alone, without the leader line

    radius = 8.0 * fig.dpi / 72.0
    markers = [Bbox([[x - radius, y - radius], [x + radius, y + radius]]) for x, y in obstacles]
    placed: list[Any] = []
    for index, note in enumerate(annotations):
        others = placed + [m for k, m in enumerate(markers) if k != index]  # a label sits beside its own point
        box = text_box(note)
        step = box.height * 72.0 / fig.dpi + 2.0  # one text height, in points
        spots = [(8, 6, "left"), (8, -6 - step, "left"), (-8, 6, "right"), (-8, -6 - step, "right")]
        spots += [(8, 6 + k * step * sign, "left") for k in range(2, max_steps) for sign in (1, -1)]
        for dx, dy, ha in spots:
            note.xyann = (dx, dy)
            note.set_horizontalalignment(ha)
            box = text_box(note)
            if not any(_boxes_overlap(box, other) for other in others):
                break
        else:  # no free spot: keep the default one
            note.xyann = (8, 6)
            note.set_horizontalalignment("left")
            box = text_box(note)
        placed.append(box)


# ----------------------------------------------------------------------------------------------------------
# Search plots
# ----------------------------------------------------------------------------------------------------------


def plot_reward_curve(
    rewards: Sequence[float],
    statuses: Sequence[str] | None,
    out_png: str | Path,
    window: int | None = None,
    *,
    title: str = "Search reward per candidate",
) -> Path:
    """Reward of every candidate, its moving average and the best reward so far (paper Fig. 8).

    ``statuses`` (``"ok"``/``"pruned"``/``"failed"`` per reward, or ``None`` for all ``ok``) picks the
    markers. Failed candidates are excluded from the moving average and the best-so-far line (see the module
    docstring); best-so-far counts ``ok`` candidates only, like the top-k.
    """
    rewards = [float(r) for r in rewards]
    statuses = list(statuses) if statuses is not None else ["ok"] * len(rewards)
    if len(statuses) != len(rewards):
        raise ValueError(f"{len(statuses)} statuses for {len(rewards)} rewards")
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(1, len(rewards) + 1))
    counted = [i for i, s in enumerate(statuses) if s != "failed"]
    counted_rewards = [rewards[i] for i in counted]
    window = window or default_window(len(counted_rewards))

    # y-range from the counted rewards; far-off penalties are pinned to the bottom edge.
    pinned_y = None
    if counted_rewards:
        low, high = min(counted_rewards), max(counted_rewards)
        span = (high - low) or max(abs(high), 1.0) * 0.1
        failed_rewards = [r for r, s in zip(rewards, statuses) if s == "failed"]
        if failed_rewards and min(failed_rewards) < low - 0.5 * span:
            pinned_y = low - 0.12 * span
            ax.set_ylim(low - 0.18 * span, high + 0.1 * span)

    for status in ("ok", "pruned", "failed"):
        idx = [i for i, s in enumerate(statuses) if s == status]
        if not idx:
            continue
        style = dict(_STATUS_STYLE[status])
        ys = [rewards[i] for i in idx]
        if status == "failed" and pinned_y is not None:
            ys = [max(y, pinned_y) for y in ys]
            style["label"] = "failed (penalty, pinned to the bottom edge)"
        style["label"] = f"{style['label']}: {len(idx)}"
        ax.scatter([x[i] for i in idx], ys, zorder=2, **style)

    if counted_rewards:
        ma = moving_average(counted_rewards, window)
        ax.plot([x[i] for i in counted], ma, color="black", linewidth=2.2, zorder=3,
                label=f"moving average (window {window})")
    ok_only = [rewards[i] if s == "ok" else None for i, s in enumerate(statuses)]
    best = best_so_far(ok_only)
    if any(not math.isnan(b) for b in best):
        ax.step(x, best, where="post", color="#2ca02c", linewidth=1.6, linestyle="--", zorder=3,
                label="best so far (ok)")

    ax.set_title(title)
    ax.set_xlabel("candidate (order of evaluation)")
    ax.set_ylabel("reward = -(cls + reg + ctr loss), higher is better")
    ax.grid(True, alpha=0.3)
    if rewards:
        ax.set_xlim(0, len(rewards) + 1)
        _legend_below(ax, ncol=3)
    else:
        ax.text(0.5, 0.5, "no candidates yet", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, out_png)


def plot_strategy_comparison(
    curves: Mapping[str, Sequence[float]],
    out_png: str | Path,
    window: int | None = None,
    *,
    title: str = "Search strategies over the same budget",
) -> Path:
    """Moving-average reward of each strategy (e.g. PPO vs random) against candidates evaluated.

    One colour per strategy: a thick line for the moving average (same window for all, so the curves are
    comparable) and a thin dashed line for the best reward so far.
    """
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    longest = max((len(v) for v in curves.values()), default=0)
    window = window or default_window(longest)
    for (name, rewards), colour in zip(curves.items(), _SERIES_COLOURS):
        values = [float(r) for r in rewards]
        if not values:
            continue
        x = list(range(1, len(values) + 1))
        ax.plot(x, moving_average(values, window), color=colour, linewidth=2.2,
                label=f"{name}: moving average ({len(values)} candidates)")
        ax.step(x, best_so_far(values), where="post", color=colour, linewidth=1.0, linestyle="--", alpha=0.8,
                label=f"{name}: best so far")
    ax.set_title(f"{title} (moving average, window {window})")
    ax.set_xlabel("candidate (order of evaluation; failed candidates left out)")
    ax.set_ylabel("reward = -(cls + reg + ctr loss)")
    ax.grid(True, alpha=0.3)
    if longest:
        _legend_below(ax, ncol=2)
    else:
        ax.text(0.5, 0.5, "no rewards", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, out_png)


def plot_scalar_series(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    out_png: str | Path,
    *,
    title: str = "Controller diagnostics",
    xlabel: str = "step",
) -> Path:
    """Small multiples: one panel per named ``(x, y)`` series (e.g. entropy and baseline from ``log.jsonl``)."""
    names = list(series)
    n = max(1, len(names))
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = new_figure(figsize=(FIGSIZE[0], max(3.0, 2.6 * rows)))
    for k, (name, colour) in enumerate(zip(names, _SERIES_COLOURS * 4)):
        ax = fig.add_subplot(rows, cols, k + 1)
        xs, ys = series[name]
        ax.plot(list(xs), list(ys), color=colour, linewidth=1.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(name, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_png)


#: The controller panel's four plots: title, then (series key, label, style) drawn into it. Keys are the
#: PPO trainer's diagnostics (``nasfcos.search.ppo.PPOTrainer.update``) as the search loop logs them.
CONTROLLER_PANELS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    ("batch reward vs baseline", (("reward_mean", "batch mean reward", "-o"), ("baseline", "baseline", "-"))),
    ("entropy vs its maximum (masked uniform)", (("entropy", "policy entropy", "-"),
                                                 ("entropy_max", "maximum", "--"))),
    ("KL(pre || post update), new batch", (("kl", "KL (exact per step, >= 0)", "-o"),)),
    ("share of samples", (("live_share", "buffer still inside clip (has gradient)", "-"),
                          ("clip_fraction", "new batch clipped during epochs", "-"))),
)


def plot_controller_diagnostics(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    out_png: str | Path,
    *,
    title: str = "Controller diagnostics",
    xlabel: str = "controller update",
) -> Path:
    """The controller panel: reward vs baseline, entropy vs maximum, KL per update, live share / clip fraction.

    ``series`` maps diagnostic names (see :data:`CONTROLLER_PANELS`) to ``(x, y)``; plots whose series are all
    missing are left out. Why these four: together they separate a learning controller from a stalled one.
    Learning: the batch reward climbs above the baseline and pulls it up, entropy falls away from its maximum,
    KL is clearly above 0. Stalled: reward and baseline flat, entropy pinned at the maximum, KL ~ 0 (exactly 0
    when the policy did not move). A live share far below 1 says most of the buffer no longer has a gradient
    (a buffer much longer than a batch); a clip fraction near 1 says the steps are large for the clip range.
    """
    panels = [(name, [(k, label, style) for k, label, style in lines if k in series])
              for name, lines in CONTROLLER_PANELS]
    panels = [(name, lines) for name, lines in panels if lines]
    n = max(1, len(panels))
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = new_figure(figsize=(FIGSIZE[0] * 1.25, max(3.2, 3.0 * rows)))
    for k, (name, lines) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        for (key, label, style), colour in zip(lines, _SERIES_COLOURS):
            xs, ys = series[key]
            ax.plot(list(xs), list(ys), style, color=colour, linewidth=1.4, markersize=2.5, label=label)
        if name == "share of samples":
            ax.set_ylim(-0.03, 1.05)
        if name.startswith("KL"):
            ax.set_ylim(bottom=0.0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no controller diagnostics", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------------------------------------
# Accuracy against computation (paper Fig. 5)
# ----------------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def ap_scale(models: Sequence[Mapping[str, Any]]) -> float:
    """100 when every AP is a COCOeval fraction (0..1), else 1 (already in percent)."""
    values = [v for v in (_number(m.get("AP")) for m in models) if v is not None and v >= 0]
    return 100.0 if values and all(v <= 1.0 for v in values) else 1.0


def plot_ap_vs_gmacs(
    models: Sequence[Mapping[str, Any]],
    out_png: str | Path,
    *,
    title: str = "Accuracy against computation",
) -> Path:
    """AP against GMACs, one labelled point per model (paper Fig. 5).

    ``models`` are ``summary.json`` model entries (``name``, ``kind``, ``AP``, ``gmacs``, ``backbone``).
    Marker shape is the kind (star: searched, circle: baseline), colour the backbone. Models without a
    finite AP (>= 0) or GMACs are left out (their names are listed in the figure's footnote).
    """
    scale = ap_scale(models)
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    usable, skipped = [], []
    for model in models:
        ap, gmacs = _number(model.get("AP")), _number(model.get("gmacs"))
        if ap is None or ap < 0 or gmacs is None:
            skipped.append(str(model.get("name", "?")))
        else:
            usable.append((model, gmacs, ap * scale))
    backbones = sorted({str(m.get("backbone", "?")) for m, _, _ in usable})
    colour_of = {b: c for b, c in zip(backbones, _SERIES_COLOURS * 4)}
    markers = {"searched": ("*", 260), "baseline": ("o", 90)}
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for model, gmacs, ap in usable:
        kind = str(model.get("kind", "baseline"))
        groups.setdefault((kind, str(model.get("backbone", "?"))), []).append((gmacs, ap))
    for (kind, backbone), points in sorted(groups.items()):
        marker, size = markers.get(kind, ("D", 70))
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, s=size,
                   color=colour_of[backbone], edgecolors="black", linewidths=0.6, zorder=3,
                   label=f"{kind}, {backbone}")
    notes = [
        ax.annotate(str(model.get("name", "?")), (gmacs, ap), xytext=(8, 6), textcoords="offset points",
                    fontsize=9, zorder=4,
                    bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.8),
                    arrowprops=dict(arrowstyle="-", color="#777777", linewidth=0.6, shrinkA=0, shrinkB=6))
        for model, gmacs, ap in usable
    ]
    if usable:
        xs = [g for _, g, _ in usable]
        ys = [a for _, _, a in usable]
        xspan = (max(xs) - min(xs)) or max(max(xs), 1.0) * 0.2
        yspan = (max(ys) - min(ys)) or max(max(ys), 1.0) * 0.2
        ax.set_xlim(min(xs) - 0.12 * xspan, max(xs) + 0.35 * xspan)
        ax.set_ylim(min(ys) - 0.15 * yspan, max(ys) + 0.25 * yspan)
        ax.legend(loc="lower right", fontsize=9, framealpha=0.9, markerscale=0.7)
    else:
        ax.text(0.5, 0.5, "no model has both AP and GMACs", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("GMACs (multiply-accumulates, backbone + decoder)")
    ax.set_ylabel("AP (COCO, %)" if scale == 100.0 else "AP (COCO)")
    ax.grid(True, alpha=0.3)
    if skipped:
        fig.text(0.01, 0.005, "not shown (no AP or GMACs): " + ", ".join(skipped), fontsize=8, color="#555555")
    markers = [tuple(ax.transData.transform((gmacs, ap))) for _, gmacs, ap in usable]
    _declutter_annotations(fig, notes, markers)
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------------------------------------
# Example detections (paper Fig. 9)
# ----------------------------------------------------------------------------------------------------------


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value)


def plot_example_detections(
    images_with_dets: Sequence[tuple[Any, Mapping[str, Any]] | tuple[Any, Mapping[str, Any], str]],
    out_png: str | Path,
    class_names: Sequence[str] | None,
    *,
    min_score: float = 0.3,
    title: str = "Example detections on validation images",
) -> Path:
    """A grid of images with their detections drawn (paper Fig. 9).

    Each item is ``(PIL image, {"boxes", "scores", "labels"})`` or the same plus a caption; boxes are xyxy
    pixels of that image (tensors or lists). Boxes scoring below ``min_score`` are not drawn; each panel's
    title says how many were drawn out of how many were returned. An optional ``"gt_boxes"`` entry is drawn
    first as thin white outlines, so that a panel with no confident detection still shows what was there.
    """
    from PIL import ImageDraw

    from nasfcos.analysis.draw import draw_detections

    n = max(1, len(images_with_dets))
    cols = min(n, 3) if n != 4 else 2
    rows = math.ceil(n / cols)
    fig = new_figure(figsize=(4.0 * cols, 4.0 * rows + 0.6))
    for k, item in enumerate(images_with_dets):
        image, det = item[0], item[1]
        caption = item[2] if len(item) > 2 else f"image {k + 1}"  # type: ignore[misc]
        boxes, labels = _as_list(det.get("boxes")), _as_list(det.get("labels"))
        scores = _as_list(det.get("scores")) if det.get("scores") is not None else None
        gt_boxes = _as_list(det.get("gt_boxes"))
        if gt_boxes:
            image = image.convert("RGB").copy()
            outline = ImageDraw.Draw(image)
            for box in gt_boxes:
                outline.rectangle(tuple(float(v) for v in box), outline=(255, 255, 255), width=1)
        threshold = min_score
        if scores and not any(s >= min_score for s in scores):
            # A weak (e.g. briefly trained) model: show its best few boxes rather than an empty panel.
            threshold = sorted(scores, reverse=True)[min(len(scores), 3) - 1]
        drawn = draw_detections(image, boxes, labels, scores, class_names, min_score=threshold)
        kept = len(boxes) if scores is None else sum(1 for s in scores if s >= threshold)
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(drawn)
        gt = f"; {len(gt_boxes)} ground truth (white)" if gt_boxes else ""
        ax.set_title(f"{caption}\n{kept} of {len(boxes)} boxes with score >= {threshold:.2f}{gt}", fontsize=9)
        ax.axis("off")
    if not images_with_dets:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_png)

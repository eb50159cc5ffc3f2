"""The fast proxy task: train one candidate decoder on cached features and score it (paper Sec. 3.3, 4.1).

:func:`evaluate_candidate` is what the search loop calls once per sampled architecture:

1. build ``Decoder(genotype, cache channels, num_classes, fpn_width=head_width=cfg.width)``; the decoder's
   input 1x1 convs map every backbone level to the width, as the paper says (the searched FPN maps each C
   with 1x1 + BN + ReLU, the plain FPN with its lateral 1x1);
2. train it with Adam (lr 8e-4, batch 200) on the cached **meta-train** features and the cached FCOS targets
   (no target assignment here), Polyak-averaging the weights after every step (decay 0.9, FACTS 5);
3. score the **averaged** weights on meta-val after ``epochs`` (15).

Reward (``reward="loss"``, the paper's): ``-(L_cls + L_reg + L_ctr)`` on meta-val. The paper sums the three
losses over ``D_v``; we evaluate them on the whole of meta-val *as one batch* — per-batch numerators are
added up and divided by the pooled normalisers (focal sum / (positives + images), centerness-weighted IoU sum /
sum of weights, centerness BCE sum / positives) — so the value is the per-image average of the paper's sum up
to the constant normalisers and does not depend on the validation batch size. ``reward="ap"`` (the paper's
ablation 4.4.1) runs FCOS post-processing on meta-val and scores COCO AP@[.5:.95] in ``[0, 1]`` against the
cached crop ground truth (crowd / difficult objects ignored); with no ground truth at all AP counts as 0.

Early stopping of hopeless candidates (nas-segm's running-average rule, FACTS 5). After epoch
``early_stop_epoch`` the candidate's averaged weights are validated once (``history`` keeps that loss, and
:attr:`EvaluationResult.early_stop_loss` hands it to the loop).
:class:`~nasfcos.search.early_stop.EarlyStopReference` is a small serialisable record the **loop** keeps
across candidates: a running mean and standard deviation of that
epoch's meta-val loss over every candidate that reached it (a plain average over the first
``1 / (1 - early_stop_decay)`` candidates, an exponential one after that, so it follows the population the
controller currently samples). Once it has seen ``early_stop_min_samples`` candidates, a candidate whose loss
exceeds ``mean + early_stop_margin x std`` (std floored at 1 % of the mean) stops: ``status="pruned"``, and the
reward is computed from its averaged weights at that point (``-loss``, or AP), so the controller still receives
a — bad — signal. :func:`evaluate_candidate` only reads the reference (it may run in another process); the
loop folds each batch's results in with ``reference.update(result)`` once the batch is complete.

The settings are :class:`~nasfcos.search.config.ProxyConfig` and the answer is the search's one evaluation
record, :class:`~nasfcos.search.results.EvaluationResult` (both re-exported here).

Why standard deviations rather than a ratio of the mean (e.g. "1.5x the average"): at a fixed epoch the FCOS
loss sums of different decoders lie within a few per cent of each other (e.g. 6.1 to 6.6 in our CPU runs), so
any ratio large enough to be safe never fires, and one small enough to fire depends on the dataset's loss
scale. Counting standard deviations prunes a predictable tail (about 16 % of a normal population at margin 1,
7 % at 1.5, 2 % at 2) on any dataset, and adapts as the controller's samples concentrate.

Failures never raise: a non-finite loss, an out-of-memory error or any other exception while building,
training or scoring the decoder gives ``status="failed"``, ``error="<Type>: <first line>"`` and
``reward=cfg.failure_reward`` (``None``: the loop decides the penalty). A cache that cannot be opened or lacks
the requested FCOS targets is the user's mistake and raises :class:`UserError` before any candidate work —
it would fail every candidate the same way.

Determinism: ``torch.manual_seed(seed + seed_offset)`` before building the decoder and a
``torch.Generator`` with the same seed for the batch order (the global RNG state is restored afterwards), so
the same genotype, seed and cache give the same reward on the CPU with the same number of threads (a
different thread count changes float summation order: rewards then agree to about 1e-7 relative).

Speed: with ``preload`` the cached splits are held in memory on the training device (once per process and
cache, so consecutive candidates read the disk once); otherwise batches are read from the memory maps.
On a shared CPU give each candidate ``threads=1``: on a loaded 2-core machine one candidate ran 20x slower
with 2 threads (OpenMP threads spinning against other processes) than with 1. ``channels_last`` did not
help on the CPU in our measurements, so it defaults to on for CUDA only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nasfcos.data.cache import LEVELS, FeatureCache, SplitTensors, clear_resident, split_nbytes
from nasfcos.detection.losses import fcos_losses
from nasfcos.detection.points import flatten_levels
from nasfcos.nn.device import resolve_device
from nasfcos.search.candidate_progress import CandidateProgress
from nasfcos.search.config import ProxyConfig
from nasfcos.search.early_stop import EarlyStopReference
from nasfcos.search.polyak import PolyakAverager
from nasfcos.search.results import EvaluationResult

__all__ = [
    "EarlyStopReference",
    "EvaluationResult",
    "ProxyConfig",
    "clear_resident",
    "decoder_cost",
    "decoder_latency_ms",
    "evaluate_candidate",
]

_EPS = 1e-7  # the loss module's clamp for the regression-weight normaliser


# --------------------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------------------


def _build_decoder(genotype: Any, cache_like: Mapping[str, Any], width: int, fcos: str, concat: str,
                   num_classes: int | None = None) -> nn.Module:
    from nasfcos.nn.decoder import Decoder

    channels = {k: int(v) for k, v in cache_like["channels"].items()}
    return Decoder(genotype, channels, int(num_classes or cache_like["num_classes"]), fpn_width=width,
                   head_width=width, fcos=fcos, concat=concat)


def _cost(decoder: nn.Module, feature_shapes: Mapping[str, Sequence[int]]) -> tuple[int, float]:
    from nasfcos.nn.cost import count_cost

    inputs = {level: torch.zeros(1, *(int(x) for x in feature_shapes[level])) for level in LEVELS}
    cost = count_cost(decoder, (inputs,), meta=False)  # a real batch-1 pass beats the meta device on CPU
    return int(cost.params), float(cost.gmacs)


def _manifest_of(cache_manifest: FeatureCache | Mapping[str, Any] | str | os.PathLike[str]) -> Mapping[str, Any]:
    if isinstance(cache_manifest, FeatureCache):
        return cache_manifest.manifest
    if isinstance(cache_manifest, Mapping):
        return cache_manifest
    return FeatureCache.open(cache_manifest).manifest


def decoder_cost(genotype: Any, cache_manifest: FeatureCache | Mapping[str, Any] | str | os.PathLike[str],
                 width: int, *, fcos: str = "vanilla", concat: str = "grouped",
                 num_classes: int | None = None) -> tuple[int, float]:
    """``(params, GMACs)`` of the decoder alone on one image of the cached feature sizes.

    ``cache_manifest`` is a :class:`FeatureCache`, its manifest dict or its folder. Counted with
    :func:`nasfcos.nn.cost.count_cost` (deformable convs included) with one batch-1 forward pass.
    """
    manifest = _manifest_of(cache_manifest)
    decoder = _build_decoder(genotype, manifest, width, fcos, concat, num_classes)
    return _cost(decoder, manifest["feature_shapes"])


def decoder_latency_ms(genotype: Any, cache_manifest: FeatureCache | Mapping[str, Any] | str | os.PathLike[str],
                       width: int, *, runs: int, fcos: str = "vanilla", concat: str = "grouped",
                       device: str | torch.device = "cpu", threads: int | None = None) -> float:
    """Median batch-1 forward time (ms) of the decoder alone on the cached feature sizes, on ``device`` with
    ``threads`` CPU threads: how the cost-aware reward measures its ``target_arch`` the way the proxy measures
    each candidate (``ProxyConfig.latency_runs``)."""
    manifest = _manifest_of(cache_manifest)
    decoder = _build_decoder(genotype, manifest, width, fcos, concat).to(resolve_device(device))
    return _latency_ms(decoder, manifest["feature_shapes"], runs, threads)


def _latency_ms(decoder: nn.Module, feature_shapes: Mapping[str, Sequence[int]], runs: int,
                threads: int | None = None) -> float:
    from nasfcos.nn.cost import eval_mode, time_forward_ms

    device = next(decoder.parameters()).device
    inputs = {level: torch.zeros(1, *(int(x) for x in feature_shapes[level]), device=device) for level in LEVELS}
    with eval_mode(decoder, threads):
        times = time_forward_ms(decoder, inputs, lambda model, x: model(x), warmup=2, repeats=runs)
    return float(np.median(times))


# --------------------------------------------------------------------------------------------------------------
# Batches (the split tensors themselves come from the cache: nasfcos.data.cache.SplitTensors)
# --------------------------------------------------------------------------------------------------------------


def _batches(size: int, batch_size: int, generator: torch.Generator | None) -> list[np.ndarray]:
    """Sorted index batches over ``0..size-1`` (shuffled with ``generator``, else in order); a trailing batch of
    one image joins the previous batch (BatchNorm cannot train on a single value per channel)."""
    order = torch.randperm(size, generator=generator).numpy() if generator is not None else np.arange(size)
    chunks = [order[i:i + batch_size] for i in range(0, size, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        last = chunks.pop()
        chunks[-1] = np.concatenate([chunks[-1], last])
    return [np.sort(chunk).astype(np.int64) for chunk in chunks]


# --------------------------------------------------------------------------------------------------------------
# Training and validation
# --------------------------------------------------------------------------------------------------------------


def _flat(outputs: Any) -> tuple[Tensor, Tensor, Tensor]:
    return (flatten_levels(outputs.cls_logits).float(), flatten_levels(outputs.bbox_reg).float(),
            flatten_levels(outputs.centerness).float().squeeze(-1))


def _validate(model: nn.Module, data: SplitTensors, cache: FeatureCache, cfg: ProxyConfig, *, with_ap: bool
              ) -> dict[str, float]:
    """Meta-val losses (pooled over the whole split, see the module doc) and optionally AP, in eval mode."""
    from nasfcos.detection.postprocess import postprocess

    was_training = model.training
    model.eval()
    focal = reg_sum = weight_sum = ctr_sum = 0.0
    num_pos = num_images = 0
    detections: list[dict[str, Tensor]] = []
    positions: list[int] = []
    points = cache.points(data.device) if with_ap else None
    crop = cache.crop
    try:
        with torch.no_grad():
            for index in _batches(data.size, cfg.val_batch_size or cfg.batch_size, None):
                features, targets = data.batch(index)
                outputs = model(features)
                cls, reg, ctr = _flat(outputs)
                losses = fcos_losses(cls, reg, ctr, targets, mode=cfg.fcos)
                positive = targets.labels >= 0
                pos = int(positive.sum())
                weights = float(targets.centerness[positive].sum())
                n = int(index.size)
                cls_norm = (pos + n) if cfg.fcos == "vanilla" else max(pos, 1)
                focal += float(losses["loss_cls"]) * cls_norm
                reg_sum += float(losses["loss_reg"]) * max(weights, _EPS)
                ctr_sum += float(losses["loss_ctr"]) * max(pos, 1)
                weight_sum += weights
                num_pos += pos
                num_images += n
                if with_ap:
                    detections += postprocess(outputs.cls_logits, outputs.bbox_reg, outputs.centerness, points,
                                              [(crop, crop)] * n, sqrt_score=cfg.fcos == "improved")
                    positions += index.tolist()
    finally:
        model.train(was_training)
    cls_den = (num_pos + num_images) if cfg.fcos == "vanilla" else max(num_pos, 1)
    result = {"loss_cls": focal / cls_den, "loss_reg": reg_sum / max(weight_sum, _EPS),
              "loss_ctr": ctr_sum / max(num_pos, 1)}
    result["loss"] = result["loss_cls"] + result["loss_reg"] + result["loss_ctr"]
    if with_ap:
        result["ap"] = _average_precision(cache, data, detections, positions)
    return result


def _average_precision(cache: FeatureCache, data: SplitTensors, detections: list[dict[str, Tensor]],
                       positions: list[int]) -> float:
    from nasfcos.data.coco_eval import coco_evaluate, detections_to_coco

    results = detections_to_coco(detections, positions, cache.category_ids)
    ap = coco_evaluate(data.split.coco_gt(), results)["AP"]
    return max(0.0, float(ap))  # pycocotools says -1 when there is no ground truth at all


@dataclass
class _Progress:
    """What is known so far, so a failure still reports cost, epochs and history."""

    params: int | None = None
    gmacs: float | None = None
    epochs_run: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    early_stop_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """These, as :class:`EvaluationResult` fields (the history copied)."""
        return {"params": self.params, "gmacs": self.gmacs, "epochs_run": self.epochs_run,
                "history": tuple(dict(entry) for entry in self.history), "early_stop_loss": self.early_stop_loss,
                "metrics": dict(self.metrics)}


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(old)


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def _short_key(genotype: Any) -> str:
    """The first 8 characters of the genotype's key (what the result store and reports show), for log lines."""
    key = getattr(genotype, "key", None)
    return key()[:8] if callable(key) else "candidate"


def _train_and_score(genotype: Any, cache: FeatureCache, cfg: ProxyConfig, seed: int, device: torch.device,
                     reference: EarlyStopReference | None, progress: _Progress) -> EvaluationResult:
    torch.manual_seed(seed)
    decoder = _build_decoder(genotype, cache.manifest, cfg.width, cfg.fcos, cfg.concat)
    progress.params, progress.gmacs = _cost(decoder, cache.feature_shapes)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    decoder.to(device)
    if cfg.latency_runs:  # before training: the weights' values do not change the time, the layers do
        progress.metrics["latency_ms"] = _latency_ms(decoder, cache.feature_shapes, cfg.latency_runs)
    if channels_last:
        decoder.to(memory_format=torch.channels_last)
    decoder.train()
    optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    averager = PolyakAverager(decoder, cfg.polyak_decay)

    resident = cfg.preload and (split_nbytes(cache, "train", cfg.fcos) + split_nbytes(cache, "val", cfg.fcos)
                                <= cfg.preload_max_gb * 1e9)
    train = SplitTensors(cache, "train", cfg.fcos, device, resident, channels_last)
    val = SplitTensors(cache, "val", cfg.fcos, device, resident, channels_last)
    generator = torch.Generator().manual_seed(seed)
    want_ap = cfg.reward == "ap" or cfg.compute_ap
    expected_points = int(cache.manifest["num_points"])

    def score(status: str, scores: Mapping[str, float] | None = None) -> EvaluationResult:
        if scores is None:
            with averager.swap_in() as averaged:
                scores = _validate(averaged, val, cache, cfg, with_ap=want_ap)
        if not math.isfinite(scores["loss"]):
            raise FloatingPointError(f"non-finite meta-val loss ({scores['loss']}) after epoch {progress.epochs_run}")
        if status == "ok":  # the final validation is also the last epoch's and, at that epoch, the early-stop one
            progress.history[-1]["val_loss"] = scores["loss"]
            if cfg.early_stop and cfg.early_stop_epoch == cfg.epochs:
                progress.early_stop_loss = scores["loss"]
        reward = float(scores["ap"]) if cfg.reward == "ap" else -float(scores["loss"])
        return EvaluationResult(status=status, reward=reward, loss_cls=scores["loss_cls"],
                                loss_reg=scores["loss_reg"], loss_ctr=scores["loss_ctr"], ap=scores.get("ap"),
                                **progress.fields(), seed=seed)

    reporter = CandidateProgress(_short_key(genotype), cfg.epochs)  # throttled stderr lines; see its module
    for epoch in range(1, cfg.epochs + 1):
        batches = _batches(train.size, cfg.batch_size, generator)
        if cfg.max_train_batches is not None:
            batches = batches[: cfg.max_train_batches]
        total, steps = 0.0, 0
        for step, index in enumerate(batches):
            features, targets = train.batch(index)
            outputs = decoder(features)
            cls, reg, ctr = _flat(outputs)
            if cls.shape[1] != expected_points:
                raise RuntimeError(f"decoder outputs {cls.shape[1]} points but the cache has targets for "
                                   f"{expected_points}")
            losses = fcos_losses(cls, reg, ctr, targets, mode=cfg.fcos)
            loss = losses["loss_cls"] + losses["loss_reg"] + losses["loss_ctr"]
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite training loss ({value}) at epoch {epoch} step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            averager.update()
            total += value
            steps += 1
            reporter.update(epoch, steps, len(batches), total / steps)
        progress.epochs_run = epoch
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": total / max(steps, 1), "val_loss": None}
        progress.history.append(entry)
        if epoch == cfg.epochs:
            break
        check = cfg.early_stop and epoch == cfg.early_stop_epoch
        if check or (cfg.val_every and epoch % cfg.val_every == 0):
            with averager.swap_in() as averaged:
                scores = _validate(averaged, val, cache, cfg, with_ap=check and want_ap)
            entry["val_loss"] = scores["loss"]
            if check:
                progress.early_stop_loss = scores["loss"]
                if reference is not None and reference.should_stop(scores["loss"], cfg.early_stop_margin,
                                                                    cfg.early_stop_min_samples):
                    return score("pruned", scores)
    return score("ok")


def evaluate_candidate(
    genotype: Any,
    cache: FeatureCache | str | os.PathLike[str],
    cfg: ProxyConfig = ProxyConfig(),
    *,
    seed: int,
    device: str | torch.device | None = None,
    early_stop_reference: EarlyStopReference | Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Train ``genotype``'s decoder on the cache's meta-train split and score it on meta-val (module doc).

    Never raises for a candidate's failure (``status="failed"``); raises :class:`UserError` only when the
    cache cannot be used at all (missing, corrupt, or without ``cfg.fcos`` targets) or the device is unknown.
    """
    start = time.perf_counter()
    cache = FeatureCache.open(cache)
    cache.target_suffix(cfg.fcos)  # UserError when the cache lacks these targets
    resolved = resolve_device(device if device is not None else cfg.device)  # UserError: unknown or absent
    reference = (EarlyStopReference.from_dict(early_stop_reference)
                 if isinstance(early_stop_reference, Mapping) else early_stop_reference)
    seed = int(seed) + int(cfg.seed_offset)
    progress = _Progress()
    cuda_devices = [resolved] if resolved.type == "cuda" else []
    with _threads(cfg.threads), torch.random.fork_rng(devices=cuda_devices):
        try:
            result = _train_and_score(genotype, cache, cfg, seed, resolved, reference, progress)
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate is recorded, never raised
            if resolved.type == "cuda":
                torch.cuda.empty_cache()
            result = EvaluationResult(status="failed", reward=cfg.failure_reward, error=_error_text(exc),
                                      **progress.fields(), seed=seed)
    return dataclasses.replace(result, wall_time_s=time.perf_counter() - start)

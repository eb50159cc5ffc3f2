"""Full training of an FCOS detector: iteration-based SGD with warm-up and steps, resumable, DDP-ready.

The recipe is FCOS's (FACTS 4): SGD momentum 0.9, weight decay 1e-4 (biases 2x lr, no decay), linear warm-up
from 1/3 over 500 iterations, steps at 60k/80k of 90k, backbone stem + first stage and BN frozen. Every
``checkpoint_period`` iterations the full state (model, optimiser, scheduler, AMP scaler, step, every RNG) is
written atomically; ``resume=True`` continues from the newest checkpoint with exactly the batches not yet
seen (:class:`~nasfcos.train.sampler.EpochBatchSampler`). Under ``torchrun`` each rank trains on its shard with
DistributedDataParallel (gloo on CPU, NCCL on GPU).

The detector is built from one :class:`~nasfcos.detection.spec.DetectorSpec` resolved from the config (its
width rules are documented there: an ``@W`` suffix that contradicts ``model.fpn_width`` is an error), and that
spec is what ``model_final.pt`` and every checkpoint carry (:mod:`nasfcos.detection.weights`), so
:func:`load_trained_model` rebuilds the model exactly, inference settings included.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from nasfcos.config import TrainConfig, dump_config
from nasfcos.data.coco_eval import save_detections, save_metrics
from nasfcos.data.loader import DetectionDataset
from nasfcos.data.records import DetectionSet
from nasfcos.data.sources import load_split
from nasfcos.data.transforms import Compose, RandomHorizontalFlip
from nasfcos.detection.detector import build_detector
from nasfcos.detection.spec import DetectorSpec
from nasfcos.detection.weights import detector_payload, load_trained_model
from nasfcos.errors import UserError
from nasfcos.io import atomic_torch_save
from nasfcos.logs import ProgressBar, RunLogger
from nasfcos.train.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint, unwrap_model
from nasfcos.train.distributed import DistInfo, barrier, cleanup_distributed, init_distributed, reduce_dict, seed_everything
from nasfcos.train.engine import evaluate_model, list_collate
from nasfcos.train.optim import build_optimizer_from_config
from nasfcos.train.sampler import EpochBatchSampler
from nasfcos.train.schedule import build_scheduler_from_config

__all__ = ["TrainResult", "train", "data_meta", "load_trained_model", "FINAL_WEIGHTS"]

FINAL_WEIGHTS = "model_final.pt"


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    steps: int
    weights: Path
    metrics: dict[str, float] | None
    seconds: float
    model: nn.Module | None = None


def data_meta(cfg: TrainConfig, train_set: DetectionSet) -> dict[str, Any]:
    """What the weights file says about the data (the model itself is the spec): classes and the arch as written."""
    return {
        "arch": cfg.model.arch,
        "class_names": list(train_set.class_names),
        "category_ids": [int(c) for c in train_set.category_ids],
    }


def _train_transforms(cfg: TrainConfig) -> Compose:
    return Compose([RandomHorizontalFlip(cfg.data.flip_prob)])


def _setup_threads(cfg: TrainConfig) -> None:
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False) -> TrainResult:
    """Train the detector ``cfg`` describes into ``run_dir`` and evaluate it on the validation split if any."""
    start_time = time.perf_counter()
    run_dir = Path(run_dir)
    _setup_threads(cfg)
    dist_info = init_distributed(cfg.runtime.device)
    try:
        return _train(cfg, run_dir, dist_info, resume=resume, quiet=quiet, start_time=start_time)
    finally:
        cleanup_distributed()


def _train(cfg: TrainConfig, run_dir: Path, dist_info: DistInfo, *, resume: bool, quiet: bool, start_time: float) -> TrainResult:
    main_process = dist_info.rank == 0
    device = dist_info.device
    seed_everything(cfg.runtime.seed, dist_info.rank)
    if not main_process:
        barrier()  # rank 0 reads (and checks) the data first
    train_set = load_split(cfg.data, "train", seed=cfg.runtime.seed)
    val_set = load_split(cfg.data, "val", seed=cfg.runtime.seed)
    if main_process and dist_info.is_distributed:
        barrier()
    assert train_set is not None
    if len(train_set) == 0:
        raise UserError(f"data.train_path: {cfg.data.train_path}: the training split has no images")
    num_classes = int(cfg.model.num_classes or len(train_set.class_names))
    cfg = replace(cfg, model=replace(cfg.model, num_classes=num_classes))

    spec = DetectorSpec.from_config(cfg.model, cfg.data, num_classes)
    model = build_detector(spec, pretrained=cfg.model.pretrained)
    meta = data_meta(cfg, train_set)
    model.to(device)
    if cfg.solver.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer_from_config(model, cfg.solver)
    scheduler = build_scheduler_from_config(optimizer, cfg.solver)
    use_amp = bool(cfg.solver.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    checkpoints = run_dir / "checkpoints"
    step = 0
    if resume:
        latest = latest_checkpoint(checkpoints)
        if latest is None:
            raise UserError(f"{checkpoints}: --resume given but the run has no checkpoint yet")
        state = load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        step = int(state["step"])
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    train_model: nn.Module = model
    if dist_info.is_distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    world = dist_info.world_size
    if cfg.solver.batch_size % world:
        raise UserError(f"solver.batch_size: {cfg.solver.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.solver.batch_size // world
    sampler = EpochBatchSampler(
        len(train_set), per_rank, seed=cfg.runtime.seed, rank=dist_info.rank, world_size=world, drop_last=len(train_set) >= cfg.solver.batch_size
    )
    dataset = DetectionDataset(train_set, _train_transforms(cfg), seed=cfg.runtime.seed + dist_info.rank)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=list_collate, num_workers=cfg.runtime.num_workers)
    batches_per_epoch = len(sampler)
    if batches_per_epoch == 0:
        raise UserError(f"solver.batch_size: {cfg.solver.batch_size} is larger than the training set ({len(train_set)} images)")

    logger = RunLogger(run_dir, use_tensorboard=cfg.runtime.tensorboard) if main_process else None
    progress = (
        # updates arrive every log_period steps; print a plain-text line about every 50 steps off a terminal
        ProgressBar(cfg.solver.max_iter, initial=step, desc="train", text_every=max(1, 50 // max(1, cfg.runtime.log_period)))
        if (main_process and not quiet)
        else None
    )
    if logger:
        logger.log_event("start", step=step, world_size=world, device=str(device), resumed=resume)
    model.train()
    metrics: dict[str, float] | None = None
    window: dict[str, float] = {}
    window_count = 0
    while step < cfg.solver.max_iter:
        epoch, start_batch = divmod(step, batches_per_epoch)
        sampler.set_epoch(epoch, start_batch)
        dataset.set_epoch(epoch)
        for images, targets in loader:
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
            autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
            with autocast:
                losses = train_model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise UserError(
                    f"training diverged at step {step}: loss is {loss.item()} "
                    f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); try "
                    "--set solver.grad_clip_norm=35 or a lower solver.base_lr, then --resume"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.solver.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.solver.grad_clip_norm
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1

            reduced = reduce_dict({k: v.detach() for k, v in losses.items()})
            for key, value in reduced.items():
                window[key] = window.get(key, 0.0) + float(value)
            window_count += 1
            if step % max(1, cfg.runtime.log_period) == 0 or step == cfg.solver.max_iter:
                scalars = {k: v / window_count for k, v in window.items()}
                scalars["loss"] = sum(scalars.values())
                scalars["lr"] = optimizer.param_groups[0]["lr"]
                if logger:
                    logger.log(step, scalars, prefix="train")
                if progress:
                    progress.update(step, scalars)
                window, window_count = {}, 0
            if step % max(1, cfg.runtime.checkpoint_period) == 0 or step == cfg.solver.max_iter:
                if main_process:
                    save_checkpoint(
                        checkpoint_path(checkpoints, step),
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        step=step,
                        extra={"spec": spec.to_dict(), "meta": meta},
                        scaler=scaler,
                        keep_last=cfg.runtime.keep_checkpoints or None,
                    )
            if cfg.runtime.eval_period and step % cfg.runtime.eval_period == 0 and step < cfg.solver.max_iter:
                if main_process and val_set is not None:
                    periodic, _ = evaluate_model(model, val_set, device=device)
                    if logger:
                        logger.log(step, periodic, prefix="val")
            if step >= cfg.solver.max_iter:
                break
    if progress:
        progress.close()

    weights = run_dir / FINAL_WEIGHTS
    if main_process:
        atomic_torch_save(weights, detector_payload(unwrap_model(model).state_dict(), spec, meta))
        if val_set is not None and len(val_set):
            metrics, detections = evaluate_model(model, val_set, device=device)
            save_detections(run_dir / "detections_val.json", detections)
            save_metrics(run_dir / "metrics.json", {"step": step, **metrics})
            if logger:
                logger.log(step, metrics, prefix="val")
        if logger:
            logger.log_event("end", step=step, seconds=time.perf_counter() - start_time)
            logger.close()
    return TrainResult(run_dir, step, weights, metrics, time.perf_counter() - start_time, model=model)

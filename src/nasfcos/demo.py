"""The whole of NAS-FCOS on built-in data, on the CPU, in minutes: ``nasfcos demo``.

Stages (each resumable: a finished stage is recorded in ``stages.json`` and skipped on a rerun):

1. ``data``     make the synthetic detection set (train/val);
2. ``backbone`` train a small backbone with the hand-designed FPN-FCOS decoder on it — the paper fine-tunes
                its backbone on the search data before searching (Sec. 4.1);
3. ``cache``    run that frozen backbone once over meta-train/meta-val crops and cache C2..C5 + FCOS targets;
4. ``search``   PPO over the NAS-FCOS space on the proxy task (decoders trained on cached features);
5. ``train``    fully train the top searched decoders and the ``fpn-fcos`` baseline with the same budget on the
                fine-tuned backbone, evaluate each (COCO AP on the validation split); train ``fpn-fcos`` with
                more seeds and judge the best searched AP against that seed noise
                (:mod:`nasfcos.analysis.seed_noise`);
6. ``profile``  params, GMACs and CPU latency of every trained model;
7. ``report``   ``report.md`` with figures, and ``summary.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError
from nasfcos.io import atomic_torch_save, atomic_write_json, read_json

__all__ = ["DemoScale", "SCALES", "STAGES", "format_table", "format_verdict", "run_demo"]

STAGES = ("data", "backbone", "cache", "search", "train", "profile", "report")


@dataclass(frozen=True)
class DemoScale:
    """Sizes of one demo run; ``tiny`` fits the 15-minute budget on a 2-core CPU."""

    image_size: int
    num_train: int
    num_val: int
    backbone_iters: int
    batch_size: int
    cache_crop: int
    #: the first ``cache_images`` training images are cached for the proxy (None: all): the fidelity study
    #: measured half of the demo's 320 as ranking within the best setting's interval at half its cost.
    cache_images: int | None
    budget: int
    search_batch: int
    proxy_width: int
    proxy_epochs: int
    proxy_batch: int
    top_k: int
    full_iters: int
    fpn_width: int
    latency_repeats: int
    #: ``fpn-fcos`` is fully trained with this many seeds (``seed``, ``seed+1``, ...): its seed-to-seed AP spread
    #: at the full-training budget is the noise the searched decoders' APs are judged against.
    baseline_seeds: int


SCALES: dict[str, DemoScale] = {
    # Seconds-long run of every stage for the test suite; not offered on the command line.
    "smoke": DemoScale(
        image_size=64, num_train=24, num_val=8, backbone_iters=4, batch_size=4, cache_crop=64, cache_images=16,
        budget=4, search_batch=2, proxy_width=8, proxy_epochs=1, proxy_batch=8, top_k=1, full_iters=2,
        fpn_width=16, latency_repeats=1, baseline_seeds=2,
    ),
    # Measured on the quiet 2-core machine: 160 px, 300 backbone steps, 24 candidates: 988 s (backbone 321,
    # search 240, train 409); 128 px: 854 s (243, 259, 335); 250 / 130 steps: 838 s (229, 255, 334 — the
    # searched decoders' cost depends on what the search finds); 230 / 110 steps: 768 s (183, 262, 304). With the
    # fidelity study's proxy (160 cached crops) and fpn-fcos trained with 3 seeds: 462 s (103, 89, 259).
    "tiny": DemoScale(
        image_size=128, num_train=320, num_val=64, backbone_iters=230, batch_size=8, cache_crop=128,
        cache_images=160, budget=24, search_batch=6, proxy_width=16, proxy_epochs=3, proxy_batch=32, top_k=2,
        full_iters=110, fpn_width=64, latency_repeats=5, baseline_seeds=3,
    ),
    "small": DemoScale(
        image_size=256, num_train=640, num_val=128, backbone_iters=800, batch_size=8, cache_crop=192,
        cache_images=None, budget=48, search_batch=8, proxy_width=48, proxy_epochs=6, proxy_batch=32, top_k=3,
        full_iters=500, fpn_width=64, latency_repeats=10, baseline_seeds=3,
    ),
}


class StageLog:
    """``stages.json``: which stages finished, with their outputs and seconds; written atomically."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.path = out / "stages.json"
        self.data: dict[str, Any] = {"settings": settings, "stages": {}}
        if self.path.is_file():
            previous = read_json(self.path, "demo stage log")
            if previous.get("settings") != settings:
                raise UserError(
                    f"{self.path}: this folder holds a demo run with other settings "
                    f"({previous.get('settings')}); use another --out or delete the folder"
                )
            self.data = previous

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def finish(self, stage: str, seconds: float, **outputs: Any) -> None:
        self.data["stages"][stage] = {"seconds": round(seconds, 2), **outputs}
        atomic_write_json(self.path, self.data)


def _say(message: str) -> None:
    print(message, flush=True)


def _train_config(
    out_dir: Path, data_dir: Path, scale: DemoScale, seed: int, threads: int, *, arch: str, iters: int,
    pretrained: Path | None, decoder_only: bool,
) -> Any:
    """The training configuration shared by the backbone stage and the full trainings (same budget)."""
    from nasfcos.config import TrainConfig, load_config

    overrides = [
        f"model.arch={arch}",
        "model.backbone=resnet18",
        f"model.fpn_width={scale.fpn_width}",
        f"model.head_width={scale.fpn_width}",
        "model.frozen_bn=false" if not decoder_only else "model.frozen_bn=true",
        # From scratch the whole backbone trains; on the fine-tuned backbone only the decoder does.
        f"model.freeze_at={5 if decoder_only else 0}",
        "data.format=synthetic",
        f"data.train_path={data_dir}",
        f"data.min_size={scale.image_size}",
        f"data.test_min_size={scale.image_size}",
        f"data.max_size={scale.image_size}",
        f"solver.batch_size={scale.batch_size}",
        "solver.base_lr=0.01",
        f"solver.warmup_iters={min(50, iters // 5)}",
        f"solver.max_iter={iters}",
        f"solver.steps=[{int(iters * 0.75)},{int(iters * 0.9)}]",
        "solver.grad_clip_norm=35",
        "solver.channels_last=false",  # measured slower than contiguous on CPU
        f"runtime.seed={seed}",
        f"runtime.threads={threads}",
        "runtime.num_workers=0",
        f"runtime.checkpoint_period={max(50, iters // 4)}",
        "runtime.keep_checkpoints=1",
        "runtime.log_period=10",
        f"runtime.output_dir={out_dir}",
    ]
    if pretrained is not None:
        overrides.append(f"model.pretrained={pretrained}")
    return load_config(TrainConfig, None, overrides)


def _train_model(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Train (resuming a half-finished run) and return its validation metrics."""
    from nasfcos.train.checkpoint import latest_checkpoint
    from nasfcos.train.trainer import train

    resume = latest_checkpoint(run_dir / "checkpoints") is not None and not (run_dir / "metrics.json").is_file()
    if (run_dir / "metrics.json").is_file() and (run_dir / "model_final.pt").is_file():
        return read_json(run_dir / "metrics.json")
    result = train(cfg, run_dir, resume=resume)
    return result.metrics or {}


def _baseline_proxy_reward(cache_dir: Path, proxy_cfg: Any, seed: int, threads: int) -> float | None:
    """The hand-designed ``fpn-fcos`` decoder run through the search's proxy task (same seed rule, no early
    stopping): the reward a searched decoder has to beat, shown next to the searched ones in the report."""
    from dataclasses import replace

    from nasfcos.search.loop import candidate_seed
    from nasfcos.search.proxy import evaluate_candidate
    from nasfcos.space.presets import get_preset

    genotype = get_preset("fpn-fcos").genotype
    result = evaluate_candidate(genotype, cache_dir, replace(proxy_cfg, early_stop=False, threads=threads),
                                seed=candidate_seed(seed, genotype.key()))
    return result.reward if result.status == "ok" else None


def export_backbone(detector_weights: Path, out_path: Path) -> Path:
    """Write the ``backbone.*`` tensors of a trained detector as a plain backbone state dict."""
    from nasfcos.io import safe_torch_load

    blob = safe_torch_load(detector_weights, "detector weights")
    state = {k[len("backbone."):]: v for k, v in blob["model"].items() if k.startswith("backbone.")}
    return atomic_torch_save(out_path, state)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    seed: int = 0,
    scale: str = "tiny",
    threads: int = 2,
    say: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Run (or resume) every stage into ``out`` and return the summary (also in ``summary.json``)."""
    import torch

    if scale not in SCALES:
        raise UserError(f"--scale: unknown value {scale!r}; expected one of {', '.join(SCALES)}")
    sizes = SCALES[scale]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    log = StageLog(out, {"seed": seed, "scale": scale, **asdict(sizes)})
    started = time.perf_counter()
    data_dir = out / "data" / "synth"
    step = 0

    def stage(name: str) -> bool:
        nonlocal step
        step += 1
        finished = log.done(name)
        if finished is not None:
            say(f"[{step}/{len(STAGES)}] {name}: done earlier ({finished['seconds']:.0f} s), skipping")
            return False
        say(f"[{step}/{len(STAGES)}] {name} ...")
        return True

    # 1. data -------------------------------------------------------------------------------------------
    if stage("data"):
        from nasfcos.data.synthetic import ensure_synthetic

        t0 = time.perf_counter()
        info = ensure_synthetic(
            data_dir, seed=seed, num_train=sizes.num_train, num_val=sizes.num_val, image_size=sizes.image_size
        )
        log.finish("data", time.perf_counter() - t0, train=info.num_train, val=info.num_val,
                   objects=info.num_train_objects + info.num_val_objects)
        say(f"    {info.num_train} train + {info.num_val} val images, {len(info.class_names)} classes -> {data_dir}")

    # 2. backbone fine-tuning ---------------------------------------------------------------------------
    backbone_run = out / "backbone"
    backbone_file = backbone_run / "backbone.pt"
    if stage("backbone"):
        t0 = time.perf_counter()
        cfg = _train_config(out, data_dir, sizes, seed, threads, arch="fpn-fcos", iters=sizes.backbone_iters,
                            pretrained=None, decoder_only=False)
        metrics = _train_model(cfg, backbone_run)
        export_backbone(backbone_run / "model_final.pt", backbone_file)
        log.finish("backbone", time.perf_counter() - t0, AP=metrics.get("AP"))
        say(f"    resnet18 + fpn-fcos trained {sizes.backbone_iters} iterations: val AP {metrics.get('AP', 0):.3f}")

    # 3. feature cache ----------------------------------------------------------------------------------
    cache_dir = out / "cache"
    if stage("cache"):
        from nasfcos.data.cache import build_cache
        from nasfcos.data.coco import read_coco

        t0 = time.perf_counter()
        train_set = read_coco(data_dir / "annotations" / "train.json", data_dir / "images" / "train")
        if sizes.cache_images is not None:
            train_set = train_set.subset(range(min(sizes.cache_images, len(train_set))))
        cache = build_cache(
            train_set, cache_dir, backbone="resnet18", weights=backbone_file, crop=sizes.cache_crop,
            meta_train=0.75, seed=seed, batch_size=16, threads=threads,
        )
        log.finish("cache", time.perf_counter() - t0, reused=cache.reused)
        say(f"    cached C2..C5 + targets of {len(train_set)} crops at {sizes.cache_crop}px -> {cache_dir}")

    # 4. search -----------------------------------------------------------------------------------------
    search_dir = out / "search"
    if stage("search"):
        from nasfcos.config import config_from_dict
        from nasfcos.search.config import ProxyConfig, SearchConfig, SearchRunConfig
        from nasfcos.search.loop import run_search

        t0 = time.perf_counter()
        # Candidates run in parallel, one thread each: small decoders scale better across processes than
        # across threads, and PyTorch's multi-threaded dilated depthwise convs stall badly on a busy CPU.
        parallel = threads > 1
        search_cfg = config_from_dict(SearchConfig, {
            "budget": sizes.budget, "batch_size": sizes.search_batch, "strategy": "ppo", "seed": seed,
            "executor": "process" if parallel else "inline", "workers": threads if parallel else None,
            "worker_threads": 1, "top_k": max(5, sizes.top_k),
            # configs/search-cpu.yaml's PPO settings (benchmarks/results/ppo_settings.md), on-policy buffer.
            "ppo": {"lr": 3e-3, "entropy_weight": 1e-2, "buffer_size": sizes.search_batch,
                    "normalize_advantages": True},
        }, source="demo")
        proxy_cfg = ProxyConfig(
            width=sizes.proxy_width, epochs=sizes.proxy_epochs, batch_size=sizes.proxy_batch, lr=8e-4,
            threads=1, device="cpu", early_stop=True, early_stop_epoch=max(1, sizes.proxy_epochs // 2),
        )
        resume = (search_dir / "store.sqlite").is_file()
        summary = run_search(search_dir, SearchRunConfig(str(cache_dir), search_cfg, proxy_cfg), resume=resume)
        reference = _baseline_proxy_reward(cache_dir, proxy_cfg, seed, threads)
        log.finish("search", time.perf_counter() - t0, evaluated=summary.evaluated, failed=summary.failed,
                   pruned=summary.pruned, baseline_reward=reference)
        best = "n/a" if summary.best is None else f"{summary.best.reward:.3f}"
        shown = "n/a (failed)" if reference is None else f"{reference:.3f}"
        say(f"    {summary.evaluated} candidates evaluated ({summary.failed} failed, {summary.pruned} pruned); "
            f"best reward {best}, fpn-fcos on the same proxy {shown}")

    # 5. full training of the top candidates and the baseline -------------------------------------------
    models_dir = out / "models"
    if stage("train"):
        from nasfcos.search.store import ResultStore

        t0 = time.perf_counter()
        with ResultStore(search_dir / "store.sqlite", readonly=True) as store:
            top = store.top_k(sizes.top_k)
        entries: list[dict[str, Any]] = []
        for rank, candidate in enumerate(top, start=1):
            genotype_file = models_dir / f"searched-{rank}" / "genotype.json"
            genotype_file.parent.mkdir(parents=True, exist_ok=True)
            genotype_file.write_text(candidate.genotype_json)
            entries.append({"name": f"searched-{rank}", "kind": "searched", "arch": str(genotype_file),
                            "genotype_json": candidate.genotype_json, "search_reward": candidate.reward})
        entries.append({"name": "fpn-fcos", "kind": "baseline", "arch": "fpn-fcos",
                        "search_reward": log.done("search").get("baseline_reward")})
        for entry in entries:
            run_dir = models_dir / entry["name"]
            say(f"    training {entry['name']} ({sizes.full_iters} iterations, decoder on the fine-tuned backbone)")
            cfg = _train_config(out, data_dir, sizes, seed, threads, arch=entry["arch"], iters=sizes.full_iters,
                                pretrained=backbone_file, decoder_only=True)
            entry["metrics"] = _train_model(cfg, run_dir)
            entry["weights"] = str((run_dir / "model_final.pt").relative_to(out))
            say(f"      val AP {entry['metrics'].get('AP', 0):.3f}")
        # The baseline again with other seeds: the noise of one training at this budget (not profiled: same arch).
        noise_runs = [{"seed": seed, "AP": entries[-1]["metrics"].get("AP"), "run": "models/fpn-fcos"}]
        for extra in range(1, sizes.baseline_seeds):
            run_dir = models_dir / f"fpn-fcos-seed{seed + extra}"
            say(f"    training fpn-fcos with seed {seed + extra} ({sizes.full_iters} iterations: the seed noise)")
            cfg = _train_config(out, data_dir, sizes, seed + extra, threads, arch="fpn-fcos",
                                iters=sizes.full_iters, pretrained=backbone_file, decoder_only=True)
            metrics = _train_model(cfg, run_dir)
            noise_runs.append({"seed": seed + extra, "AP": metrics.get("AP"), "run": str(run_dir.relative_to(out))})
            say(f"      val AP {metrics.get('AP', 0):.3f}")
        log.finish("train", time.perf_counter() - t0, models=entries, baseline_seeds=noise_runs)
        verdict = _verdict([{**e, "AP": e["metrics"].get("AP")} for e in entries], noise_runs)
        if verdict is not None:
            say(f"    {verdict.sentence}")

    # 6. profile ----------------------------------------------------------------------------------------
    if stage("profile"):
        from nasfcos.analysis.profile import profile
        from nasfcos.train.trainer import load_trained_model

        t0 = time.perf_counter()
        models = log.done("train")["models"]
        for entry in models:
            model, meta = load_trained_model(out / entry["weights"])
            model.eval()
            stats = profile(model, size=(sizes.image_size, sizes.image_size), latency=True, threads=threads,
                            repeats=sizes.latency_repeats)
            entry["profile"] = {"params_m": stats["params"] / 1e6, "gmacs": stats["gmacs"],
                                "latency_ms": stats.get("latency_ms_median")}
        log.finish("profile", time.perf_counter() - t0, models=models)

    summary = _write_summary(out, log, sizes, started)

    # 7. report -----------------------------------------------------------------------------------------
    if stage("report"):
        from nasfcos.analysis.report import write_report

        t0 = time.perf_counter()
        report = write_report(out, examples=4)
        log.finish("report", time.perf_counter() - t0, report=str(report.relative_to(out)))
        summary = _write_summary(out, log, sizes, started)
    return summary


def _verdict(models: list[dict[str, Any]], noise_runs: list[dict[str, Any]] | None) -> Any:
    """The best searched model's AP judged against ``fpn-fcos``'s seed spread (None: nothing to judge)."""
    from nasfcos.analysis.seed_noise import baseline_noise, judge

    runs = [(r["seed"], r["AP"]) for r in noise_runs or [] if isinstance(r.get("AP"), (int, float))]
    searched = [m for m in models if m.get("kind") == "searched" and isinstance(m.get("AP"), (int, float))]
    if not runs or not searched:
        return None
    best = max(searched, key=lambda m: m["AP"])
    return judge(best["name"], best["AP"], baseline_noise("fpn-fcos", runs))


def _write_summary(out: Path, log: StageLog, sizes: DemoScale, started: float) -> dict[str, Any]:
    """``summary.json`` in the schema the report reads."""
    import torch

    profiled = (log.done("profile") or {}).get("models") or (log.done("train") or {}).get("models") or []
    models = []
    for entry in profiled:
        metrics = entry.get("metrics", {})
        prof = entry.get("profile", {})
        models.append({
            "name": entry["name"], "kind": entry["kind"], "arch": entry.get("genotype_json") or entry["arch"], "backbone": "resnet18",
            "fpn_width": sizes.fpn_width, "head_width": sizes.fpn_width,
            **{k: metrics.get(k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
            "params_m": prof.get("params_m"), "gmacs": prof.get("gmacs"), "latency_ms": prof.get("latency_ms"),
            "weights": entry.get("weights"), "search_reward": entry.get("search_reward"),
        })
    noise_runs = (log.done("train") or {}).get("baseline_seeds")
    verdict = _verdict(models, noise_runs)
    if verdict is not None:
        for model in models:
            sigmas = verdict.baseline.in_sigmas(model["AP"]) if isinstance(model.get("AP"), (int, float)) else None
            model["ap_vs_baseline_sigma"] = sigmas if sigmas is not None and math.isfinite(sigmas) else None
    summary = {
        "models": models,
        "baseline_noise": None if verdict is None else verdict.baseline.to_dict(),
        "verdict": None if verdict is None else verdict.to_dict(),
        "data": {"val_json": "data/synth/annotations/val.json", "val_images": "data/synth/images/val"},
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "timings": {name: stage["seconds"] for name, stage in log.data["stages"].items()},
        "total_seconds": round(sum(stage["seconds"] for stage in log.data["stages"].values()), 1),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The demo's closing table: per model AP, AP50, its distance from ``fpn-fcos``'s seed mean in seed standard
    deviations, params, GMACs, CPU latency."""
    lines = ["| model | kind | AP | AP50 | AP vs fpn-fcos seeds (std) | params (M) | GMACs | CPU latency (ms) |",
             "|---|---|---|---|---|---|---|---|"]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for m in summary["models"]:
        lines.append(
            f"| {m['name']} | {m['kind']} | {fmt(m['AP'], '.3f')} | {fmt(m['AP50'], '.3f')} | "
            f"{fmt(m.get('ap_vs_baseline_sigma'), '+.1f')} | "
            f"{fmt(m['params_m'], '.2f')} | {fmt(m['gmacs'], '.4g')} | {fmt(m['latency_ms'], '.1f')} |"
        )
    return "\n".join(lines)


def format_verdict(summary: dict[str, Any]) -> str:
    """The seed noise of ``fpn-fcos`` at the full-training budget and the one-sentence verdict on the best
    searched decoder ("" when the run has none)."""
    noise, verdict = summary.get("baseline_noise"), summary.get("verdict")
    if not noise or not verdict:
        return ""
    aps = ", ".join(f"{ap:.3f}" for ap in noise["aps"])
    seeds = ", ".join(str(s) for s in noise["seeds"])
    return f"Seed noise: fpn-fcos AP {aps} (seeds {seeds}).\nVerdict: {verdict['sentence']}"

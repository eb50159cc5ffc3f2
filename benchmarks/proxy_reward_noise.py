"""How much of the proxy's reward is the architecture, and how much the training seed? (signal against noise)

A controller can only learn what the reward says about the architecture. This measures, on a given feature
cache with a search preset's proxy section, the reward of ``--genotypes`` decoders (``fpn-fcos``, ``nas-fcos``
and seeded random samples of the preset's search space) each trained with ``--seeds`` training seeds — the seed
a search with that search seed would give the candidate (:func:`nasfcos.search.runner.candidate_seed`), so seed 0
reproduces what a seed-0 search stores. Early stopping is off (every decoder runs every epoch) and the
candidates run through the search's own process executor, two 1-thread workers as in ``configs/search-cpu.yaml``.

Reported: per decoder the mean, standard deviation and range over seeds; the pooled seed-to-seed std against the
std of the decoders' means (their ratio: well above 1 means the reward ranks architectures rather than seeds);
the share of the reward's variance that the architecture explains (one-way ANOVA intra-class correlation); and
Kendall tau between the rankings that two seeds give the same decoders (1 = the seed does not change the order).

    PYTHONPATH=src .venv/bin/python benchmarks/proxy_reward_noise.py --cache runs/cache/synth-r18 \\
        [--config configs/search-cpu.yaml] [--genotypes 8] [--seeds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Mapping
from typing import Any

import _common

_common.ensure_src_on_path()

NAME = "proxy_reward_noise"


def _genotypes(space: Any, count: int, seed: int) -> dict[str, Any]:
    from nasfcos.space.presets import PRESETS

    chosen: dict[str, Any] = {}
    for name in ("fpn-fcos", "nas-fcos"):
        if len(chosen) < count:
            chosen[name] = PRESETS[name].genotype
    rng = random.Random(seed)
    keys = {g.key() for g in chosen.values()}
    while len(chosen) < count:
        genotype = space.sample(rng)
        if genotype.key() not in keys:
            keys.add(genotype.key())
            chosen[f"random-{len(chosen) - 1:02d}"] = genotype
    return chosen


def intra_class_correlation(per_model: Mapping[str, list[float]]) -> float:
    """One-way random-effects ICC(1): the share of the variance between models among all (equal group sizes)."""
    groups = [values for values in per_model.values() if len(values) > 1]
    if len(groups) < 2:
        return math.nan
    k = min(len(values) for values in groups)
    groups = [values[:k] for values in groups]
    grand = statistics.fmean(v for values in groups for v in values)
    between = k * sum((statistics.fmean(values) - grand) ** 2 for values in groups) / (len(groups) - 1)
    within = sum((v - statistics.fmean(values)) ** 2 for values in groups for v in values) / (len(groups) * (k - 1))
    return (between - within) / (between + (k - 1) * within) if between + (k - 1) * within > 0 else math.nan


def summarise(rewards: Mapping[str, Mapping[int, float]]) -> dict[str, Any]:
    """Per-decoder statistics, signal against noise and the seed-to-seed rank agreement."""
    from nasfcos.analysis.rank_stats import kendall_tau, seed_spread

    per_model = {name: [by_seed[s] for s in sorted(by_seed)] for name, by_seed in rewards.items() if by_seed}
    spread = seed_spread(per_model, [statistics.fmean(v) for v in per_model.values()])
    seeds = sorted({s for by_seed in rewards.values() for s in by_seed})
    taus = []
    for a, b in itertools.combinations(seeds, 2):
        names = [n for n, by_seed in rewards.items() if a in by_seed and b in by_seed]
        if len(names) >= 3:
            taus.append(kendall_tau([rewards[n][a] for n in names], [rewards[n][b] for n in names]))
    return {
        "per_decoder": {name: {"mean": m, "std": s, "min": lo, "max": hi, "n": n}
                        for name, (m, s, lo, hi, n) in spread.per_model.items()},
        "pooled_seed_std": spread.pooled_std, "across_decoder_std": spread.across_std,
        "across_decoder_range": spread.across_range, "signal_to_noise": spread.ratio,
        "icc": intra_class_correlation(per_model),
        "seed_pair_kendall_tau": taus, "seed_pair_kendall_tau_mean": statistics.fmean(taus) if taus else None,
    }


def markdown_of(record: Mapping[str, Any]) -> str:
    s = record["summary"]
    rows = [[name, d["mean"], d["std"], f"{_common.fmt(d['min'])} to {_common.fmt(d['max'])}", d["n"]]
            for name, d in sorted(s["per_decoder"].items(), key=lambda kv: -kv[1]["mean"])]
    cfg = record["settings"]
    taus = ", ".join(_common.fmt(t) for t in s["seed_pair_kendall_tau"]) or "n/a"
    return _common.markdown_report(
        record, "# Proxy reward: architecture against training seed",
        f"Cache `{cfg['cache']}`, proxy of `{cfg['config']}` (width {cfg['proxy']['width']}, "
        f"{cfg['proxy']['epochs']} epochs, batch {cfg['proxy']['batch_size']}, early stopping off), "
        f"{len(s['per_decoder'])} decoders x {len(cfg['seeds'])} seeds, reward = minus the meta-val loss.",
        _common.markdown_table(["decoder", "mean reward", "seed std", "range", "seeds"], rows),
        f"Pooled seed-to-seed std **{_common.fmt(s['pooled_seed_std'])}**; std of the decoders' means "
        f"**{_common.fmt(s['across_decoder_std'])}** (range {_common.fmt(s['across_decoder_range'])}); ratio "
        f"**{_common.fmt(s['signal_to_noise'])}**; the architecture explains {_common.fmt(s['icc'])} of the "
        f"reward's variance (ICC(1)); Kendall tau between the decoder rankings of two seeds: {taus}.",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="feature cache folder (nasfcos cache)")
    parser.add_argument("--config", default=str(_common.ROOT / "configs" / "search-cpu.yaml"),
                        help="search preset whose proxy and space sections are used (default configs/search-cpu.yaml)")
    parser.add_argument("--genotypes", type=int, default=8, help="decoders: fpn-fcos, nas-fcos, then random (default 8)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per decoder (default 3)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the random decoders (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one thread each (default 2)")
    _common.add_common_arguments(parser, threads=1)
    args = parser.parse_args(argv)

    from nasfcos.search.config import build_search_space, load_search_run_config
    from nasfcos.search.executors import build_executor
    from nasfcos.search.runner import CandidateTask, candidate_seed

    threads = _common.set_threads(args.threads)
    overrides = ["proxy.early_stop=false"] + (["proxy.epochs=1", "proxy.max_train_batches=1"] if args.quick else [])
    cfg = load_search_run_config(args.config, overrides=overrides)
    count, seeds = (3, [0, 1]) if args.quick else (args.genotypes, list(range(args.seeds)))
    genotypes = _genotypes(build_search_space(cfg.search.space), count, args.sample_seed)
    cache = os.path.abspath(args.cache)
    record = _common.start_record(NAME, {
        "config": _common.display_path(args.config), "cache": _common.display_path(args.cache),
        "genotypes": list(genotypes), "seeds": seeds, "workers": args.workers,
        "proxy": {k: getattr(cfg.proxy, k) for k in ("width", "epochs", "batch_size", "lr")},
        "keys": {name: g.key() for name, g in genotypes.items()},
    }, threads, own_threads=args.workers)
    started = time.perf_counter()
    tasks, names = [], {}
    for index, ((name, genotype), seed) in enumerate(itertools.product(genotypes.items(), seeds)):
        tasks.append(CandidateTask(index=index, key=f"{genotype.key()}@{seed}", genotype_json=genotype.to_json(indent=None),
                                   actions=(), seed=candidate_seed(seed, genotype.key()), cache_path=cache,
                                   proxy_cfg=dataclasses.replace(cfg.proxy, threads=1)))
        names[index] = (name, seed)
    rewards: dict[str, dict[int, float]] = {name: {} for name in genotypes}
    failures: list[str] = []
    with build_executor("process", workers=args.workers, threads=1) as executor:
        for done, (task, result) in enumerate(executor.map_candidates(tasks), start=1):
            name, seed = names[task.index]
            if result.status == "ok" and result.reward is not None:
                rewards[name][seed] = float(result.reward)
            else:
                failures.append(f"{name} seed {seed}: {result.error}")
            print(f"[{done}/{len(tasks)}] {name} seed {seed}: {result.status} reward {result.reward}", flush=True)
    record["rewards"] = rewards
    record["failures"] = failures
    record["summary"] = summarise(rewards)
    return _common.conclude(record, started, markdown_of, args.out_dir,
                            robust="rewards do not depend on the load")


if __name__ == "__main__":
    main()
    sys.exit(0)

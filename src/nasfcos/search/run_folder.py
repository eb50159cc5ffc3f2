"""A search's run folder: ``config.yaml`` (checked on resume), the feature cache it searches on, ``topk/``.

``config.yaml`` is the resolved :class:`~nasfcos.search.config.SearchRunConfig`. A new run refuses a folder
that already holds a search; a resumed run must agree with it except for the keys in
:data:`~nasfcos.search.config.RESUMABLE_KEYS` (a changed resumable key is written back). The store remembers
the cache's fingerprint, so a resumed search cannot silently continue on different features (the cache may
move: only its content counts). ``topk/rankNN.json`` are the best genotypes (loadable by
``nasfcos train --arch``) and ``topk/topk.json`` their numbers, rewritten atomically after every batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from nasfcos.config import config_to_dict, dump_config
from nasfcos.errors import UserError
from nasfcos.io import atomic_write_json, atomic_write_text
from nasfcos.search.config import RESUMABLE_KEYS, SearchRunConfig
from nasfcos.search.store import CandidateRecord, ResultStore

__all__ = ["CONFIG_FILE", "STORE_FILE", "TOPK_DIR", "check_cache", "prepare_run_dir", "resolve_cache",
           "write_topk"]

CONFIG_FILE = "config.yaml"
STORE_FILE = "store.sqlite"
TOPK_DIR = "topk"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, tuple):
        data = list(data)
    return {prefix: data}


def _check_resume_config(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Raise :class:`UserError` naming the first key that differs (outside :data:`RESUMABLE_KEYS`); returns
    whether a resumable key changed (the file is then rewritten)."""
    # A key the saved file lacks (a setting added after the run started) counts as its default value.
    old = {**_flatten(config_to_dict(SearchRunConfig())), **_flatten(saved)}
    new = _flatten(current)
    changed = False
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<missing>") == new.get(key, "<missing>"):
            continue
        if key in RESUMABLE_KEYS:
            changed = True
            continue
        raise UserError(
            f"{path}: {key} differs from the run being resumed (run has {old.get(key, '<missing>')!r}, "
            f"now {new.get(key, '<missing>')!r}); resume with the run's own settings or start a new run"
        )
    return changed


def prepare_run_dir(run_dir: Path, cfg: SearchRunConfig, resume: bool) -> None:
    config_path = run_dir / CONFIG_FILE
    if resume:
        if not config_path.is_file():
            raise UserError(f"{run_dir}: not a search run folder (no {CONFIG_FILE}); cannot resume it")
        import yaml

        try:
            saved = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{config_path}: malformed YAML ({str(exc).splitlines()[0]})") from None
        if _check_resume_config(config_path, saved, config_to_dict(cfg)):
            dump_config(cfg, config_path)
        return
    if config_path.exists() or (run_dir / STORE_FILE).exists():
        raise UserError(f"{run_dir}: already holds a search; continue it with --resume {run_dir} or choose "
                        "another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, config_path)


def resolve_cache(cfg: SearchRunConfig, using_proxy: bool) -> SearchRunConfig:
    """``cfg`` with its cache as an absolute path (workers, on other nodes too, get that path), checked before
    anything is created: the proxy needs a cache; a run whose own evaluator needs none may have none."""
    if cfg.cache is None:
        if using_proxy:
            raise UserError("cache: required (the feature cache folder built by `nasfcos cache`) unless an "
                            "evaluator of your own scores the candidates")
        return cfg
    cfg = replace(cfg, cache=os.path.abspath(cfg.cache))
    if not Path(cfg.cache).exists():
        raise UserError(f"{cfg.cache}: feature cache not found (build one with `nasfcos cache`)")
    return cfg


def check_cache(cfg: SearchRunConfig, store: ResultStore, using_proxy: bool) -> None:
    """With the real proxy the cache (already found by :func:`resolve_cache`) must open, hold the FCOS targets
    the proxy trains on and have the fingerprint the run started with."""
    if not using_proxy:
        return
    cache_path = Path(str(cfg.cache))
    from nasfcos.data.cache import FeatureCache

    cache = FeatureCache.open(cache_path)
    cache.target_suffix(cfg.proxy.fcos)  # UserError when the cache lacks these targets
    saved = store.get_meta("cache_fingerprint")
    if saved is None:
        store.set_meta("cache_fingerprint", cache.fingerprint)
    elif saved != cache.fingerprint:
        raise UserError(
            f"{cache_path}: feature cache differs from the one this search started with "
            f"(fingerprint {cache.fingerprint}, run has {saved}); rewards would not be comparable"
        )


def write_topk(folder: str | Path, records: list[CandidateRecord]) -> list[Path]:
    """``rank01.json``... (genotype JSON, best first) and ``topk.json`` (their numbers), all atomic; stale
    rank files from a larger earlier list are removed."""
    from nasfcos.space.genotype import Genotype

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(len(records))))
    paths: list[Path] = []
    entries = []
    for rank, record in enumerate(records, start=1):
        path = folder / f"rank{rank:0{width}d}.json"
        atomic_write_text(path, Genotype.from_json(record.genotype_json).to_json())
        paths.append(path)
        numbers = {k: v for k, v in record.to_dict().items() if k not in ("genotype_json", "actions", "history",
                                                                           "id", "created_at")}
        entries.append({"rank": rank, "file": path.name, **numbers, "loss_sum": record.loss_sum,
                        "index": record.id})
    atomic_write_json(folder / "topk.json", entries)
    keep = {p.name for p in paths}
    for stale in folder.glob("rank*.json"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return paths

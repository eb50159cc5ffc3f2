"""The proxy task: seeded rewards, the pooled meta-val loss, failures recorded (never raised), early stopping,
the AP reward, decoder cost and the presets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nasfcos.config import load_config
from nasfcos.data.cache import FeatureCache, SplitTensors, build_cache
from nasfcos.data.synthetic import make_synthetic, read_synthetic
from nasfcos.errors import UserError
from nasfcos.search.proxy import (
    EvaluationResult,
    EarlyStopReference,
    ProxyConfig,
    _average_precision,
    decoder_cost,
    evaluate_candidate,
)
from nasfcos.space.presets import PRESETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FPN_FCOS = PRESETS["fpn-fcos"].genotype
TINY = ProxyConfig(width=16, epochs=2, batch_size=4, threads=1, device="cpu", early_stop=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> FeatureCache:
    root = tmp_path_factory.mktemp("proxy")
    info = make_synthetic(root / "synth", seed=0, num_train=12, num_val=6, image_size=128)
    dataset = read_synthetic(info, "train")
    return build_cache(dataset, root / "cache", backbone="resnet18", crop=128, meta_train=8, meta_val=4, seed=0,
                       batch_size=6, threads=1, progress=False)


def test_reward_is_finite_seeded_and_minus_the_meta_val_loss(cache: FeatureCache) -> None:
    first = evaluate_candidate(FPN_FCOS, cache, TINY, seed=0)
    assert first.status == "ok" and first.error is None
    assert math.isfinite(first.reward)
    assert first.reward == pytest.approx(-(first.loss_cls + first.loss_reg + first.loss_ctr))
    assert first.loss_cls > 0 and first.loss_reg > 0 and first.loss_ctr > 0
    assert first.epochs_run == 2 and [h["epoch"] for h in first.history] == [1, 2]
    assert first.history[-1]["val_loss"] == pytest.approx(-first.reward)
    assert first.ap is None and first.wall_time_s > 0
    again = evaluate_candidate(FPN_FCOS, str(cache.path), TINY, seed=0)
    assert again.reward == first.reward
    other = evaluate_candidate(FPN_FCOS, cache, TINY, seed=1)
    assert other.reward != first.reward
    # Training changes the decoder: the meta-val loss differs from an untrained decoder's (epochs=1, lr tiny).
    untrained = evaluate_candidate(FPN_FCOS, cache, ProxyConfig(**{**TINY.__dict__, "lr": 1e-12}), seed=0)
    assert untrained.reward != first.reward


def test_meta_val_loss_does_not_depend_on_the_validation_batch_size(cache: FeatureCache) -> None:
    """The reward pools numerators and normalisers over all of meta-val (one batch of everything)."""
    one = evaluate_candidate(FPN_FCOS, cache, ProxyConfig(**{**TINY.__dict__, "val_batch_size": 1}), seed=0)
    whole = evaluate_candidate(FPN_FCOS, cache, ProxyConfig(**{**TINY.__dict__, "val_batch_size": 64}), seed=0)
    assert one.loss_cls == pytest.approx(whole.loss_cls, rel=1e-5)
    assert one.loss_reg == pytest.approx(whole.loss_reg, rel=1e-5)
    assert one.loss_ctr == pytest.approx(whole.loss_ctr, rel=1e-5)


def test_searched_genotype_trains_and_cost_matches_the_decoder(cache: FeatureCache) -> None:
    from nasfcos.nn.decoder import Decoder

    genotype = PRESETS["nas-fcos"].genotype
    cfg = ProxyConfig(**{**TINY.__dict__, "epochs": 1, "max_train_batches": 1})
    result = evaluate_candidate(genotype, cache, cfg, seed=0)
    assert result.status == "ok", result.error
    params, gmacs = decoder_cost(genotype, cache, 16)
    decoder = Decoder(genotype, cache.channels, cache.num_classes, 16, 16)
    assert params == sum(p.numel() for p in decoder.parameters())
    assert (result.params, result.gmacs) == (params, pytest.approx(gmacs))
    # Twice the input area at P3..P5 -> MACs grow, parameters do not; wider decoders cost more.
    assert decoder_cost(genotype, cache.manifest, 32)[1] > gmacs
    assert decoder_cost(genotype, cache.path, 32)[0] > params


def test_non_finite_loss_is_recorded_as_failed(cache: FeatureCache, monkeypatch: pytest.MonkeyPatch) -> None:
    from nasfcos.nn.decoder import Decoder

    original = Decoder.forward

    def nan_forward(self, features):
        out = original(self, features)
        return type(out)([x * float("nan") for x in out.cls_logits], out.bbox_reg, out.centerness)

    monkeypatch.setattr(Decoder, "forward", nan_forward)
    result = evaluate_candidate(FPN_FCOS, cache, ProxyConfig(**{**TINY.__dict__, "failure_reward": -50.0}), seed=0)
    assert result.status == "failed"
    assert result.error.startswith("FloatingPointError: non-finite training loss")
    assert result.reward == -50.0 and result.epochs_run == 0
    assert result.params is not None  # what was known before the failure is kept


def test_exploding_learning_rate_is_failed_not_raised(cache: FeatureCache) -> None:
    result = evaluate_candidate(FPN_FCOS, cache, ProxyConfig(**{**TINY.__dict__, "lr": 1e6}), seed=0)
    assert result.status == "failed" and result.reward is None
    assert "non-finite" in result.error


def test_exceptions_and_out_of_memory_are_failed(cache: FeatureCache, monkeypatch: pytest.MonkeyPatch) -> None:
    from nasfcos.nn.decoder import Decoder

    def oom(self, features):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(Decoder, "forward", oom)
    result = evaluate_candidate(FPN_FCOS, cache, TINY, seed=0)
    assert result.status == "failed"
    assert result.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    monkeypatch.undo()
    # A genotype the decoder cannot build is the candidate's failure too.
    broken = type(FPN_FCOS)(fpn=FPN_FCOS.fpn, head=type(FPN_FCOS.head)(ops=("nope",), share_from=(0,) * 5))
    result = evaluate_candidate(broken, cache, TINY, seed=0)
    assert result.status == "failed" and result.error.startswith("UserError")


def test_cache_problems_raise_user_errors(cache: FeatureCache, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        evaluate_candidate(FPN_FCOS, tmp_path / "missing", TINY, seed=0)
    with pytest.raises(UserError, match="improved"):
        evaluate_candidate(FPN_FCOS, cache, ProxyConfig(**{**TINY.__dict__, "fcos": "improved"}), seed=0)
    with pytest.raises(UserError, match="device: unknown device 'tpu'"):
        evaluate_candidate(FPN_FCOS, cache, TINY, seed=0, device="tpu")


def test_early_stopping_prunes_against_a_low_reference(cache: FeatureCache) -> None:
    cfg = ProxyConfig(**{**TINY.__dict__, "epochs": 3, "early_stop": True, "early_stop_epoch": 1,
                         "early_stop_min_samples": 3})
    low = EarlyStopReference(epoch=1, count=10, mean=1e-3, var=0.0)
    pruned = evaluate_candidate(FPN_FCOS, cache, cfg, seed=0, early_stop_reference=low)
    assert pruned.status == "pruned" and pruned.epochs_run == 1
    assert pruned.reward == pytest.approx(-pruned.early_stop_loss)
    assert pruned.history[0]["val_loss"] == pruned.early_stop_loss
    high = {"epoch": 1, "count": 10, "mean": 1e6, "var": 0.0}
    full = evaluate_candidate(FPN_FCOS, cache, cfg, seed=0, early_stop_reference=high)
    assert full.status == "ok" and full.epochs_run == 3
    assert full.early_stop_loss == pytest.approx(pruned.early_stop_loss)  # same seed, same first epoch
    assert full.reward > pruned.reward  # two more epochs of training lower the loss here
    cold = EarlyStopReference(epoch=1, count=2, mean=1e-3)  # too few samples: never prunes
    assert evaluate_candidate(FPN_FCOS, cache, cfg, seed=0, early_stop_reference=cold).status == "ok"


def test_early_stop_reference_statistics() -> None:
    ref = EarlyStopReference(epoch=2, decay=0.9)
    values = [3.0, 2.0, 2.5, 4.0, 3.5]
    for value in values:
        assert ref.update(value)
    # Plain mean and (population) variance while count < 1 / (1 - decay).
    assert ref.mean == pytest.approx(np.mean(values)) and ref.var == pytest.approx(np.var(values))
    assert ref.best == 2.0 and ref.count == 5
    assert ref.threshold(1.5, min_samples=6) is None
    assert ref.threshold(1.5, min_samples=5) == pytest.approx(np.mean(values) + 1.5 * np.std(values))
    assert ref.should_stop(10.0, 1.5) and not ref.should_stop(3.0, 1.5) and ref.should_stop(float("nan"), 1.5)
    assert not ref.update(EvaluationResult(status="failed", reward=None, early_stop_loss=1.0))
    assert not ref.update(float("inf"))
    assert ref.update(EvaluationResult(status="pruned", reward=-9.0, early_stop_loss=9.0)) and ref.count == 6
    assert EarlyStopReference.from_dict(ref.to_dict()) == ref
    # After 1 / (1 - decay) samples the average is exponential: a new value moves it by (1 - decay).
    for _ in range(20):
        ref.update(1.0)
    before = ref.mean
    ref.update(2.0)
    assert ref.mean == pytest.approx(before + 0.1 * (2.0 - before))
    # Identical losses: the 1 % floor on the standard deviation keeps near-equal candidates alive.
    flat = EarlyStopReference(epoch=1)
    for _ in range(5):
        flat.update(2.0)
    assert not flat.should_stop(2.01, 1.0) and flat.should_stop(2.05, 1.0)


def test_ap_reward_lies_in_unit_interval(cache: FeatureCache) -> None:
    result = evaluate_candidate(FPN_FCOS, cache, ProxyConfig(**{**TINY.__dict__, "reward": "ap"}), seed=0)
    assert result.status == "ok", result.error
    assert 0.0 <= result.ap <= 1.0 and result.reward == result.ap
    assert math.isfinite(result.loss_cls)


def test_ap_of_the_ground_truth_itself_is_one(cache: FeatureCache) -> None:
    """The AP path (crop GT export + COCO evaluation) scores perfect detections 1."""
    data = SplitTensors(cache, "val", "vanilla", torch.device("cpu"), False, False)
    positions = list(range(len(cache.val)))
    perfect = [{"boxes": g["boxes"], "scores": torch.ones(len(g["boxes"])), "labels": g["labels"]}
               for g in cache.val.gt(positions)]
    assert _average_precision(cache, data, perfect, positions) == pytest.approx(1.0)
    shifted = [{**d, "boxes": d["boxes"] + 40.0} for d in perfect]
    assert _average_precision(cache, data, shifted, positions) < 0.5


def test_presets_load_and_bad_values_are_user_errors() -> None:
    paper = load_config(ProxyConfig, CONFIGS / "proxy-paper.yaml")
    assert (paper.width, paper.epochs, paper.batch_size, paper.lr, paper.polyak_decay, paper.reward) == (
        64, 15, 200, 8e-4, 0.9, "loss")
    cpu = load_config(ProxyConfig, CONFIGS / "proxy-cpu.yaml", ["epochs=2"])
    assert cpu.epochs == 2 and cpu.width < paper.width and cpu.batch_size < paper.batch_size
    with pytest.raises(UserError, match="width"):
        load_config(ProxyConfig, None, ["width=3"])
    with pytest.raises(UserError, match="reward"):
        load_config(ProxyConfig, None, ["reward=accuracy"])


def test_result_serialises_and_fills_a_store_row() -> None:
    from nasfcos.search.store import CandidateRecord

    result = EvaluationResult(status="pruned", reward=-3.0, loss_cls=1.0, loss_reg=1.5, loss_ctr=0.5, gmacs=0.1,
                              params=10, wall_time_s=2.0, epochs_run=2, history=[{"epoch": 1, "train_loss": 4.0,
                                                                                  "val_loss": 3.5}])
    assert EvaluationResult.from_dict(result.to_dict()) == result
    assert result.loss_sum == pytest.approx(3.0)
    row = CandidateRecord.of("k", "{}", (0,), result)
    assert row.status == "pruned" and row.reward == -3.0 and row.loss_sum == pytest.approx(3.0)
    assert row.evaluation == result and row.history == result.history


def test_batches_cover_every_image_once() -> None:
    from nasfcos.search.proxy import _batches

    for size, batch in ((4, 1), (9, 4), (10, 3), (8, 8), (1, 4)):
        for generator in (None, torch.Generator().manual_seed(size)):
            chunks = _batches(size, batch, generator)
            assert sorted(np.concatenate(chunks).tolist()) == list(range(size))
            assert all((np.diff(c) > 0).all() for c in chunks)  # sorted within a batch (ascending memmap reads)
            if batch >= 2:  # no trailing single-image batch (BatchNorm)
                assert len(chunks) == 1 or min(len(c) for c in chunks) >= 2


def test_improved_fcos_targets_are_cached_and_trainable(tmp_path: Path) -> None:
    info = make_synthetic(tmp_path / "synth", seed=2, num_train=6, num_val=1, image_size=64)
    dataset = read_synthetic(info, "train")
    cache = build_cache(dataset, tmp_path / "cache", backbone="resnet18", crop=64, meta_train=4, meta_val=2,
                        fcos="improved", batch_size=6, threads=1, progress=False)
    assert cache.fcos_modes == ("vanilla", "improved")
    vanilla, improved = cache.train.targets(range(4)), cache.train.targets(range(4), "improved")
    # Centre sampling only removes positives (a centre-region point is always inside the box).
    assert ((improved.labels >= 0) <= (vanilla.labels >= 0)).all()
    assert (improved.labels >= 0).sum() < (vanilla.labels >= 0).sum()
    result = evaluate_candidate(FPN_FCOS, cache, ProxyConfig(**{**TINY.__dict__, "fcos": "improved"}), seed=0)
    assert result.status == "ok" and math.isfinite(result.reward), result.error

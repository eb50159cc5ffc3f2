"""Config system: paper defaults, YAML loading, typed overrides, one-line user errors, round trips."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from nasfcos.config import (
    DataConfig,
    ModelConfig,
    RuntimeConfig,
    SolverConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from nasfcos.errors import UserError


# A section tree defined outside nasfcos.config, the way search modules will add ProxyConfig/SearchConfig.
@dataclass(frozen=True)
class InnerConfig:
    epochs: int = 15
    lr: float = 8e-4
    sizes: tuple[int, int] = (384, 384)
    names: list[str] = field(default_factory=lambda: ["a"])
    weights: dict[str, float] = field(default_factory=dict)
    mode: Literal["x", "y"] = "x"
    limit: Optional[int] = None
    path: str | None = None


@dataclass(frozen=True)
class OuterConfig:
    inner: InnerConfig = field(default_factory=InnerConfig)
    seed: int = 1
    verbose: bool = False


def write(tmp_path, text: str, name: str = "x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_paper_recipe():
    cfg = load_config(TrainConfig)
    s = cfg.solver
    assert (s.batch_size, s.base_lr, s.momentum, s.weight_decay) == (16, 0.01, 0.9, 1e-4)
    assert (s.bias_lr_factor, s.bias_weight_decay) == (2.0, 0.0)
    assert (s.warmup_iters, s.warmup_factor, s.warmup_method) == (500, 1 / 3, "linear")
    assert (s.max_iter, s.steps, s.gamma) == (90000, (60000, 80000), 0.1)
    assert s.grad_clip_norm is None and s.amp is False
    assert (cfg.data.min_size, cfg.data.max_size, cfg.data.flip_prob) == ((800,), 1333, 0.5)
    m = cfg.model
    assert (m.arch, m.backbone, m.fcos, m.freeze_at, m.frozen_bn) == ("nas-fcos", "resnet50", "vanilla", 2, True)
    assert (m.score_thresh, m.pre_nms_top_n, m.nms_thresh, m.detections_per_img) == (0.05, 1000, 0.6, 100)
    assert m.num_classes is None
    assert cfg == TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.solver.base_lr = 1.0  # type: ignore[misc]


def test_yaml_file_and_overrides_layer(tmp_path):
    path = write(tmp_path, "solver:\n  base_lr: 0.02\n  steps: [100, 200]\n  max_iter: 300\n"
                           "data:\n  format: voc\n  min_size: 640\n")
    cfg = load_config(TrainConfig, path, ["solver.base_lr=5e-3", "runtime.threads=2"])
    assert cfg.solver.base_lr == 0.005  # the override wins over the file
    assert cfg.solver.steps == (100, 200) and isinstance(cfg.solver.steps, tuple)
    assert cfg.solver.max_iter == 300
    assert cfg.data.format == "voc" and cfg.data.min_size == (640,)
    assert cfg.runtime.threads == 2
    assert cfg.solver.momentum == 0.9  # untouched keys keep defaults


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(TrainConfig, write(tmp_path, "")) == TrainConfig()
    assert load_config(TrainConfig, write(tmp_path, "solver:\n# nothing yet\n", "s.yaml")) == TrainConfig()


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ("solver.base_lr=0.02", lambda c: c.solver.base_lr == 0.02),
        ("solver.weight_decay=1e-4", lambda c: c.solver.weight_decay == 1e-4),  # YAML 1.1 would read a string
        ("solver.warmup_factor=1/3", lambda c: c.solver.warmup_factor == 1 / 3),
        ("solver.max_iter=1_000", lambda c: c.solver.max_iter == 1000),
        ("solver.max_iter=2e3", lambda c: c.solver.max_iter == 2000),
        ("solver.steps=1000,2000", lambda c: c.solver.steps == (1000, 2000)),
        ("solver.steps=[1000, 2000]", lambda c: c.solver.steps == (1000, 2000)),
        ("solver.steps=(1000,)", lambda c: c.solver.steps == (1000,)),
        ("solver.steps=", lambda c: c.solver.steps == ()),
        ("data.min_size=800", lambda c: c.data.min_size == (800,)),
        ("solver.amp=true", lambda c: c.solver.amp is True),
        ("solver.amp=Off", lambda c: c.solver.amp is False),
        ("solver.grad_clip_norm=35", lambda c: c.solver.grad_clip_norm == 35.0),
        ("solver.grad_clip_norm=null", lambda c: c.solver.grad_clip_norm is None),
        ("model.num_classes=20", lambda c: c.model.num_classes == 20),
        ("model.num_classes=None", lambda c: c.model.num_classes is None),
        ("model.concat=dense", lambda c: c.model.concat == "dense"),
        ("model.pretrained=/w/r50.pth", lambda c: c.model.pretrained == "/w/r50.pth"),
        ("model.arch=weights=1.json", lambda c: c.model.arch == "weights=1.json"),  # '=' inside the value
        ("runtime.run_name=2024", lambda c: c.runtime.run_name == "2024"),  # str field keeps text
        ("solver={base_lr: 0.5, max_iter: 10}", lambda c: (c.solver.base_lr, c.solver.max_iter,
                                                           c.solver.momentum) == (0.5, 10, 0.9)),
    ],
)
def test_override_parsing_by_field_type(override, check):
    cfg = load_config(TrainConfig, overrides=[override])
    assert check(cfg)


def test_unknown_key_in_file_names_file_path_and_valid_keys(tmp_path):
    path = write(tmp_path, "solver:\n  lrr: 0.1\n")
    with pytest.raises(UserError) as info:
        load_config(TrainConfig, path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown key 'solver.lrr'; valid keys in 'solver': batch_size, base_lr")
    assert "\n" not in message
    with pytest.raises(UserError, match=r"unknown key 'solvr'; valid keys at the top level: model, data"):
        load_config(TrainConfig, write(tmp_path, "solvr: {}\n", "y.yaml"))


def test_unknown_key_in_override():
    with pytest.raises(UserError, match=r"^--set runtime.sed=3: unknown key 'runtime.sed'; valid keys in "
                                        r"'runtime': seed, num_workers"):
        load_config(TrainConfig, overrides=["runtime.sed=3"])


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("solver:\n  base_lr: abc\n", r"solver\.base_lr: expected float \(got 'abc'\)"),
        ("solver:\n  max_iter: 1.5\n", r"solver\.max_iter: expected int \(got 1\.5\)"),
        ("solver:\n  amp: maybe\n", r"solver\.amp: expected bool \(got 'maybe'\)"),
        ("solver:\n  batch_size: true\n", r"solver\.batch_size: expected int \(got True\)"),
        ("solver:\n  steps: [1, x]\n", r"solver\.steps\[1\]: expected int \(got 'x'\)"),
        ("model:\n  fcos: fancy\n", r"model\.fcos: expected one of 'vanilla', 'improved' \(got 'fancy'\)"),
        ("solver: 3\n", r"expected a mapping for section 'solver' \(got 3\)"),
        ("solver:\n  steps: [80000, 60000]\n", r"solver\.steps: got \(80000, 60000\); expected positive"),
        ("solver:\n  momentum: 1.5\n", r"solver\.momentum: got 1\.5; expected in \[0, 1\)"),
        ("data:\n  max_size: 100\n", r"data\.max_size: got 100; expected >= every min_size"),
        ("- a\n- b\n", r"expected a mapping of sections at the top level"),
        ("solver: [\n", r"malformed YAML at line"),
    ],
)
def test_bad_values_are_one_line_user_errors(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=pattern) as info:
        load_config(TrainConfig, path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("solver.base_lr", r"expected KEY=VALUE"),
        ("solver..base_lr=1", r"malformed key"),
        ("solver.base_lr=fast", r"solver\.base_lr: expected float \(got 'fast'\)"),
        ("solver.base_lr.x=1", r"'solver\.base_lr' is a value, not a section"),
        ("solver=3", r"'solver' is a section"),
        ("model.num_classes=many", r"model\.num_classes: expected int or null \(got 'many'\)"),
        ("solver.warmup_iters=-1", r"solver\.warmup_iters: got -1; expected >= 0"),
    ],
)
def test_bad_overrides(override, pattern):
    with pytest.raises(UserError, match=pattern) as info:
        load_config(TrainConfig, overrides=[override])
    assert "\n" not in str(info.value)


def test_missing_file():
    with pytest.raises(UserError, match=r"nope\.yaml: config file not found"):
        load_config(TrainConfig, "nope.yaml")


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(TrainConfig, overrides=["solver.steps=10,20", "data.min_size=640,672,704",
                                              "solver.warmup_factor=1/3", "model.num_classes=3",
                                              "solver.grad_clip_norm=35", "runtime.run_name=demo"])
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert load_config(TrainConfig, path) == cfg
    plain = config_to_dict(cfg)
    assert plain["solver"]["steps"] == [10, 20] and plain["data"]["min_size"] == [640, 672, 704]
    assert config_from_dict(TrainConfig, plain) == cfg


def test_generic_loader_on_foreign_dataclass_tree(tmp_path):
    path = write(tmp_path, "inner:\n  epochs: 5\n  lr: '1e-3'\n  sizes: [320, 256]\n  names: [p, q]\n"
                           "  weights: {cls: 1, reg: 0.5}\n  mode: y\nseed: 7\n")
    cfg = load_config(OuterConfig, path, ["inner.limit=10", "verbose=yes", "inner.path=none",
                                          "inner.names=x,y,z", "inner.weights={cls: 2}"])
    assert cfg.inner == InnerConfig(epochs=5, lr=1e-3, sizes=(320, 256), names=["x", "y", "z"],
                                    weights={"cls": 2.0}, mode="y", limit=10, path=None)
    assert cfg.seed == 7 and cfg.verbose is True
    with pytest.raises(UserError, match=r"inner\.sizes: expected 2 values"):
        load_config(OuterConfig, overrides=["inner.sizes=1,2,3"])
    with pytest.raises(UserError, match=r"inner\.weights\.cls: expected float"):
        load_config(OuterConfig, overrides=["inner.weights={cls: big}"])
    with pytest.raises(UserError, match=r"unknown key 'inner\.epoch'; valid keys in 'inner': epochs, lr, sizes"):
        load_config(OuterConfig, overrides=["inner.epoch=3"])
    dump_config(cfg, tmp_path / "outer.yaml")
    assert load_config(OuterConfig, tmp_path / "outer.yaml") == cfg


def test_overrides_apply_in_order_and_to_existing_configs():
    cfg = apply_overrides(TrainConfig(), ["solver.base_lr=0.1", "solver.base_lr=0.2"])
    assert cfg.solver.base_lr == 0.2
    assert parse_override(" solver.steps = 1,2 ") == (["solver", "steps"], "1,2")


def test_sections_are_distinct_types():
    cfg = TrainConfig()
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.solver, SolverConfig) and isinstance(cfg.runtime, RuntimeConfig)
    with pytest.raises(TypeError):
        load_config(dict)  # type: ignore[arg-type]

"""SGD with the FCOS parameter groups (FACTS 4).

The FCOS recipe trains biases with twice the learning rate and no weight decay; everything else uses the
base learning rate and weight decay 1e-4. Norm-layer weights (BN in the FPN, GN in the head) get the normal
weight decay in the released recipe; ``norm_weight_decay`` lets a run change that (0 is common elsewhere).
Frozen parameters (``requires_grad=False``: the backbone stem and first stage, frozen BN) are left out, so
the optimiser holds no state for them and a checkpoint stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from nasfcos.config import SolverConfig

__all__ = ["NORM_TYPES", "build_optimizer", "build_optimizer_from_config", "param_groups"]

#: Module types whose ``weight`` is a normalisation scale (``norm_weight_decay`` applies to it).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    bias_lr_factor: float = 2.0,
    bias_weight_decay: float = 0.0,
    norm_weight_decay: float | None = None,
) -> list[dict]:
    """Trainable parameters split into named groups ``default``, ``bias`` and (optionally) ``norm``.

    A parameter is a bias when its attribute name is ``bias`` (norm-layer biases included, as in the released
    recipe). Norm weights form their own group only when ``norm_weight_decay`` is given. Each parameter
    appears once even when shared between modules; empty groups are dropped.
    """
    seen: set[int] = set()
    default: list[nn.Parameter] = []
    bias: list[nn.Parameter] = []
    norm: list[nn.Parameter] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if name == "bias":
                bias.append(param)
            elif norm_weight_decay is not None and isinstance(module, NORM_TYPES):
                norm.append(param)
            else:
                default.append(param)
    groups = [
        {"name": "default", "params": default, "lr": base_lr, "weight_decay": weight_decay},
        {"name": "bias", "params": bias, "lr": base_lr * bias_lr_factor, "weight_decay": bias_weight_decay},
        {"name": "norm", "params": norm, "lr": base_lr,
         "weight_decay": weight_decay if norm_weight_decay is None else norm_weight_decay},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: nn.Module,
    base_lr: float,
    momentum: float,
    weight_decay: float,
    bias_lr_factor: float = 2.0,
    bias_weight_decay: float = 0.0,
    norm_weight_decay: float | None = None,
) -> torch.optim.SGD:
    """SGD over :func:`param_groups`; raises ``ValueError`` when the model has no trainable parameter."""
    groups = param_groups(model, base_lr, weight_decay, bias_lr_factor, bias_weight_decay, norm_weight_decay)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay)


def build_optimizer_from_config(model: nn.Module, solver: SolverConfig) -> torch.optim.SGD:
    """:func:`build_optimizer` with the values of a ``SolverConfig``."""
    return build_optimizer(
        model,
        base_lr=solver.base_lr,
        momentum=solver.momentum,
        weight_decay=solver.weight_decay,
        bias_lr_factor=solver.bias_lr_factor,
        bias_weight_decay=solver.bias_weight_decay,
        norm_weight_decay=solver.norm_weight_decay,
    )

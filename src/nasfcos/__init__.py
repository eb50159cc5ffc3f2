"""nasfcos: NAS-FCOS end to end — search an FCOS detector's FPN and head, train, evaluate, profile, report.

The architecture types (``Genotype``, ``SearchSpace``, ``PRESETS``) are plain data and import without torch;
``build_detector`` and ``profile`` import torch on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Genotype": ("nasfcos.space.genotype", "Genotype"),
    "FPNCell": ("nasfcos.space.genotype", "FPNCell"),
    "HeadCell": ("nasfcos.space.genotype", "HeadCell"),
    "PlainFPN": ("nasfcos.space.genotype", "PlainFPN"),
    "SequentialHead": ("nasfcos.space.genotype", "SequentialHead"),
    "CellHead": ("nasfcos.space.genotype", "CellHead"),
    "SearchSpace": ("nasfcos.space.search_space", "SearchSpace"),
    "PRESETS": ("nasfcos.space.presets", "PRESETS"),
    "build_detector": ("nasfcos.detection.detector", "build_detector"),
    "profile": ("nasfcos.analysis.profile", "profile"),
    "export_onnx": ("nasfcos.export.exporter", "export_onnx"),
    "UserError": ("nasfcos.errors", "UserError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import public names on first use so that ``import nasfcos`` stays light."""
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attribute)
        globals()[name] = value
        return value
    if name in {"detection", "space", "nn", "data", "search", "train", "analysis", "export"}:
        import importlib

        return importlib.import_module(f"nasfcos.{name}")
    raise AttributeError(f"module 'nasfcos' has no attribute {name!r}")

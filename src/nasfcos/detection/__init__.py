"""FCOS detection: points, target assignment, losses, post-processing, the detector module, its spec and its
weights files.

``nasfcos.detection.assign_targets`` is the public target-assignment function (see its docstring for the
signature); the detector is built with :func:`nasfcos.build_detector` from a
:class:`~nasfcos.detection.spec.DetectorSpec`, which :mod:`~nasfcos.detection.weights` saves with the weights.
"""

from nasfcos.detection.points import flatten_levels, level_points
from nasfcos.detection.targets import FCOSTargets, assign_targets, assign_targets_batch, make_level_ranges

__all__ = [
    "FCOSTargets",
    "assign_targets",
    "assign_targets_batch",
    "flatten_levels",
    "level_points",
    "make_level_ranges",
    "build_detector",
    "FCOSDetector",
]


def __getattr__(name: str):
    """The detector imports the torch building blocks; load it on first use."""
    if name in {"build_detector", "FCOSDetector"}:
        from nasfcos.detection import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'nasfcos.detection' has no attribute {name!r}")

"""What an architecture is, as plain data (no torch): genotypes, the search space, released format, presets.

- :mod:`~nasfcos.space.ops`: op-name tables in the released integer order, and the shared architecture facts
  (pyramid strides, FCOS and concat modes, ImageNet mean/std) the torch side asks for instead of recomputing.
- :mod:`~nasfcos.space.pools`: FPN/head pool arithmetic and which pool entries are live.
- :mod:`~nasfcos.space.genotype`: ``Genotype`` and its parts, validation, JSON, canonical key, output rule.
- :mod:`~nasfcos.space.search_space`: ``SearchSpace`` (decisions <-> genotypes, masks, sampling, exact size).
- :mod:`~nasfcos.space.released`: the authors' integer format (to and from the genotype's JSON dict, so it
  does not import ``genotype``) and the discovered architecture.
- :mod:`~nasfcos.space.presets`: ``PRESETS`` (NAS-FCOS and its baselines), ``resolve_arch``.
"""

from __future__ import annotations

from nasfcos.space.genotype import (
    CellHead,
    FPNCell,
    FPNOutputs,
    Genotype,
    HeadCell,
    PlainFPN,
    SequentialHead,
    fpn_outputs,
    fpn_pool_label,
    fpn_pool_strides,
    unconsumed_outputs,
)
from nasfcos.space.ops import (
    AGGREGATIONS,
    CELL_HEAD_OPS,
    FPN_OPS,
    HEAD_OPS,
    NUM_LEVELS,
    PLAIN_FPN_CONVS,
)
from nasfcos.space.presets import PRESETS, Preset, get_preset, load_genotype_file, resolve_arch, resolve_preset
from nasfcos.space.released import released_literal
from nasfcos.space.search_space import Cursor, Decision, SearchSpace

__all__ = [
    "AGGREGATIONS",
    "CELL_HEAD_OPS",
    "CellHead",
    "Cursor",
    "Decision",
    "FPNCell",
    "FPNOutputs",
    "FPN_OPS",
    "Genotype",
    "HEAD_OPS",
    "HeadCell",
    "NUM_LEVELS",
    "PLAIN_FPN_CONVS",
    "PRESETS",
    "PlainFPN",
    "Preset",
    "SearchSpace",
    "SequentialHead",
    "fpn_outputs",
    "fpn_pool_label",
    "fpn_pool_strides",
    "get_preset",
    "load_genotype_file",
    "released_literal",
    "resolve_arch",
    "resolve_preset",
    "unconsumed_outputs",
]

"""Operation-name tables of the NAS-FCOS search space (in the authors' released integer order) and the other
architecture facts that the torch side, the data side and the search share.

A genotype names its operations by readable strings (``"dcn3x3"``) rather than integers so that a JSON file
or a log line can be read without a table at hand. The integer order below is still the released code's
order: position ``i`` of each table is the integer ``i`` of the authors' genotype lists (FACTS 2), which is
what :mod:`nasfcos.space.released` converts to and from. The torch side (``nasfcos.nn.ops``) builds modules
from these same names; this module holds no torch code.

Facts asked for instead of recomputed: the pyramid strides, the FCOS flavours, the concat flavours and the
input normalisation (torch modules, the feature cache and the detector all read them from here).
"""

from __future__ import annotations

# FPN unary ops (paper Table 1; released ids 0..4).
#   sep3x3     depthwise 3x3 -> pointwise 1x1 -> BN -> ReLU
#   sep3x3_d3  same with dilation 3
#   sep5x5_d6  depthwise 5x5 with dilation 6 (padding 12) -> pointwise -> BN -> ReLU
#   skip       identity
#   dcn3x3     modulated deformable 3x3 (v2) -> BN -> ReLU
FPN_OPS: tuple[str, ...] = ("sep3x3", "sep3x3_d3", "sep5x5_d6", "skip", "dcn3x3")

# Binary aggregations (released ids 0..1). "sum" is symmetric in its two inputs; "concat" is treated as
# order-sensitive because the released grouped 1x1 conv lets each output half see only one input.
AGGREGATIONS: tuple[str, ...] = ("sum", "concat")

# Ops of the released sequential head (released ids 0..5); every op is followed by GN + ReLU.
HEAD_OPS: tuple[str, ...] = ("conv1x1", "conv3x3", "sep3x3", "sep3x3_d3", "skip", "dcn3x3")

# The paper's cell head (Sec. 3.2.2) reuses the FPN's unary ops.
CELL_HEAD_OPS: tuple[str, ...] = FPN_OPS

# Convolutions of the hand-designed FPN (FPN-FCOS and Deformable-FPN-FCOS baselines).
PLAIN_FPN_CONVS: tuple[str, ...] = ("conv3x3", "dcn3x3")

# Aggregations whose result does not depend on the order of the two inputs (used by Genotype.key()).
SYMMETRIC_AGGREGATIONS: frozenset[str] = frozenset({"sum"})

# The FPN's initial sampling pool: backbone features C2..C5 at pool indices 0..3.
BACKBONE_FEATURES: tuple[str, ...] = ("c2", "c3", "c4", "c5")
BACKBONE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
NUM_BACKBONE_FEATURES: int = len(BACKBONE_FEATURES)

# Pyramid levels P3..P7: one head share index per level, and their strides in input pixels.
LEVEL_NAMES: tuple[str, ...] = ("P3", "P4", "P5", "P6", "P7")
NUM_LEVELS: int = len(LEVEL_NAMES)
PYRAMID_STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)

# FCOS flavours (FACTS 4): "vanilla" is FCOS v1 as NAS-FCOS used it; "improved" adds centre sampling, GIoU and
# the sqrt score.
FCOS_MODES: tuple[str, ...] = ("vanilla", "improved")

# How a concat aggregation is built: "grouped" is the released BN -> ReLU -> grouped 1x1 conv, "dense" the
# paper's plain concatenation + full 1x1 conv.
CONCAT_MODES: tuple[str, ...] = ("grouped", "dense")

# Input normalisation of torchvision's ImageNet weights, for RGB images in [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The paper's head pool starts with {p, o0} and every head cell appends (o1, o2, a).
HEAD_POOL_START: int = 2
HEAD_POOL_PER_CELL: int = 3

# The paper's FPN uses 7 cells; the released head has 6 layers; the paper's cell head has 5 cells.
DEFAULT_NUM_FPN_CELLS: int = 7
DEFAULT_NUM_HEAD_LAYERS: int = 6
DEFAULT_NUM_HEAD_CELLS: int = 5

# An FPN must leave at least this many unconsumed cell outputs (they become P5, P4, P3).
MIN_UNCONSUMED_OUTPUTS: int = 3


def fpn_pool_size(cell: int) -> int:
    """Number of entries cell ``cell`` (0-based) can read from: the 4 backbone features plus earlier cells."""
    return NUM_BACKBONE_FEATURES + cell


def head_pool_size(cell: int) -> int:
    """Number of entries head cell ``cell`` (0-based) can read from: p, o0 and 3 entries per earlier cell."""
    return HEAD_POOL_START + HEAD_POOL_PER_CELL * cell


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (JSON and YAML readers hand both)."""
    return isinstance(value, int) and not isinstance(value, bool)


def one_of(names: tuple[str, ...] | frozenset[str]) -> str:
    """``"a, b, c"`` for error messages listing the allowed names."""
    return ", ".join(names)

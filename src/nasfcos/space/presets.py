"""Named architectures: the discovered NAS-FCOS decoder and the baselines it is compared with (paper Table 2).

``PRESETS`` maps a name to a :class:`Preset` (genotype, description, default widths, concat flavour):

- ``"nas-fcos"``: the released FPN (FACTS 3) + the released sequential head
  ``dcn3x3, conv3x3, dcn3x3, conv1x1, skip, skip`` shared on every level (share index 0); widths 256/256, the
  paper's "@256". The paper's "@128" (FPN 128, head 128) and "@128-256" (FPN 128, head 256) are width variants
  of the same genotype: ask :func:`get_preset` for ``"nas-fcos@128"`` or ``"nas-fcos@128-256"`` (any preset
  takes a ``@W`` or ``@F-H`` suffix).
- ``"nas-fcos-fpn"``: the released FPN + the plain FCOS head (4 x conv3x3 per tower, shared) — the released
  "NAS-FCOS (FPN only)" models.
- ``"fpn-fcos"``: the hand-designed FPN with conv3x3 outputs + the plain FCOS head (the FCOS baseline).
- ``"deformable-fpn-fcos"``: the hand-designed FPN with deformable 3x3 outputs + a head of 4 deformable 3x3
  convs (the paper's Deformable-FPN-FCOS baseline).

``concat`` is how a ``concat`` aggregation is built: ``"grouped"`` is the released BN -> ReLU -> 1x1 conv with
groups = C (each output half sees one input); ``"dense"`` is the paper's plain concatenation + full 1x1 conv.
Presets without a concat aggregation carry the default ``"grouped"``, which then has no effect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from nasfcos.errors import UserError
from nasfcos.space.genotype import Genotype, PlainFPN, SequentialHead
from nasfcos.space.ops import CONCAT_MODES, NUM_LEVELS, one_of
from nasfcos.space.released import released_literal


@dataclass(frozen=True)
class Preset:
    """A named architecture with the widths and concat flavour it is normally built with."""

    genotype: Genotype
    description: str
    fpn_width: int = 256
    head_width: int = 256
    concat: str = "grouped"


PLAIN_FCOS_HEAD = SequentialHead(ops=("conv3x3",) * 4, share_from=(0,) * NUM_LEVELS)
NAS_FCOS_GENOTYPE = Genotype.from_released(released_literal())

PRESETS: dict[str, Preset] = {
    "nas-fcos": Preset(
        genotype=NAS_FCOS_GENOTYPE,
        description="NAS-FCOS @256: released searched FPN + searched sequential head, all head layers shared",
    ),
    "nas-fcos-fpn": Preset(
        genotype=Genotype(fpn=NAS_FCOS_GENOTYPE.fpn, head=PLAIN_FCOS_HEAD),
        description="NAS-FCOS (FPN only): released searched FPN + plain FCOS head (4 x conv3x3)",
    ),
    "fpn-fcos": Preset(
        genotype=Genotype(fpn=PlainFPN("conv3x3"), head=PLAIN_FCOS_HEAD),
        description="FPN-FCOS: hand-designed FPN + plain FCOS head (4 x conv3x3)",
    ),
    "deformable-fpn-fcos": Preset(
        genotype=Genotype(
            fpn=PlainFPN("dcn3x3"),
            head=SequentialHead(ops=("dcn3x3",) * 4, share_from=(0,) * NUM_LEVELS),
        ),
        description="Deformable-FPN-FCOS: hand-designed FPN with deformable 3x3 outputs + 4 x deformable 3x3 head",
    ),
}

_WIDTH_SUFFIX = re.compile(r"^(?P<name>[^@]+)@(?P<fpn>\d+)(?:-(?P<head>\d+))?$")


def _unknown(name: object) -> UserError:
    return UserError(
        f"arch: unknown preset (got {name!r}); expected one of {one_of(tuple(PRESETS))} "
        "(optionally with a width suffix such as @128 or @128-256), or a genotype JSON file"
    )


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``"name@W"`` / ``"name@F-H"`` set FPN width F (and head width H)."""
    if not isinstance(name, str):
        raise _unknown(name)
    if name in PRESETS:
        return PRESETS[name]
    match = _WIDTH_SUFFIX.match(name)
    if match is None or match["name"] not in PRESETS:
        raise _unknown(name)
    fpn_width = int(match["fpn"])
    head_width = int(match["head"]) if match["head"] else fpn_width
    if fpn_width <= 0 or head_width <= 0:
        raise UserError(f"arch: widths in {name!r} must be positive")
    return replace(PRESETS[match["name"]], fpn_width=fpn_width, head_width=head_width)


def load_genotype_file(path: str | Path) -> Genotype:
    """Read a genotype JSON file: the documented object, a released integer list, or ``{"genotype": {...}}``."""
    from nasfcos.io import read_json

    source = Path(path)
    data = read_json(source, what="genotype JSON file")
    if isinstance(data, dict) and "genotype" in data and "fpn" not in data:
        data = data["genotype"]
    try:
        if isinstance(data, list):
            return Genotype.from_released(data)
        return Genotype.from_dict(data)
    except UserError as exc:
        raise UserError(f"{source}: {exc.message}") from None


def is_inline_genotype(arch: str) -> bool:
    """Whether an ``arch`` string is a genotype written inline (JSON object or integer list), not a name/path."""
    return arch.lstrip().startswith(("[", "{"))


def resolve_arch(arch: str | Path | Genotype | Preset) -> Genotype:
    """A validated genotype from a preset name, a genotype JSON path or inline JSON, a :class:`Preset` or a
    :class:`Genotype`."""
    if isinstance(arch, Genotype):
        return arch.validate()
    if isinstance(arch, Preset):
        return arch.genotype.validate()
    if isinstance(arch, Path):
        return load_genotype_file(arch)
    if isinstance(arch, str):
        if is_inline_genotype(arch):  # a pasted literal, e.g. the authors' nested integer list
            try:
                return Genotype.from_json(arch)
            except UserError as exc:
                raise UserError(f"arch (inline genotype): {exc.message}") from None
        if arch in PRESETS or (_WIDTH_SUFFIX.match(arch) and arch.split("@", 1)[0] in PRESETS):
            return get_preset(arch).genotype
        if Path(arch).is_file():
            return load_genotype_file(arch)
        if arch.endswith(".json") or "/" in arch or "\\" in arch:
            raise UserError(f"{arch}: genotype JSON file not found")
        raise _unknown(arch)
    raise UserError(
        f"arch: expected a preset name, a genotype JSON path or a Genotype (got {type(arch).__name__})"
    )


def resolve_preset(arch: str | Path | Genotype | Preset) -> Preset:
    """Like :func:`resolve_arch` but keeps a preset's widths and concat; other inputs get the defaults."""
    if isinstance(arch, Preset):
        return arch
    if isinstance(arch, str) and not is_inline_genotype(arch) and not Path(arch).is_file():
        try:
            return get_preset(arch)
        except UserError:
            pass
    genotype = resolve_arch(arch)
    return Preset(genotype=genotype, description=f"custom architecture {genotype.key()[:12]}")

"""The cost of a searched decoder next to ``fpn-fcos``'s, measured the way the search counts it.

Why: at equal MACs the searched decoders can run about twice as slow as ``fpn-fcos`` on a CPU (separable and
deformable convs at strides 4-8 are memory-bound), so a report that gives only the search's GMACs hides the cost
a deployment pays. :func:`compare_decoder_costs` builds each decoder at the search's proxy width on the feature
sizes of the search's cache (the decoder alone, batch 1), counts parameters and GMACs with the search's rule
(:func:`nasfcos.search.proxy.decoder_cost`) and times its forward pass on the CPU with a fixed thread count
(:func:`nasfcos.search.proxy.decoder_latency_ms`), all in this process one after the other, so the latencies
are comparable with each other (not with another machine or load).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["compare_decoder_costs"]


def compare_decoder_costs(genotypes: Mapping[str, Any], cache: str, width: int, *, fcos: str = "vanilla",
                          concat: str = "grouped", latency_runs: int = 20, threads: int = 1) -> list[dict[str, Any]]:
    """One row per named genotype: ``name, params_m, gmacs, latency_ms`` and the ratios ``gmacs_x`` /
    ``latency_x`` to the first row (the reference, e.g. ``fpn-fcos``)."""
    from nasfcos.search.proxy import decoder_cost, decoder_latency_ms

    rows: list[dict[str, Any]] = []
    for name, genotype in genotypes.items():
        params, gmacs = decoder_cost(genotype, cache, width, fcos=fcos, concat=concat)
        latency = decoder_latency_ms(genotype, cache, width, runs=latency_runs, fcos=fcos, concat=concat,
                                     device="cpu", threads=threads)
        rows.append({"name": name, "params_m": params / 1e6, "gmacs": gmacs, "latency_ms": latency})
    if rows:
        first = rows[0]
        for row in rows:
            row["gmacs_x"] = row["gmacs"] / first["gmacs"] if first["gmacs"] > 0 else None
            row["latency_x"] = row["latency_ms"] / first["latency_ms"] if first["latency_ms"] > 0 else None
    return rows

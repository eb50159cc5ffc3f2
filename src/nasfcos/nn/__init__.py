"""Torch building blocks: deformable conv, op/aggregation tables, searched and plain FPNs, heads, backbones.

Everything here is built from a genotype (:mod:`nasfcos.space`); :class:`nasfcos.nn.decoder.Decoder` is the
unit the search trains on cached features and the detector puts on a backbone. :mod:`~nasfcos.nn.cost` counts
parameters and GMACs (the search and the profiler share it); :mod:`~nasfcos.nn.device` resolves ``device``.
"""

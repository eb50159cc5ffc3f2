"""Deploy a trained detector: ONNX export with deformable convs lowered to standard ops, checked in ONNX Runtime.

``export_onnx(model, path, ...)`` (also ``nasfcos.export_onnx``) writes one ``.onnx`` file that plain ONNX
Runtime runs: pre-processing normalisation, backbone, searched FPN and head, and either the raw per-level maps or
boxes/scores/labels after NMS. ``nasfcos export --checkpoint model_final.pt --out model.onnx`` is the command.
See ``exporter`` (options, input contract), ``graph`` (what is exported) and ``check`` (the comparison).
"""

from __future__ import annotations

from nasfcos.export.check import CheckReport, check_onnx
from nasfcos.export.exporter import ExportCheckError, ExportResult, export_onnx

__all__ = ["export_onnx", "ExportResult", "ExportCheckError", "CheckReport", "check_onnx"]

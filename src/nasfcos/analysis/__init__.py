"""Profiling (params, GMACs with deformable convs counted, latency), plots, architecture drawings and reports."""

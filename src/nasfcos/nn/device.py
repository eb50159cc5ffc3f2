"""Which torch device a run asks for: the one place that turns ``"auto"``/``"cpu"``/``"cuda:1"`` into a device.

Training, the feature cache, the search's proxy, the report and ``nasfcos profile`` all resolve their
``device`` option here, so they accept the same spellings and fail with the same one-line
:class:`~nasfcos.errors.UserError` when the device does not exist (no CUDA, an index past the last GPU).
"""

from __future__ import annotations

import torch

from nasfcos.errors import UserError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0, *, field: str = "device") -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; checks that what is asked exists.

    ``field`` names the option in error messages (``"device"``, ``"--device"``, ``"runtime.device"``).
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"{field}: 'mps' requested but the MPS backend is not available")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"{field}: {name!r} requested but CUDA is not available; use cpu")
        index = local_rank
        if text.startswith("cuda:"):
            try:
                index = int(text.split(":", 1)[1])
            except ValueError:
                raise UserError(f"{field}: malformed device {name!r}; expected cuda:N") from None
        if not 0 <= index < torch.cuda.device_count():
            raise UserError(f"{field}: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return torch.device(f"cuda:{index}")
    raise UserError(f"{field}: unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")

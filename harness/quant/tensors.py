"""The last step of reading a port's weights back: a dequantized array as the reference's tensor."""

from __future__ import annotations

import numpy as np
import torch

from harness.core.errors import InputError


def finite_tensor(arr: np.ndarray, cols: tuple[int, int] | None, dtype: torch.dtype,
                  device: torch.device, source: str) -> torch.Tensor:
    """Columns ``cols`` (all when None) of ``arr`` in ``dtype``; InputError naming ``source``
    when they hold NaN or inf (a broken file must not read as a port's numbers)."""
    if cols is not None:
        arr = arr[:, cols[0] : cols[1]]
    if not np.isfinite(arr).all():
        raise InputError(f"{source} holds NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device, dtype)

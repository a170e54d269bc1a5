"""Mixed precision: the one place that turns ``--amp none|bf16|fp16`` into autocast."""

from __future__ import annotations

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Autocast for ``amp`` on ``device``'s type; disabled for ``"none"``."""
    dtype = AMP_DTYPES.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

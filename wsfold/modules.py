"""The one non-torch.nn module a baked model may hold: TF-"SAME" padding whose amount depends on the input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SamePad(nn.Module):
    """Zero-pads like TensorFlow's "SAME" for the given kernel, stride and dilation (trailing dims of the input).

    Written with symbolic-shape friendly arithmetic so that torch.export keeps it correct for every input size.
    """

    def __init__(
        self, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...], value: float = 0.0
    ) -> None:
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list = []
        for i in range(1, len(self.kernel_size) + 1):
            size = x.shape[-i]
            k, s, d = self.kernel_size[-i], self.stride[-i], self.dilation[-i]
            need = (size + s - 1) // s * s - s + (k - 1) * d + 1 - size
            # int in eager, SymInt under torch.export, a 0-d tensor under torch.jit tracing
            total = need.clamp(min=0) if isinstance(need, torch.Tensor) else torch.sym_max(need, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, value=self.value)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"

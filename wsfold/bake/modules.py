"""TF-"SAME" padding: its arithmetic, and the one non-torch.nn module a baked model may hold (for padding whose
amount depends on the input size)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def same_total(size, kernel: int, stride: int, dilation: int):
    """Total TF-"SAME" padding of one dimension, before clamping at 0. Plain arithmetic, so that it works on an
    int, a SymInt under torch.export and a 0-d tensor under torch.jit tracing alike."""
    return (size + stride - 1) // stride * stride - stride + (kernel - 1) * dilation + 1 - size


def tf_same_pad(
    size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    """TF "SAME" padding for a static input size, in F.pad order (last spatial dim first)."""
    pads: list[int] = []
    for n, k, s, d in zip(reversed(size), reversed(kernel), reversed(stride), reversed(dilation)):
        total = max(same_total(n, k, s, d), 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


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
            need = same_total(x.shape[-i], self.kernel_size[-i], self.stride[-i], self.dilation[-i])
            total = need.clamp(min=0) if isinstance(need, torch.Tensor) else torch.sym_max(need, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, value=self.value)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"

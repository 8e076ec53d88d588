"""Weight-standardization formulas as pure tensor functions, and their identification from observed weights.

Every formula has the general form W' = a_c * (W - mu_c) / D_c + b_c with per-output-channel statistics
(dim 0), see Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization". The variants differ only in D (and V9 multiplies instead of divides).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..io.memory import fresh_empty

# Denominator D as a function of (biased var, unbiased var, fan-in n, numel of the filter, eps).
_DENOMINATORS = {
    "V1": ("sqrt(var_b + eps)", lambda vb, vu, n, eps: torch.sqrt(vb + eps)),
    "V3": ("std_b + eps", lambda vb, vu, n, eps: torch.sqrt(vb) + eps),
    "V2": ("std_u + eps", lambda vb, vu, n, eps: torch.sqrt(vu) + eps),
    "V4": ("sqrt(var_u + eps)", lambda vb, vu, n, eps: torch.sqrt(vu + eps)),
    "V5": ("sqrt(max(var_b, eps))", lambda vb, vu, n, eps: torch.sqrt(torch.clamp(vb, min=eps))),
    "V6": ("sqrt(max(n * var_b, eps))", lambda vb, vu, n, eps: torch.sqrt(torch.clamp(n * vb, min=eps))),
    "V9": ("1 / sqrt(var_b + eps) (multiplies)", lambda vb, vu, n, eps: 1.0 / torch.sqrt(vb + eps)),
}
VARIANT_ORDER = tuple(_DENOMINATORS)
_UNBIASED = ("V2", "V4")  # the denominators that take the unbiased variance
STANDARD_EPS = (1e-5, 1e-8, 1e-6, 1e-10, 1e-4, 1e-3, 1e-7, 1e-12, 1e-9, 1e-2, 0.0)


@dataclass(frozen=True)
class Formula:
    """An identified derivation W' = scale * (W - mu) / D(variant, eps) + shift, per output channel."""

    variant: str  # key of _DENOMINATORS
    eps: float
    scale_tensor: str | None = None  # name of a per-channel parameter/buffer of the layer multiplied in
    scale_const: float = 1.0  # a scalar multiplied in (e.g. timm's gamma / sqrt(fan_in))
    scale_const_name: str | None = None
    shift_tensor: str | None = None  # name of a per-channel parameter/buffer added

    @property
    def name(self) -> str:
        """The docs/variants.md name: V7 for V1/V3 with a gain, V8 for V4 with an affine, else the base variant."""
        affine = self.scale_tensor is not None or self.scale_const != 1.0
        if self.variant in ("V1", "V3") and affine and self.shift_tensor is None:
            return "V7"
        if self.variant == "V4" and affine and self.shift_tensor is not None:
            return "V8"
        if self.variant == "V6" or not (affine or self.shift_tensor):
            return self.variant
        return self.variant + "+affine"

    def affine_tensors(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's per-channel (scale, shift) tensors this formula names, looked up in ``tensors``."""
        scale = tensors.get(self.scale_tensor) if self.scale_tensor else None
        shift = tensors.get(self.shift_tensor) if self.shift_tensor else None
        return scale, shift

    @property
    def description(self) -> str:
        scale = " * ".join(
            part
            for part in (
                self.scale_tensor,
                self.scale_const_name or (None if self.scale_const == 1.0 else repr(self.scale_const)),
            )
            if part
        )
        text = f"(W - mean) / [{_DENOMINATORS[self.variant][0]}]"
        if self.variant == "V9":
            text = "(W - mean) * sqrt(var_b + eps)"
        if scale:
            text = f"{scale} * {text}"
        if self.shift_tensor:
            text += f" + {self.shift_tensor}"
        return text


def channel_stats(
    weight: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per-channel (dim 0) centred weight, biased and unbiased variance (in float64 unless ``dtype`` says
    otherwise, for estimates that need no more), and the fan-in."""
    flat = weight.detach().to(dtype).reshape(weight.shape[0], -1)
    n = flat.shape[1]
    centred = flat - flat.mean(dim=1, keepdim=True)
    ss = (centred * centred).sum(dim=1)
    var_b = ss / n
    var_u = ss / (n - 1) if n > 1 else torch.full_like(ss, float("nan"))
    return centred, var_b, var_u, n


def standardize(
    weight: torch.Tensor,
    formula: Formula,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The exact derived weight in float64 (round it once to the layer's dtype); a float32 ``dtype`` gives a
    cheaper estimate for checks whose tolerance is far above float32 rounding."""
    centred, var_b, var_u, n = channel_stats(weight, dtype)
    denom = _DENOMINATORS[formula.variant][1](var_b, var_u, n, formula.eps)
    out = centred / denom[:, None]
    a = torch.full_like(var_b, formula.scale_const)
    if scale is not None:
        a = a * scale.detach().to(dtype).reshape(-1)
    out = out * a[:, None]
    if shift is not None:
        out = out + shift.detach().to(dtype).reshape(-1)[:, None]
    return out.reshape(weight.shape)


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative misfit (to the weight's max magnitude) accepted as rounding noise at ``dtype``."""
    return 48 * torch.finfo(dtype).eps if dtype != torch.float64 else 1e-12


def designed_weights(raw: torch.Tensor) -> Iterator[torch.Tensor]:
    """Probe weights whose per-channel variances sweep the decades where eps matters, so that formulas that agree
    on the real weights (sqrt(var + eps) vs sqrt(max(var, eps)) vs std + eps, NFNet's fan-in factor) separate.
    Each is the real weight rescaled per channel: one multiply, no copy in float64."""
    low, high = (-6.0, 0.0) if raw.dtype == torch.float16 else (-12.0, 1.0)
    decades = torch.arange(low, high + 0.5, 1.0, dtype=torch.float64)
    c = raw.shape[0]
    var_b = torch.cat([channel_stats(raw[i : i + 256], torch.float32)[1] for i in range(0, c, 256)]).double()
    view = (-1,) + (1,) * (raw.ndim - 1)
    for shift in range(0, len(decades), max(c, 1)):
        idx = (torch.arange(c) + shift) % len(decades)
        target = 10.0 ** decades[idx]
        factor = torch.where(var_b > 0, torch.sqrt(target / var_b.clamp_min(1e-300)), torch.ones_like(var_b))
        yield raw.detach() * factor.to(raw.dtype).reshape(view)


def channel_subset(channels: int, limit: int = 128) -> torch.Tensor:
    """Evenly spaced output channels on which a formula is scored (it is then checked on all of them)."""
    if channels <= limit:
        return torch.arange(channels)
    return torch.linspace(0, channels - 1, limit).round().long().unique()


_SCRATCH = threading.local()


def _scratch(role: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused work buffer (per thread, role and dtype): allocating and freeing one per layer would leave
    the allocator's heap fragmented by a long bake."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    have = pool.get((role, dtype))
    if have is None or have.numel() < numel:
        have = pool[(role, dtype)] = torch.empty(numel, dtype=dtype)
    return have[:numel]


@dataclass
class Rounded:
    """What :func:`standardize_rounded` computed: the weight (None when not asked for), its misfit against an
    observed weight (None when none was given) and the per-channel biased variance."""

    weight: torch.Tensor | None
    misfit: float | None
    var_b: torch.Tensor
    # How many elements of the observed weight are NaN or inf (None when none was given); counted only where
    # a block's min or max, computed for the misfit anyway, is not finite.
    observed_nonfinite: int | None = None


def standardize_rounded(
    weight: torch.Tensor,
    formula: Formula,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    observed: torch.Tensor | None = None,
    keep: bool = True,
    chunk_elems: int = 1 << 18,
    done_rows: Callable[[int, int], object] | None = None,
    out: torch.Tensor | None = None,
) -> Rounded:
    """The formula in float64, rounded once to ``dtype``, and (given ``observed``, what the layer's own code
    produced) max |rounded - observed| / max |observed| over every element.

    One pass over the weight: a block of output channels at a time (about 2 MB in float64, so each step stays
    in cache) is widened into one reused buffer, centred, scaled in place and rounded into the output; nothing
    the size of the layer exists in float64. ``keep=False`` only measures the misfit. ``done_rows(a, b)`` is
    told, every few MB, which output channels of ``weight`` have been read for the last time.

    ``out`` (contiguous, of the weight's shape and the output dtype) receives the rounded weight instead of a new
    tensor, and may be ``observed`` itself: each block is compared before it is overwritten. Writing into memory
    already in use saves faulting in a fresh tensor the size of the layer."""
    out_dtype = dtype or weight.dtype
    channels = weight.shape[0]
    flat = weight.detach().reshape(channels, -1)
    n = flat.shape[1]
    obs = None if observed is None else observed.detach().reshape(channels, -1)
    if out is not None:
        if not keep or out.shape != weight.shape or out.dtype != out_dtype or not out.is_contiguous():
            raise ValueError("standardize_rounded: out must be a contiguous tensor of the weight's shape and dtype")
    elif keep:
        out = fresh_empty(tuple(weight.shape), out_dtype)
    out_flat = None if out is None else out.detach().view(channels, -1)
    # Rounded into a block buffer first when there is no output, or when the output is the observed weight.
    in_place = out is not None and obs is not None and out.data_ptr() == observed.data_ptr()
    rows = max(1, min(channels, chunk_elems // max(n, 1)))
    buf = _scratch("wide", rows * n, torch.float64).view(rows, n)
    staged = obs is not None and (out is None or in_place)
    rounded_buf = _scratch("rounded", rows * n, out_dtype).view(rows, n) if staged else None
    diff = _scratch("diff", rows * n, out_dtype).view(rows, n) if obs is not None else None
    released = 0
    release_every = max(rows, (32 << 20) // max(n * weight.element_size(), 1))
    denom_fn = _DENOMINATORS[formula.variant][1]
    unbiased = formula.variant in _UNBIASED
    factor = torch.full((channels,), formula.scale_const, dtype=torch.float64)
    if scale is not None:
        factor = factor * scale.detach().to(torch.float64).reshape(-1)
    offset = None if shift is None else shift.detach().to(torch.float64).reshape(-1)
    var_parts = []
    worst = top = 0.0
    observed_nonfinite = None if obs is None else 0
    for lo in range(0, channels, rows):
        hi = min(channels, lo + rows)
        whole = hi - lo == rows  # every block but the last: the work buffers as they are, not sliced
        b = buf if whole else buf[: hi - lo]
        b.copy_(flat[lo:hi])
        b.sub_(b.sum(dim=1, keepdim=True).div_(n))
        # One fused reduction (vecdot multiplies into a temporary first); squaring the norm costs a few ulp of
        # float64, far below the float32 rounding that follows.
        ss = torch.linalg.vector_norm(b, dim=1).square_()
        var_b = ss / n
        var_u = None if not unbiased else ss / (n - 1) if n > 1 else torch.full_like(ss, float("nan"))
        denom = denom_fn(var_b, var_u, n, formula.eps)
        b.mul_((factor[lo:hi] / denom)[:, None])
        if offset is not None:
            b.add_(offset[lo:hi, None])
        var_parts.append(var_b)
        if rounded_buf is not None:
            rounded = rounded_buf if whole else rounded_buf[: hi - lo]
        else:
            rounded = out_flat[lo:hi] if keep else None
        if rounded is not None:
            rounded.copy_(b)
        if obs is not None:
            target = obs[lo:hi]
            low, high = torch.sub(rounded, target, out=diff if whole else diff[: hi - lo]).aminmax()
            spread = tuple(torch.stack((low, high, *target.aminmax())).tolist())
            if not (math.isfinite(spread[2]) and math.isfinite(spread[3])):
                observed_nonfinite += int((~target.isfinite()).sum())
            if not all(math.isfinite(v) for v in spread):
                spread = _nonfinite_spread(rounded, target)
            worst = max(worst, -spread[0], spread[1])
            top = max(top, -spread[2], spread[3])
        if in_place:
            out_flat[lo:hi].copy_(rounded)
        if done_rows is not None and (hi - released >= release_every or hi == channels):
            done_rows(released, hi)
            released = hi
    misfit = None if obs is None else (worst / top if top > 0 else math.inf)
    var_b = torch.cat(var_parts) if var_parts else torch.empty(0, dtype=torch.float64)
    return Rounded(out, misfit, var_b, observed_nonfinite)


def _nonfinite_spread(rounded: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float, float]:
    """(min, max) of rounded - target and of target where NaN/inf appear: the same non-finite values in the
    same places agree (a dead filter with eps 0 is NaN on both sides); anywhere else they are an infinite misfit."""
    same = (rounded == target) | (rounded.isnan() & target.isnan())
    if not bool((same | (rounded.isfinite() & target.isfinite())).all()):
        return (-math.inf, math.inf, 0.0, 0.0)
    both = rounded.isfinite() & target.isfinite()
    d = torch.where(both, rounded - target, 0.0)
    t = torch.where(both, target, 0.0)
    return (float(d.min()), float(d.max()), float(t.min()), float(t.max()))


def const_value(name: str | None, scalars: dict[str, float], n: int) -> float:
    """The value of a named scalar factor of a formula for a layer with these attributes and fan-in ``n``:
    None (1), "1/sqrt(n)", an attribute "key", or "key/sqrt(n)"."""
    if name is None:
        return 1.0
    if name == "1/sqrt(n)":
        return 1.0 / math.sqrt(n)
    if name.endswith("/sqrt(n)"):
        return scalars[name.removesuffix("/sqrt(n)")] / math.sqrt(n)
    return scalars[name]


def identify_formula(
    observations: list[tuple[torch.Tensor, torch.Tensor]],
    per_channel: dict[str, torch.Tensor],
    scalars: dict[str, float],
    eps_hints: list[float],
) -> Formula | None:
    """Find the formula that turns each raw weight into the derived one observed with it, or None when none fits.

    ``observations`` are (raw, derived) pairs, the real weight first; ``per_channel`` holds the layer's other
    tensors with one value per output channel (gains, AWS gamma/beta), ``scalars`` its numeric attributes,
    ``eps_hints`` eps values read from the instance (preferred among equal fits).
    """
    raw0, derived0 = observations[0]
    if raw0.shape != derived0.shape or raw0.ndim < 2:
        return None
    dtype = derived0.dtype
    tol = tolerance(dtype)
    stats = []
    for raw, derived in observations:
        centred, var_b, var_u, n = channel_stats(raw)
        target = derived.detach().to(torch.float64).reshape(raw.shape[0], -1)
        ref = target.abs().max().item()
        if not math.isfinite(ref) or ref == 0.0:
            return None
        # Per channel the derivation must be affine in W: W' = alpha * (W - mu) + beta.
        ss = (centred * centred).sum(dim=1)
        live = ss > 0
        alpha = torch.where(live, (target * centred).sum(dim=1) / torch.where(live, ss, 1.0), 0.0)
        beta = target.mean(dim=1)
        scale_ref = target.abs().amax(dim=1).clamp_min(ref * 1e-30)
        if ((target - alpha[:, None] * centred - beta[:, None]).abs().amax(dim=1) / scale_ref).max().item() > tol:
            return None
        stats.append((var_b, var_u, n, alpha, beta, live, ref))
    n = stats[0][2]
    beta0, ref0 = stats[0][4], stats[0][6]

    shifts: list[tuple[str | None, torch.Tensor]] = [(None, torch.zeros_like(beta0))]
    shifts += [(k, v.detach().to(torch.float64).reshape(-1)) for k, v in per_channel.items()]
    shift_name, shift_vec = min(shifts, key=lambda s: (s[1] - beta0).abs().max().item())
    if (shift_vec - beta0).abs().max().item() > tol * ref0:
        return None

    names: list[str | None] = [None]
    for key, value in scalars.items():
        if value not in (0.0, 1.0) and math.isfinite(value):
            names += [key, f"{key}/sqrt(n)"]
    names.append("1/sqrt(n)")
    consts = [(name, const_value(name, scalars, n)) for name in names]
    scales: list[tuple[str | None, torch.Tensor]] = [(None, torch.ones_like(beta0))]
    scales += [(k, v.detach().to(torch.float64).reshape(-1)) for k, v in per_channel.items() if k != shift_name]

    eps_list = list(dict.fromkeys([*eps_hints, *STANDARD_EPS]))
    lives = [st[5] for st in stats]
    # Candidate per-channel factors a_c (known scale tensor times a known constant), over live channels of
    # every observation: shape [n_candidates, n_live_total].
    cand_meta = [(sn, cn, c) for sn, _ in scales for cn, c in consts]
    wants = torch.stack([torch.cat([sv[live] * c for live in lives]) for _, sv in scales for _, c in consts])
    tops = wants.abs().amax(dim=1).clamp_min(1e-300)
    scored = []
    for variant in VARIANT_ORDER:
        denom_fn = _DENOMINATORS[variant][1]
        a_rows, keys = [], []
        for eps in eps_list:
            # The per-channel factor each observation implies, a_c = alpha_c * D_c, must be the same known scale.
            a = torch.cat([(alpha * denom_fn(vb, vu, nn, eps))[live] for vb, vu, nn, alpha, _, live, _ in stats])
            if bool(torch.isfinite(a).all()):
                a_rows.append(a)
                keys.append(eps)
        if not a_rows:
            continue
        errs = ((torch.stack(a_rows)[:, None, :] - wants[None, :, :]).abs().amax(dim=2) / tops[None, :]).tolist()
        for eps, row in zip(keys, errs):
            for (scale_name, const_name, const), err in zip(cand_meta, row):
                order = (eps_list.index(eps), VARIANT_ORDER.index(variant))
                scored.append((err, order, Formula(variant, eps, scale_name, const, const_name, shift_name)))
    if not scored:
        return None
    best = min(s[0] for s in scored)
    # Among fits equally good up to rounding noise, the first in priority order wins (instance eps, V1 first).
    noise = torch.finfo(dtype).eps if dtype != torch.float64 else 1e-15
    floor = max(best * 1.25, noise)
    # Priority: variant order first, then instance eps before standard values.
    for _err, _, formula in sorted((s for s in scored if s[0] <= floor), key=lambda s: (s[1][1], s[1][0])):
        scale = per_channel.get(formula.scale_tensor) if formula.scale_tensor else None
        shift = per_channel.get(formula.shift_tensor) if formula.shift_tensor else None
        fits = True
        for raw, derived in observations:
            target = derived.detach().to(torch.float64)
            rebuilt = standardize(raw, formula, scale, shift)
            fits = fits and (rebuilt - target).abs().max().item() / target.abs().max().item() <= tol
        if fits:
            return formula
    return None

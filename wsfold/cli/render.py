"""Rich rendering of core results for a human reader."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def detection(console: Console, source: Path, det) -> None:
    table = Table(title=f"weight-standardized layers in {source.name}", title_justify="left")
    for col in ("layer", "class", "op", "formula", "eps", "fan-in", "out", "padding"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("layer", "class", "padding"))
    warnings = []
    for layer in det.layers:
        d = layer.to_dict()
        table.add_row(
            d["name"] or "(root)",
            d["type"],
            d["op"],
            d["formula"],
            _eps(d["eps"]),
            str(d["fan_in"]),
            str(d["out_channels"]),
            d["padding"],
        )
        warnings += [f"{d['name'] or '(root)'}: {w}" for w in d["warnings"]]
    console.print(table)
    for line in warnings:
        console.print(f"[yellow]warning[/] {line}", highlight=False)
    for u in det.unsupported:
        console.print(f"[yellow]unsupported[/] {u.name} ({u.type}): {u.reason}; left as it is")
    for u in det.unprobed:
        console.print(f"[dim]not probed[/] {u.name} ({u.type}): {u.reason}")
    formulas: dict[str, int] = {}
    for layer in det.layers:
        formulas[layer.formula_name] = formulas.get(layer.formula_name, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(formulas.items()))
    console.print(
        f"{len(det.layers)} derived-weight layer(s)"
        + (f" ({summary})" if summary else "")
        + f", {len(det.unsupported)} unsupported, {len(det.unprobed)} not probed"
    )

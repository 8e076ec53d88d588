"""Rich rendering of core results for a human reader."""

from __future__ import annotations

from pathlib import Path

from rich import box
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
    skipped(console, det)
    formulas: dict[str, int] = {}
    for layer in det.layers:
        formulas[layer.formula_name] = formulas.get(layer.formula_name, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(formulas.items()))
    console.print(
        f"{len(det.layers)} derived-weight layer(s)"
        + (f" ({summary})" if summary else "")
        + f", {len(det.unsupported)} unsupported, {len(det.unprobed)} not probed"
    )


def notes(console: Console, lines: list[str]) -> None:
    for line in lines:
        console.print(f"[yellow]note[/] {line}", highlight=False)


def skipped(console: Console, det) -> None:
    """One warning line for every layer left as it is: unsupported, or not probed."""
    for u in det.unsupported:
        console.print(
            f"[yellow]warning[/] unsupported {u.name or '(root)'} ({u.type}): {u.reason}; left as it is",
            highlight=False,
        )
    for u in det.unprobed:
        console.print(
            f"[yellow]warning[/] not probed {u.name or '(root)'} ({u.type}): {u.reason}; left as it is", highlight=False
        )


def verification(console: Console, result) -> None:
    runs = result.runtimes or [None]
    for run in runs:
        outputs = run.outputs if run is not None else result.outputs
        where = ""
        if run is not None and (len(runs) > 1 or run.runtime != "onnxruntime" or run.precision != "f32"):
            where = f"{run.runtime} {run.version}, {run.precision}: "
        columns = ("", "output", "shape", "max", "rel", "mean", "onnx-f64", "orig-f64", "limit")
        table = _figures_table(f"{where}ONNX vs checkpoint", columns)
        for o in outputs:
            figures = (o.max_abs_error, o.max_rel_error, o.mean_abs_error, o.onnx_vs_float64, o.reference_vs_float64)
            table.add_row(
                "[green]ok[/]" if o.passed else "[red]FAIL[/]",
                o.name,
                "x".join(map(str, o.shape)),
                # Nothing to show where no values could be compared (the shapes differ): not a row of zeros.
                *(f"{v:.2g}" if o.compared else "-" for v in (*figures, o.allowed)),
            )
        console.print(table)
        for o in outputs:
            for problem in o.problems:
                console.print(f"[red]{o.name}[/]: {where}{problem}", highlight=False)
    console.print(
        "[dim]max, rel, mean: the graph's error against the checkpoint; onnx-f64, orig-f64: each one's against "
        "float64; limit: what the rule allows onnx-f64[/]",
        highlight=False,
    )
    bad_layers = [layer for layer in result.layers if not layer.passed]
    if result.layers:
        paired = result.layers_compared - len(result.layers_unpaired)
        console.print(
            f"per-layer: {paired}/{result.layers_compared} layers found in the graph; "
            f"{len(result.layers) - len(bad_layers)}/{len(result.layers)} weights and biases match",
            highlight=False,
        )
        for layer in bad_layers:
            console.print(
                f"[red]layer {layer.name}[/]: {layer.tensor} differs from what the graph's {layer.node} takes "
                f"({layer.initializer}; max abs {layer.max_abs_error:.3g}, relative {layer.max_rel_error:.3g})",
                highlight=False,
            )
        if result.layers_unpaired:
            listed, count = _listed(result.layers_unpaired)
            console.print(
                f"[dim]not in the graph[/] {listed}{f' ({count})' if count else ''}: no op takes weights like "
                "theirs (dropped by the exporter, or changed beyond recognition)",
                highlight=False,
            )
    for warning in result.warnings:
        console.print(f"[yellow]warning[/] {warning}", highlight=False)
    console.print(f"compared against: {result.reference}", highlight=False)
    console.print(
        f"criterion: {result.criterion}; {result.samples} sample(s), {len(result.batch_input_shapes)} batch(es) "
        f"of inputs {'; '.join(_shapes(b) for b in _distinct(result.batch_input_shapes))}",
        highlight=False,
    )
    if result.passed:
        console.print("[green]verification passed[/]")
    else:
        console.print(f"[red]verification failed[/]: cause: {result.cause}", highlight=False)
        if result.hint:
            console.print(f"hint: {result.hint}", highlight=False)


def folding(console: Console, report, *, would: bool) -> None:
    from ..bake.fold import NOT_ASKED

    if report.skipped == NOT_ASKED:
        return
    if report.skipped:
        console.print(f"[yellow]folding skipped[/]: {report.skipped}", highlight=False)
        return
    verb = "would fold" if would else "folded"
    # One line per kind of fold and per reason: a deep network has a hundred normalizers alike (--json lists each).
    for kind, group in _grouped(report.folded, lambda e: e.kind):
        listed, count = _listed([f"{e.norm} into {e.into}" for e in group])
        console.print(f"{verb} {listed} ({count + '; ' if count else ''}{kind})", highlight=False)
    for reason, group in _grouped(report.not_folded, lambda e: e.reason):
        listed, count = _listed([e.name for e in group])
        console.print(f"[dim]not folded[/] {listed}{f' ({count})' if count else ''}: {reason}", highlight=False)


def _grouped(entries, key) -> list[tuple[str, list]]:
    """Entries grouped by ``key``, groups in the order of their first entry."""
    groups: dict[str, list] = {}
    for entry in entries:
        groups.setdefault(key(entry), []).append(entry)
    return list(groups.items())


def _listed(items: list[str], show: int = 3) -> tuple[str, str]:
    """The first few items and how many more; with a count to put in brackets ("" when every item is shown)."""
    if len(items) <= show + 1:
        return ", ".join(items), ""
    return f"{', '.join(items[:show])} and {len(items) - show} more", f"{len(items)} in all, --json lists each"


def _shapes(batch: list[list[int]]) -> str:
    return ", ".join("x".join(map(str, shape)) for shape in batch)


def _distinct(items: list) -> list:
    return [x for i, x in enumerate(items) if x not in items[:i]]


def int8(console: Console, verdict, result=None) -> None:
    """An int8 graph's verdict: per output SQNR and top-1 agreement, its structure, what stays in float."""
    title = f"int8 vs checkpoint on {verdict.holdout['samples']} held-out sample(s)"
    table = _figures_table(title, ("", "output", "SQNR dB", "top-1 agreement"))
    for o in verdict.outputs:
        agree = "-" if o.top1_agreement is None else f"{o.top1_agreement:.2%}"
        sqnr = "-" if o.sqnr_db != o.sqnr_db else f"{o.sqnr_db:.1f}"  # NaN: nothing to measure on constant data
        table.add_row("[green]ok[/]" if o.passed else "[red]FAIL[/]", o.name, sqnr, agree)
    console.print(table)
    console.print(
        f"weights: {verdict.weights['int8']} int8, {verdict.weights['float']} float; thresholds: SQNR >= "
        f"{verdict.min_sqnr:g} dB, top-1 agreement >= {verdict.min_agreement:.0%}; "
        f"holdout: {verdict.holdout['source']}",
        highlight=False,
    )
    for reason, group in _grouped(verdict.float_ops, lambda e: e["reason"]):
        listed, count = _listed([f"{e['op']} {e['node']}" for e in group])
        console.print(f"[dim]in float[/] {listed}{f' ({count})' if count else ''}: {reason}", highlight=False)
    for failure in verdict.failures:
        console.print(f"[red]FAIL[/] {failure}", highlight=False)
    if verdict.worst_layers:
        worst = ", ".join(f"{w['layer']} ({w['sqnr_db']:.1f} dB)" for w in verdict.worst_layers)
        console.print(f"layers that lose most (SQNR of their output): {worst}; --exclude LAYER keeps one in float")
    if result is not None:
        sizes = result.size_bytes
        console.print(
            f"calibrated ({result.calibration['method']}) on {result.calibration['samples']} sample(s); "
            f"{sizes['float'] / 1e6:.2f} MB float -> {sizes['int8'] / 1e6:.2f} MB int8",
            highlight=False,
        )
        if result.placed:
            console.print(f"{'[green]wrote[/]' if verdict.passed else '[yellow]wrote (failing)[/]'} {result.output}")
        else:
            console.print(f"[red]int8 verdict failed[/]: {result.output} not written (--keep-failing writes it)")
    elif verdict.passed:
        console.print("[green]int8 verdict passed[/]")
    else:
        console.print("[red]int8 verdict failed[/]")


def _figures_table(title: str, columns: tuple[str, ...]) -> Table:
    """A compact table of per-output figures (a verdict's), its columns never wrapped."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in columns:
        table.add_column(col, no_wrap=True)
    return table

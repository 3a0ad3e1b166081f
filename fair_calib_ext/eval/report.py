"""Markdown tables and mean ± std aggregation of evaluation results."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

__all__ = ["Column", "default_columns", "flatten_result", "mean_std", "fmt_mean_std", "markdown_table", "aggregate"]


def _get(d: dict[str, Any], path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


class Column:
    """One table column: a header, a dotted path into a result dict, a scale and digits."""

    def __init__(self, header: str, path: str, scale: float = 1.0, digits: int = 2) -> None:
        self.header, self.path, self.scale, self.digits = header, path, scale, digits

    def value(self, result: dict[str, Any]) -> float | None:
        v = _get(result, self.path)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return float(v) * self.scale


def default_columns(tasks: Sequence[str] = (), with_ppl: bool = True, with_metrics: bool = True,
                    with_calib_time: bool = False) -> list[Column]:
    """Per-task accuracy (%), average, perplexity, flip rate / mismatch (%), lag median / p90."""
    cols = [Column(t, f"tasks.per_task.{t}.acc", 100.0, 1) for t in tasks]
    if tasks:
        cols.append(Column("avg", "tasks.avg", 100.0, 1))
    if with_ppl:
        cols.append(Column("ppl", "ppl.ppl", 1.0, 3))
    if with_metrics:
        cols += [
            Column("flip %", "metrics.flips.rate", 100.0, 2),
            Column("mismatch %", "metrics.mismatch.rate", 100.0, 2),
            Column("mism. mean-dis. %", "metrics.mismatch.mean_disagree.rate", 100.0, 1),
            Column("mism. never-agr. %", "metrics.mismatch.never_agree.rate", 100.0, 1),
            Column("KL@commit", "metrics.divergence.kl", 1.0, 4),
            Column("lag med", "metrics.lag.median", 1.0, 1),
            Column("lag p90", "metrics.lag.p90", 1.0, 1),
        ]
    if with_calib_time:
        cols.append(Column("calib s", "calib_time_s", 1.0, 1))
    return cols


def flatten_result(result: dict[str, Any], columns: Sequence[Column]) -> list[float | None]:
    """The column values of one result dict."""
    return [c.value(result) for c in columns]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (n - 1) over the non-missing values; std None for fewer than 2."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None, len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)), len(v)


def fmt_mean_std(mean: float | None, std: float | None, digits: int) -> str:
    """'m ± s' (or 'm' / '—')."""
    if mean is None:
        return "—"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def aggregate(results: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[tuple[float | None, float | None]]:
    """Per column (mean, std) over several runs (e.g. seeds) of one configuration."""
    return [mean_std([c.value(r) for r in results])[:2] for c in columns]


def markdown_table(
    rows: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    columns: Sequence[Column],
    first_header: str = "model",
    cell: Callable[[float | None, float | None, int], str] = fmt_mean_std,
) -> str:
    """A Markdown table: one row per (label, runs) with mean ± std per column."""
    head = "| " + " | ".join([first_header] + [c.header for c in columns]) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"
    lines = [head, sep]
    for label, runs in rows:
        agg = aggregate(runs, columns)
        lines.append("| " + " | ".join([label] + [cell(m, s, c.digits) for (m, s), c in zip(agg, columns)]) + " |")
    return "\n".join(lines)

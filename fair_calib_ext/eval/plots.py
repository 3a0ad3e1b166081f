"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Any, Sequence

__all__ = ["plot_lag_ccdf", "plot_flips_by_decile", "plot_flips_by_position", "plot_prior", "plot_step_mse_aligned"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return str(path)


def plot_lag_ccdf(curves: Sequence[tuple[str, dict[str, list]]], path: str | os.PathLike[str],
                  title: str = "stability lag CCDF") -> str:
    """Step plot of P(δ_lag ≥ x) per model, log y. ``curves``: (label, {"x": [...], "p": [...]})."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, c in curves:
        xs, ps = c.get("x", []), c.get("p", [])
        keep = [(x, p) for x, p in zip(xs, ps) if p > 0]
        if keep:
            ax.step([k[0] for k in keep], [k[1] for k in keep], where="post", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("stability lag δ (steps)")
    ax.set_ylabel("P(δ ≥ x)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _grouped_rate_bars(ax: Any, series: Sequence[tuple[str, Sequence[float | None]]], **bar_kw: Any) -> int:
    """One bar per (series, bin), bins side by side; rates in [0, 1] drawn as %. Returns the
    number of series (for colour offsets)."""
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (label, rates) in enumerate(series):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(rates))]
        ax.bar(xs, [100.0 * (r or 0.0) for r in rates], width=width, label=label, **bar_kw)
    ax.set_ylabel("flip rate (%)")
    ax.grid(axis="y", alpha=0.3)
    return n


def plot_flips_by_decile(series: Sequence[tuple[str, Sequence[float | None]]], path: str | os.PathLike[str],
                         title: str = "frontier flip rate by step decile") -> str:
    """Grouped bars of the flip rate (%) per decoding-step decile, one group per decile."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    _grouped_rate_bars(ax, series)
    ax.set_xticks(range(10))
    ax.set_xticklabels([f"{10 * d}-{10 * d + 10}%" for d in range(10)], rotation=45, fontsize=7)
    ax.set_xlabel("decoding step (share of T)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_flips_by_position(series: Sequence[tuple[str, Sequence[float | None]]],
                           priors: Sequence[tuple[str, Sequence[float]]], path: str | os.PathLike[str],
                           title: str = "frontier flips by generation position") -> str:
    """Bars: flip rate (%) per generation position for each model; lines (right axis): priors
    over the same window, to see whether the prior weighs the positions that flip."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    n = _grouped_rate_bars(ax, series, alpha=0.8)
    ax.set_xlabel("generation position")
    if priors:
        ax2 = ax.twinx()
        for j, (label, w) in enumerate(priors):
            ax2.plot(range(len(w)), list(w), marker=".", lw=1.2, color=f"C{(n + j) % 10}",
                     label=f"prior: {label}")
        ax2.set_ylabel("prior weight")
        lines, labels = ax.get_legend_handles_labels()
        l2, lb2 = ax2.get_legend_handles_labels()
        ax.legend(lines + l2, labels + lb2, fontsize=7, loc="upper right")
    else:
        ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_prior(weights: Sequence[float], path: str | os.PathLike[str], title: str = "position prior w̄") -> str:
    """Line plot of a position prior over its window."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(range(len(weights)), list(weights))
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("window position")
    ax.set_ylabel("weight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_step_mse_aligned(curves: Sequence[tuple[str, dict[str, list]]], path: str | os.PathLike[str]) -> str:
    """Step-wise probability MSE aligned to the first false commit (offset 0)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, c in curves:
        pts = [(o, m) for o, m in zip(c.get("offset", []), c.get("mean", [])) if m is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    ax.axvline(0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("steps from the first false commit")
    ax.set_ylabel("prob. MSE over masked positions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)

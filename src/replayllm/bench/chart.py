"""The profile chart: per model x mode, the token's time as stacked bars, absolute (ms) and in percent."""

from __future__ import annotations

from .profiler import HOST_PARTS, ProfileRow

SEGMENTS = ("gpu",) + HOST_PARTS
LABELS = {"gpu": "GPU execution", "launch": "host: launch / graph", "sampling": "host: sampling",
          "copy": "host: copies", "detokenize": "host: detokenize + stop checks", "other": "host: other"}
COLORS = {"gpu": "#4c72b0", "launch": "#dd8452", "sampling": "#c44e52", "copy": "#8172b3",
          "detokenize": "#937860", "other": "#8c8c8c"}


def bar_values(rows: list[ProfileRow]) -> tuple[list[str], dict[str, list[float]], dict[str, list[float]]]:
    """(bar labels, ms per segment, percent per segment); each bar's percentages sum to 100."""
    labels = [f"{r.model} {r.quant}\n{r.mode}" for r in rows]
    ms = {s: [r.parts_ms[s] for r in rows] for s in SEGMENTS}
    totals = [sum(ms[s][i] for s in SEGMENTS) for i in range(len(rows))]
    pct = {s: [100 * ms[s][i] / totals[i] if totals[i] else 0.0 for i in range(len(rows))] for s in SEGMENTS}
    return labels, ms, pct


def draw(rows: list[ProfileRow], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ms, pct = bar_values(rows)
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(rows) + 4), 6.5))
    for ax, values, unit in ((axes[0], ms, "ms per token"), (axes[1], pct, "% of token time")):
        bottom = [0.0] * len(rows)
        for s in SEGMENTS:
            ax.bar(range(len(rows)), values[s], bottom=bottom, color=COLORS[s], label=LABELS[s], width=0.7)
            bottom = [b + v for b, v in zip(bottom, values[s])]
        ax.set_xticks(range(len(rows)), labels, fontsize=8, rotation=30, ha="right")
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    for i, r in enumerate(rows):  # host share written on top of each percentage bar
        axes[1].text(i, 101, f"{100 * r.host_critical_fraction:.1f}%", ha="center", fontsize=8)
        axes[0].text(i, r.token_ms * 1.01, f"{r.token_ms:.2f}", ha="center", fontsize=8)
    axes[1].set_ylim(0, 108)
    axes[0].set_title("time per token (ms)")
    axes[1].set_title("share of token time (host critical share on top)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The transfer job's human-readable outputs: the console table and the PNG figure."""


def _percent(value):
    return "-" if value is None else f"{100 * value:+.2f}"


def format_table(summary):
    """One line per method: test accuracy mean +- std over its finished seeds (in %), the
    paired difference to scratch with its 95% confidence interval, seeds finished (and
    diverged), seconds per run."""
    header = (f"{'method':<14} {'test accuracy (%)':>18} {'vs scratch (95% CI)':>26} "
              f"{'seeds':>6} {'s/run':>7}")
    lines = [header, "-" * len(header)]
    for row in summary:
        accuracy = ("diverged" if row["accuracy_mean"] is None else
                    f"{100 * row['accuracy_mean']:.2f} +- {100 * row['accuracy_std']:.2f}")
        paired = row.get("vs_scratch")
        versus = ""
        if paired and paired["mean"] is not None:
            versus = _percent(paired["mean"])
            if paired["low"] is not None:
                versus += f" [{_percent(paired['low'])}, {_percent(paired['high'])}]"
        seeds = f"{row['runs']}" + (f" ({row['diverged']} div.)" if row["diverged"] else "")
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        lines.append(f"{row['method']:<14} {accuracy:>18} {versus:>26} {seeds:>6} "
                     f"{seconds:>7}")
    return "\n".join(lines)


def _heatmap(axis, figure, panel):
    import numpy as np

    matrix = np.array([[np.nan if v is None else v for v in row] for row in panel["matrix"]])
    image = axis.imshow(matrix, cmap="viridis")
    axis.set_xticks(range(len(panel["columns"])), panel["columns"])
    axis.set_yticks(range(len(panel["rows"])), panel["rows"])
    axis.set_xlabel(panel["column_label"])
    axis.set_ylabel(panel["row_label"])
    axis.set_title(panel["title"])
    for (m, n), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            axis.text(n, m, f"{value:.2f}", ha="center", va="center", color="w")
    figure.colorbar(image, ax=axis)


def _accuracy_bars(axis, results):
    """Mean accuracy per method (error bars: std over seeds); runs that diverged are
    written on the bar, and a method whose every run diverged gets no bar but the word."""
    summary = results["summary"]
    names = [row["method"] for row in summary]
    means = [100 * row["accuracy_mean"] if row["accuracy_mean"] is not None else 0.0
             for row in summary]
    drawn = axis.bar(names, means, yerr=[100 * row["accuracy_std"] for row in summary],
                     capsize=4, color="tab:blue")
    labels = []
    for row, mean in zip(summary, means):
        label = "" if row["accuracy_mean"] is None else f"{mean:.1f}"
        if row["diverged"]:
            label += f"\n{row['diverged']} diverged"
        labels.append(label.strip())
    finite = [m for row, m in zip(summary, means) if row["accuracy_mean"] is not None]
    low = max(0.0, min(finite) - 15) if finite else 0.0  # the differences, not the base
    axis.set_ylim(low, 100)
    axis.bar_label(drawn, labels=labels, label_type="center", color="w")
    for i, row in enumerate(summary):
        if row["accuracy_mean"] is None:
            axis.text(i, low + 5, "diverged", ha="center", rotation=90, color="tab:red")
    axis.set_ylabel("target test accuracy (%)")
    config = results["config"]
    axis.set_title(f"{config['data']}: {config['labels_per_class']} labels per class")
    axis.tick_params(axis="x", rotation=30)


def _paired_differences(axis, summary):
    """Each method's paired difference to scratch with its 95% confidence interval."""
    rows = [row for row in summary if row.get("vs_scratch", {}).get("mean") is not None]
    names = [row["method"] for row in rows]
    means = [100 * row["vs_scratch"]["mean"] for row in rows]
    errors = [[100 * (row["vs_scratch"]["mean"] - row["vs_scratch"]["low"]) if
               row["vs_scratch"]["low"] is not None else 0.0 for row in rows],
              [100 * (row["vs_scratch"]["high"] - row["vs_scratch"]["mean"]) if
               row["vs_scratch"]["high"] is not None else 0.0 for row in rows]]
    axis.errorbar(means, range(len(rows)), xerr=errors, fmt="o", capsize=4)
    axis.axvline(0.0, color="grey", linewidth=1)
    axis.set_yticks(range(len(rows)), names)
    axis.invert_yaxis()
    axis.set_xlabel("accuracy - scratch, same seeds (points; 95% CI)")
    axis.set_title("paired difference to scratch")


def plot(results, path):
    """Bar chart of the methods' test accuracies, the paired differences to scratch (when
    scratch ran), then each panel that a method's outputs give (``Method.combine_outputs``:
    L2T-ww's heat map of its mean learned where-weights, source x target layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    paired = any(row.get("vs_scratch", {}).get("mean") is not None for row in summary)
    panels = [panel for outputs in results["method_outputs"].values()
              for panel in outputs.values()]
    count = 1 + paired + len(panels)
    figure, axes = plt.subplots(1, count, figsize=(6 + 5 * (count - 1), 4), squeeze=False)
    _accuracy_bars(axes[0][0], results)
    if paired:
        _paired_differences(axes[0][1], summary)
    for axis, panel in zip(axes[0][1 + paired:], panels):
        _heatmap(axis, figure, panel)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

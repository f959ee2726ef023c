"""The transfer job's human-readable outputs: the console table and the PNG figure."""


def format_table(summary):
    """One line per method: test accuracy mean +- std over seeds (in %), seeds, seconds/run."""
    header = f"{'method':<14} {'test accuracy (%)':>18} {'seeds':>6} {'s/run':>7}"
    lines = [header, "-" * len(header)]
    for row in summary:
        accuracy = f"{100 * row['accuracy_mean']:.2f} +- {100 * row['accuracy_std']:.2f}"
        lines.append(f"{row['method']:<14} {accuracy:>18} {row['runs']:>6} "
                     f"{row['seconds']:>7.1f}")
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


def plot(results, path):
    """Bar chart of the methods' test accuracies (error bars: std over seeds), then each
    panel that a method's outputs give (``Method.combine_outputs``: L2T-ww's heat map of
    its mean learned where-weights, source x target layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    panels = [panel for outputs in results["method_outputs"].values()
              for panel in outputs.values()]
    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(6 + 5 * len(panels), 4),
                                squeeze=False)
    bars = axes[0][0]
    names = [row["method"] for row in summary]
    means = [100 * row["accuracy_mean"] for row in summary]
    drawn = bars.bar(names, means, yerr=[100 * row["accuracy_std"] for row in summary],
                     capsize=4, color="tab:blue")
    bars.bar_label(drawn, fmt="%.1f", label_type="center", color="w")
    bars.set_ylim(max(0.0, min(means) - 15), 100)  # the differences, not the common base
    bars.set_ylabel("target test accuracy (%)")
    bars.set_title(f"{results['config']['data']}: {results['config']['labels_per_class']} "
                   f"labels per class")
    bars.tick_params(axis="x", rotation=30)
    for axis, panel in zip(axes[0][1:], panels):
        _heatmap(axis, figure, panel)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

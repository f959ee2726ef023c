"""The transfer job's human-readable outputs: the console table and the PNG figure."""


def format_table(summary):
    """One line per method: test accuracy mean +- std over seeds (in %), seeds, seconds/run."""
    header = f"{'method':<10} {'test accuracy (%)':>18} {'seeds':>6} {'s/run':>7}"
    lines = [header, "-" * len(header)]
    for row in summary:
        accuracy = f"{100 * row['accuracy_mean']:.2f} +- {100 * row['accuracy_std']:.2f}"
        lines.append(f"{row['method']:<10} {accuracy:>18} {row['runs']:>6} "
                     f"{row['seconds']:>7.1f}")
    return "\n".join(lines)


def plot(results, path):
    """Bar chart of the methods' test accuracies (error bars: std over seeds) and, when
    L2T-ww ran, the heat map of its mean learned Where weights (source x target layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = results["summary"]
    where = results.get("where_weights")
    figure, axes = plt.subplots(1, 2 if where else 1, figsize=(11 if where else 6, 4),
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
    if where:
        heat = axes[0][1]
        matrix = np.array([[np.nan if v is None else v for v in row] for row in where["matrix"]])
        image = heat.imshow(matrix, cmap="viridis")
        heat.set_xticks(range(len(where["target_layers"])), where["target_layers"])
        heat.set_yticks(range(len(where["source_layers"])), where["source_layers"])
        heat.set_xlabel("target layer")
        heat.set_ylabel("source layer")
        heat.set_title("L2T-ww: mean learned where-weight")
        for (m, n), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                heat.text(n, m, f"{value:.2f}", ha="center", va="center", color="w")
        figure.colorbar(image, ax=heat)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

"""Plots the benchmark history (``history.csv``, see ``history.py``) over time.

One panel per (kernel, metric), one line per (implementation, mode, host): the value of
each run against its date (a mode, e.g. the thread count or the allocator, is another
measurement, not another point of the same one). Needs matplotlib (``pip install matplotlib``).

    python benchmarks/plot_history.py                       # writes benchmarks/history.png
    python benchmarks/plot_history.py --kernel loss/cifar --metric median_ms -o cifar.png
"""
import argparse
import sys
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import history  # noqa: E402


def series(rows, kernel=None, metric=None):
    """``{(kernel, metric): {(implementation, mode, host): [(date, value)]}}``, dates
    sorted."""
    panels = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if (kernel and row["kernel"] != kernel) or (metric and row["metric"] != metric):
            continue
        date = datetime.strptime(row["date"], "%Y-%m-%dT%H:%M:%SZ")
        line = row["implementation"], row["mode"], row["host"]
        panels[row["kernel"], row["metric"]][line].append((date, row["value"]))
    for lines in panels.values():
        for points in lines.values():
            points.sort()
    return panels


def plot(panels, output):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    if not panels:
        raise SystemExit("no rows to plot (check --kernel and --metric)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    hosts = sorted({host for lines in panels.values() for _, _, host in lines})
    markers = dict(zip(hosts, "os^vDx+*"))
    for ax, ((kernel, metric), lines) in zip(axes[:, 0], sorted(panels.items())):
        for (implementation, mode, host), points in sorted(lines.items()):
            dates, values = zip(*points)
            label = f"{implementation} [{mode}]" + (f" ({host})" if len(hosts) > 1 else "")
            ax.plot(dates, values, marker=markers.get(host, "."), label=label)
        # matplotlib widens a date range of one instant to years: pad it ourselves
        dates = [date for points in lines.values() for date, _ in points]
        pad = max((max(dates) - min(dates)) * 0.05, timedelta(minutes=30))
        ax.set_xlim(min(dates) - pad, max(dates) + pad)
        ax.set_title(f"{kernel}: {metric}")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    return output


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", default=str(history.HISTORY), help="the CSV to read")
    parser.add_argument("--kernel", help="only this kernel (e.g. loss/cifar)")
    parser.add_argument("--metric", help="only this metric (e.g. median_ms)")
    parser.add_argument("-o", "--output", default=str(Path(history.HISTORY).with_suffix(".png")))
    args = parser.parse_args()
    panels = series(history.read(args.history), args.kernel, args.metric)
    print(f"wrote {plot(panels, args.output)}")


if __name__ == "__main__":
    main()

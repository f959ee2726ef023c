"""The benchmark history: the CSV writer that every benchmark run appends to."""
import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import history  # noqa: E402
import plot_history  # noqa: E402


def test_rows_have_the_expected_columns_and_one_header(tmp_path):
    path = tmp_path / "history.csv"
    history.append([dict(kernel="loss/cifar", implementation="cpu", mode="forward+backward",
                         metric="median_ms", value="41.5")], path)
    history.append([dict(kernel="loss/cifar", implementation="reference",
                         mode="forward+backward", metric="peak_bytes", value="1e+08")], path)
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(history.COLUMNS)
    assert {"kernel", "implementation", "mode", "metric", "value", "host", "date"} <= set(lines[0])
    assert len(lines) == 3
    rows = history.read(path)
    assert [r["implementation"] for r in rows] == ["cpu", "reference"]
    assert rows[0]["value"] == 41.5 and rows[0]["host"] == history.host()
    assert rows[0]["date"].endswith("Z")
    panels = plot_history.series(rows, metric="median_ms")
    assert list(panels) == [("loss/cifar", "median_ms")]


def test_each_mode_is_its_own_line(tmp_path):
    path = tmp_path / "history.csv"
    history.append([dict(kernel="iteration-paper", implementation="l2tww", mode=mode,
                         metric="median_ms", value=value)
                    for mode, value in (("1 thread", "8400"), ("2 threads", "4400"))], path)
    lines = plot_history.series(history.read(path))["iteration-paper", "median_ms"]
    assert sorted((mode, [v for _, v in points]) for (_, mode, _), points in lines.items()) == [
        ("1 thread", [8400.0]), ("2 threads", [4400.0])]


def test_a_row_without_its_value_is_refused(tmp_path):
    with pytest.raises(ValueError, match="value"):
        history.append([dict(kernel="k", implementation="i", mode="", metric="m")],
                       tmp_path / "history.csv")

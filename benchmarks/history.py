"""The history of benchmark runs: one CSV row per measured number, appended by every run
(the pytest benchmarks through ``conftest.py``, ``floor.py`` itself), so that results can
be plotted over time (``plot_history.py``).

A row says what was measured (kernel, implementation, mode, metric, value) and where and
when: the CPU model and core count (shared hosts change from session to session), the
one-minute load average at the time (other jobs slow a shared host down), the torch
version and the commit.
"""
import csv
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

HISTORY = Path(__file__).resolve().parent / "history.csv"
COLUMNS = ("date", "host", "load", "kernel", "implementation", "mode", "metric", "value",
           "torch", "commit")


def host():
    """``"<CPU model> x<cores>"``, plus the GPU's name where one is visible."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = f"{model} x{os.cpu_count()}"
    if torch.cuda.is_available():
        name += f" + {torch.cuda.get_device_name()}"
    return name


def commit():
    """The checkout's commit (``+`` when it has uncommitted changes), or ``""``."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+" if dirty.strip() else "")


def append(measurements, path=HISTORY):
    """Appends ``measurements`` (dicts with kernel, implementation, mode, metric, value)
    to the CSV at ``path``, stamped with date, host, load, torch and commit; writes the
    header first if the file is new. Returns the rows written."""
    stamp = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "host": host(), "load": f"{os.getloadavg()[0]:.2f}",
             "torch": torch.__version__, "commit": commit()}
    rows = []
    for measurement in measurements:
        missing = {"kernel", "implementation", "mode", "metric", "value"} - set(measurement)
        if missing:
            raise ValueError(f"a measurement lacks {sorted(missing)}: {measurement}")
        rows.append({**stamp, **{k: measurement[k] for k in COLUMNS if k in measurement}})
    if not rows:
        return rows
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return rows


def read(path=HISTORY):
    """The rows of the CSV at ``path``, values as floats."""
    with open(path, newline="") as f:
        return [{**row, "value": float(row["value"])} for row in csv.DictReader(f)]

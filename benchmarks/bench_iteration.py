"""One full L2T-ww training iteration (the real step and the meta step, T = 2) on CPU:
``L2TWW.step`` against the paper's deepcopy-and-replay iteration
(``paper_setting.PaperStyle``), in two settings:

- ``paper``: the paper's CIFAR setting (``paper_setting.py``: ResNet32 source, VGG9-BN
  target, 15 pairs, batch 64 of 32x32 images, its optimiser settings);
- ``main-job``: the shapes of ``l2t-fast transfer``'s default job (resnet14 source and
  target at 16 px, their three stages, 9 pairs, batch 25, 5 classes, the task scenario's
  beta 0.2, meta_lr 1e-2 and weight decay 5e-4).

Implementations: ``l2tww`` (ours) and ``paper-style``, each on its own engine built from
the same seed and one iteration of ours into training (momentum and Adam state exist).

Time: ``python benchmarks/bench_iteration.py --paired SETTING THREADS ROUNDS`` runs both
in turn within each round, each twice in a row with the second call timed, so that a
shared host's drift hits a round's two alike, and prints each round's speed-up;
``pytest benchmarks/bench_iteration.py --benchmark-only`` times each (setting, threads,
implementation). Peak memory: ``python benchmarks/bench_iteration.py --memory SETTING
THREADS`` runs one iteration of each in a fresh process and reports the peak RSS growth
above the RSS just before it, as ``bench_meta_step.py`` does (VmHWM reset by
/proc/self/clear_refs, glibc told to map and return large blocks at once). All three
append their numbers to the history (``history.py``).
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import history  # noqa: E402
import paper_setting  # noqa: E402
from bench_meta_step import MALLOC_ENV, _status_kib  # noqa: E402

from l2t_fast.methods.l2tww.engine import L2TWW  # noqa: E402
from l2t_fast.models import build_model  # noqa: E402

MAIN_JOB = dict(batch=25, size=16, classes=5, layers=["layer1", "layer2", "layer3"],
                options=dict(beta=0.2, meta_lr=1e-2, weight_decay=5e-4, lr=0.1, momentum=0.9))


def make_main_job_engine(seed=0, dtype=torch.float32):
    """An engine on the main job's shapes (random weights: the time does not depend on
    them), one iteration into training, and a batch."""
    torch.manual_seed(seed)
    source = build_model("resnet14", MAIN_JOB["classes"]).to(dtype)
    target = build_model("resnet14", MAIN_JOB["classes"]).to(dtype)
    x = torch.randn(MAIN_JOB["batch"], 3, MAIN_JOB["size"], MAIN_JOB["size"], dtype=dtype)
    y = torch.randint(0, MAIN_JOB["classes"], (MAIN_JOB["batch"],))
    engine = L2TWW(source, target, MAIN_JOB["layers"], MAIN_JOB["layers"], example_input=x[:2],
                   **MAIN_JOB["options"])
    engine.step(x, y)
    return engine, x, y


SETTINGS = {"paper": paper_setting.make_engine, "main-job": make_main_job_engine}


def ours(engine):
    return engine.step


def paper_style(engine):
    """Built before it runs: its ``.grad`` fields, which the paper's code keeps from one
    iteration to the next, are then there already, as in its steady state."""
    return paper_setting.PaperStyle(engine).iteration


IMPLEMENTATIONS = {"l2tww": ours, "paper-style": paper_style}  # name: engine -> iteration(x, y)


def _mode(threads):
    return f"{threads} thread{'s' * (threads > 1)}"


def peak_memory_mib(setting, threads, name):
    """Peak RSS growth of one iteration of ``name``, measured in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--one", setting, str(threads), name],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, **MALLOC_ENV}).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth_mib"]


def _measure_one(setting, threads, name):
    torch.set_num_threads(threads)
    engine, x, y = SETTINGS[setting]()
    iteration = IMPLEMENTATIONS[name](engine)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    iteration(x, y)
    peak = _status_kib("VmHWM")
    print(json.dumps({"implementation": name, "peak_growth_mib": (peak - before) / 1024}))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_iteration(benchmark, name, setting, threads):
    torch.set_num_threads(threads)
    benchmark.extra_info.update(kernel=f"iteration-{setting}", implementation=name,
                                mode=_mode(threads),
                                peak_rss_growth_mib=peak_memory_mib(setting, threads, name))
    rounds = 3 if setting == "paper" else 10

    def fresh_problem():  # repeated steps on one random batch drift (lr 0.1): start anew
        engine, x, y = SETTINGS[setting]()
        iteration = IMPLEMENTATIONS[name](engine)
        iteration(x, y)  # warm: the timed call is the engine's third step
        return (iteration, x, y), {}

    benchmark.pedantic(lambda iteration, x, y: iteration(x, y), setup=fresh_problem,
                       rounds=rounds)


def paired_times(setting, threads, rounds):
    """``{name: [seconds per round]}``: each round runs every implementation in turn on a
    fresh engine (repeated steps on one random batch drift at lr 0.1), twice in a row,
    and times the second call."""
    torch.set_num_threads(threads)
    times = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(rounds):
        for name, implementation in IMPLEMENTATIONS.items():
            engine, x, y = SETTINGS[setting]()
            iteration = implementation(engine)
            iteration(x, y)
            start = time.perf_counter()
            iteration(x, y)
            times[name].append(time.perf_counter() - start)
    return times


def _print_paired(setting, threads, rounds):
    times = paired_times(setting, threads, rounds)
    ratios = sorted(p / o for p, o in zip(times["paper-style"], times["l2tww"]))
    for name, seconds in times.items():
        print(f"{setting}, {threads} thread(s), {name}: median {statistics.median(seconds) * 1e3:.0f}"
              f" ms, rounds {' '.join(f'{s * 1e3:.0f}' for s in seconds)}")
    print(f"ours faster by {statistics.median(ratios):.2f}x (median of rounds), "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}x (every round); load {os.getloadavg()[0]:.2f}")
    kernel, mode = f"iteration-{setting}", f"{_mode(threads)}, paired rounds"
    history.append([
        *[dict(kernel=kernel, implementation=name, mode=mode, metric="median_ms",
               value=f"{statistics.median(seconds) * 1e3:.6g}") for name, seconds in times.items()],
        dict(kernel=kernel, implementation="paper-style", mode=mode,
             metric="time_ratio_to_ours_paired", value=f"{statistics.median(ratios):.6g}")])


def _print_memory(setting, threads):
    peaks = {name: peak_memory_mib(setting, threads, name) for name in IMPLEMENTATIONS}
    for name, peak in peaks.items():
        print(f"{setting}, {threads} thread(s), {name}: peak RSS growth {peak:.1f} MiB")
    print(f"ours uses {peaks['paper-style'] / peaks['l2tww']:.2f}x less")
    history.append([dict(kernel=f"iteration-{setting}", implementation=name, mode=_mode(threads),
                         metric="peak_rss_growth_mib", value=f"{peak:.6g}")
                    for name, peak in peaks.items()])


if __name__ == "__main__":
    command = sys.argv[1:2]
    if command == ["--one"]:
        _measure_one(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif command == ["--paired"]:
        _print_paired(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif command == ["--memory"]:
        _print_memory(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)

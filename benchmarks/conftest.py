"""Prints each benchmark's time and peak memory as ratios to the references of its config,
and appends every benchmark's numbers to the run history (``history.py``).

Benchmarks run with the host allocator as ``l2t-fast`` runs it: glibc keeps freed blocks
(``l2t_fast.retain_freed_memory``), for every implementation alike; ``--default-malloc``
measures glibc's defaults instead, where each step page-faults its big tensors back in.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import history  # noqa: E402
from l2t_fast.host_memory import retain_freed_memory  # noqa: E402

# References of bench_loss.py that the summary divides by: (column title, implementation).
RATIO_TO = (("x eager", "reference"), ("x compile", "reference-compiled"),
            ("x conv2d", "conv2d"), ("x conv2d-c", "conv2d-compiled"))


def pytest_addoption(parser):
    parser.addoption("--default-malloc", action="store_true",
                     help="keep glibc's malloc defaults (no retain_freed_memory)")


def pytest_configure(config):
    config.retained_freed_memory = (not config.getoption("--default-malloc")
                                    and retain_freed_memory())


def measurements(bench, retained):
    """History rows of one pytest-benchmark result: its times, and its numeric extra_info
    (peak memory and the like); ``retained``: run with ``retain_freed_memory``, which the
    mode column says."""
    info = bench.extra_info
    module = Path(bench.fullname.split("::")[0]).stem.removeprefix("bench_")
    kernel = info.get("kernel", module)
    implementation = info.get("implementation", bench.param or bench.name)
    mode = info.get("mode", "")
    if retained:
        mode = f"{mode}, malloc retained" if mode else "malloc retained"
    values = {"median_ms": bench.stats.median * 1e3, "min_ms": bench.stats.min * 1e3}
    values.update((key, value) for key, value in info.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool))
    return [dict(kernel=kernel, implementation=implementation, mode=mode, metric=metric,
                 value=f"{value:.6g}") for metric, value in values.items()]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    history.append([row for bench in session.benchmarks
                    for row in measurements(bench, config.retained_freed_memory)])
    rows = {}
    for bench in session.benchmarks:
        info = bench.extra_info
        if "config" in info:
            rows.setdefault(info["config"], {})[info["implementation"]] = (
                bench.stats.median, info["peak_bytes"])
    if not rows:
        return
    write = terminalreporter.write_line
    write("")
    write(f"history appended to {history.HISTORY}")
    write("host allocator: " + ("freed blocks retained (l2t_fast.retain_freed_memory)"
                                if config.retained_freed_memory else "glibc defaults"))
    write("ratios (reference / ours: >1 means ours is faster or smaller)")
    write(f"{'config':<18}{'implementation':<20}{'median ms':>10}{'peak MB':>9}"
          + "".join(f"{title:>11}" for title, _ in RATIO_TO) + f"{'mem x eager':>12}")
    for name, results in rows.items():
        eager = results.get("reference")
        for impl, (median, peak) in results.items():
            speeds = "".join(f"{results[ref][0] / median:11.2f}" if ref in results
                             else f"{'-':>11}" for _, ref in RATIO_TO)
            memory = f"{eager[1] / peak:12.2f}" if eager and peak else f"{'-':>12}"
            write(f"{name:<18}{impl:<20}{median * 1e3:10.1f}{peak / 2**20:9.1f}"
                  f"{speeds}{memory}")

"""Prints each benchmark's time and peak memory as ratios to the references of its config."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
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
    write("ratios (reference / ours: >1 means ours is faster or smaller)")
    write(f"{'config':<18}{'implementation':<20}{'median ms':>10}{'peak MB':>9}"
          f"{'x eager':>9}{'x compile':>10}{'mem x eager':>12}")
    for name, results in rows.items():
        eager = results.get("reference")
        compiled = results.get("reference-compiled")
        for impl, (median, peak) in results.items():
            speed = f"{eager[0] / median:9.2f}" if eager else f"{'-':>9}"
            speed_c = f"{compiled[0] / median:10.2f}" if compiled else f"{'-':>10}"
            memory = f"{eager[1] / peak:12.2f}" if eager and peak else f"{'-':>12}"
            write(f"{name:<18}{impl:<20}{median * 1e3:10.1f}{peak / 2**20:9.1f}"
                  f"{speed}{speed_c}{memory}")

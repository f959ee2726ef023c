"""Sweeps of many transfer runs on Ray Tune: ``l2t-fast sweep``.

A grid (a YAML/JSON file and/or ``--set key=v1,v2``) over options of ``l2t-fast transfer``
expands to one trial per combination; Ray Tune runs the trials, locally or on an existing
cluster (``--address``), each with the CPUs/GPUs it asks for.

The sweep directory, not Ray's experiment state, is the source of truth, so that a sweep
survives anything that stops it (Ctrl-C, a lost driver, a failed trial) and can be extended:

    OUT/trials/<id>/options.json      the trial's options (written before it runs)
    OUT/trials/<id>/checkpoints/      run_transfer's checkpoints, one per epoch
    OUT/trials/<id>/trial.json        written last, atomically: the trial is finished
    OUT/trials/<id>/error.txt         traceback of the trial's last failure
    OUT/results.csv, results.json, summary.png
    OUT/ray/<start time>/             Ray Tune's own logs, for inspection only

``<id>`` is a hash of the trial's options, so the same grid gives the same ids. Running the
same command again skips trials that have ``trial.json``, resumes the others from their last
checkpoint (``run_transfer(resume=True)``), and retries failed ones. On a multi-node cluster
OUT must be on a filesystem that every node mounts (as Ray Tune requires of its storage).

Ray is an optional dependency (``pip install l2t_fast[sweep]``), imported only when a sweep
runs, so that ``import l2t_fast`` and ``l2t-fast --help`` work without it.
"""
import csv
import hashlib
import itertools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from l2t_fast.jobs import options as option_table
from l2t_fast.jobs.runs import JOB_FILE

INSTALL_HINT = ("l2t-fast sweep runs on Ray Tune, which is not installed; install it with "
                "`pip install 'l2t_fast[sweep]'` (or `pip install 'ray[tune]'`)")
TRIAL_RESULT_FILE = "trial.json"


def _import_ray():
    """Import Ray Tune, or fail with the command that installs it."""
    try:
        import ray
        from ray import tune
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return ray, tune


# ---------------------------------------------------------------------------------------
# The grid


def _split_top_level(text):
    """Split on commas that are outside brackets and quotes: ``a,[b,c],"d,e"``."""
    items, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    items.append("".join(current).strip())
    return items


def _parse_set_item(key, text):
    """One value of ``--set``: a list in brackets or a quoted string (read as YAML), else
    the word itself, which the option's kind reads (``1e-4``, ``off`` and ``0`` mean what
    they mean on the command line)."""
    import yaml

    if not text:
        raise ValueError(f"--set {key}: empty value")
    value = text
    if text[0] in "[\"'":
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"--set {key}: cannot parse {text!r}: {error}") from None
    return option_table.coerce(key, value)


def parse_set_option(text):
    """``"key=v1,v2"`` -> ``(key, [v1, v2])`` with values of the option's type."""
    if "=" not in text:
        raise ValueError(f"--set takes KEY=VALUE[,VALUE...], got {text!r}")
    raw_key, values = text.split("=", 1)
    key = _option_name(raw_key)
    return key, [_parse_set_item(key, item) for item in _split_top_level(values)]


def _option_name(raw_key):
    key = raw_key.strip().lstrip("-").replace("-", "_")
    known = option_table.table()
    if key not in known:
        raise ValueError(f"unknown transfer option {raw_key!r}; options: {', '.join(sorted(known))}")
    return key


def load_grid_file(path):
    """A YAML or JSON mapping ``option: value`` or ``option: [values...]`` -> grid.

    As with ``--set``, a list is always the values to sweep; a single value that is itself a
    list is nested (``methods: [[l2t-ww, fm]]`` is one trial running both methods).
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"grid file {str(path)!r} must hold a mapping of option to values, "
                         f"got {type(data).__name__}")
    grid = {}
    for raw_key, value in data.items():
        key = _option_name(str(raw_key))
        values = value if isinstance(value, list) else [value]
        grid[key] = [option_table.coerce(key, item) for item in values]
    return grid


def build_grid(grid_file=None, set_options=()):
    """The grid ``{option: [values]}`` from a file and ``--set`` options (``--set`` wins)."""
    grid = load_grid_file(grid_file) if grid_file else {}
    for text in set_options:
        key, values = parse_set_option(text)
        grid[key] = values
    if not grid:
        raise ValueError("nothing to sweep: give a grid file (--grid) or --set KEY=VALUES")
    for key, values in grid.items():
        if not values:
            raise ValueError(f"option {key!r} has no values")
        canonical = [_canonical(value) for value in values]
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"option {key!r} lists a value twice: {values!r}")
    return grid


def expand_grid(grid):
    """Every combination of the grid, as a list of option dicts (last option varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combination)) for combination in itertools.product(*grid.values())]


def _canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def trial_id(options):
    """Stable id of a trial: a hash of its options, independent of their order."""
    return hashlib.sha1(_canonical(options).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# Running trials


def _write_atomic(path, text):
    """Write then rename, so a reader never sees half a file (a finished trial is one whose
    ``trial.json`` exists)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _run_trial(ray_config, *, trial_function, sweep_dir, working_dir):
    """Ray Tune trainable: run one trial into its own directory of the sweep.

    Ray starts trials in a directory of its own; the trial moves to the sweep's working
    directory (where it exists on the node) so that relative paths in options such as
    ``data`` or ``source_checkpoint`` mean what they mean to ``l2t-fast transfer``.
    """
    from ray import tune

    if os.path.isdir(working_dir):
        os.chdir(working_dir)
    trial = ray_config["trial"]
    trial_dir = Path(sweep_dir, "trials", trial["id"])
    checkpoint_dir = trial_dir / "checkpoints"
    resume = (trial_dir / JOB_FILE).exists()  # an earlier attempt started: continue it
    error_file = trial_dir / "error.txt"
    error_file.unlink(missing_ok=True)  # so that it always tells about this attempt
    try:
        result = trial_function(dict(trial["options"]), output_dir=str(trial_dir),
                                checkpoint_dir=str(checkpoint_dir), resume=resume,
                                progress=False,
                                on_epoch=lambda metrics: tune.report({"metrics": metrics}))
    except Exception:
        _write_atomic(error_file, traceback.format_exc())
        raise
    record = {"trial_id": trial["id"], "options": trial["options"], "resumed": resume,
              "result": result}
    _write_atomic(trial_dir / TRIAL_RESULT_FILE, json.dumps(record, indent=2))


def _describe_error(error):
    """One line for the results table: the trial's own exception, not Ray's wrapper."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]


def _format_options(options):
    return " ".join(f"{key}={value if isinstance(value, str) else _canonical(value)}"
                    for key, value in options.items())


def _format_summary(result):
    parts = []
    for row in result.get("summary", []):
        std = row.get("accuracy_std")
        spread = f" ± {std:.4g}" if isinstance(std, (int, float)) and not math.isnan(std) else ""
        mean = row.get("accuracy_mean")
        parts.append(f"{row.get('method')} " + ("diverged" if mean is None else
                                                 f"{mean:.4g}{spread}"))
    return ", ".join(parts)


def _progress_callback(tune, sweep_dir, labels, total, write):
    """A Tune callback printing one line per trial start, epoch, finish and failure;
    ``labels`` names each trial id by the options that vary in the sweep."""

    class SweepProgress(tune.Callback):
        def __init__(self):
            self.done = 0

        def _label(self, trial):
            trial_id = trial.config["trial"]["id"]
            return f"trial {trial_id} ({labels[trial_id]})"

        def on_trial_start(self, iteration, trials, trial, **info):
            write(f"started {self._label(trial)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            metrics = result.get("metrics") or {}
            shown = " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                             for key, value in metrics.items())
            write(f"  {trial.config['trial']['id']}: {shown}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            record_path = Path(sweep_dir, "trials", trial.config["trial"]["id"], TRIAL_RESULT_FILE)
            summary = _format_summary(json.loads(record_path.read_text())["result"])
            write(f"[{self.done}/{total}] finished {self._label(trial)}: {summary}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            error_file = Path(sweep_dir, "trials", trial.config["trial"]["id"], "error.txt")
            lines = error_file.read_text().strip().splitlines() if error_file.is_file() else []
            reason = lines[-1] if lines else "the trial's worker died (see Ray's log above)"
            write(f"[{self.done}/{total}] FAILED {self._label(trial)}: {reason}")

    return SweepProgress()


def _print_progress(line):
    print(line, file=sys.stderr, flush=True)


def _check_resources(cpus_per_trial, gpus_per_trial):
    if not cpus_per_trial > 0:
        raise ValueError(f"cpus_per_trial must be > 0, got {cpus_per_trial}")
    if not gpus_per_trial >= 0:
        raise ValueError(f"gpus_per_trial must be >= 0, got {gpus_per_trial}")


def run_sweep(trials, output_dir, *, trial_function=None, cpus_per_trial=1.0,
              gpus_per_trial=0.0, progress=True):
    """Run every trial (a list of option dicts) not finished yet in ``output_dir`` on Ray Tune.

    Uses the Ray session already started (``ray.init``), or starts a local one.
    ``trial_function`` is called like ``run_transfer`` (the default) in a Ray worker.
    Returns the results table: a list of row dicts, also written to ``results.csv``/``.json``
    and drawn in ``summary.png``. A failed trial becomes a row with its error; the others go on.
    """
    _check_resources(cpus_per_trial, gpus_per_trial)
    if not trials:
        raise ValueError("trials is empty: nothing to run")
    _, tune = _import_ray()
    if trial_function is None:
        from l2t_fast.jobs.transfer import run_transfer as trial_function
    sweep_dir = Path(output_dir).resolve()
    options_by_id = {trial_id(options): options for options in trials}
    if len(options_by_id) != len(trials):
        raise ValueError("trials lists the same options twice")
    pending = [tid for tid in options_by_id if not _finished_record(sweep_dir, tid)]
    write = _print_progress if progress else (lambda line: None)
    write(f"sweep: {len(trials)} trials, {len(trials) - len(pending)} finished earlier "
          f"(skipped), {len(pending)} to run -> {sweep_dir}")

    varying = _varying_keys(trials)
    labels = {tid: _format_options({key: options[key] for key in varying if key in options})
              for tid, options in options_by_id.items()}
    errors = {}
    if pending:
        for tid in pending:
            trial_dir = sweep_dir / "trials" / tid
            trial_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(trial_dir / "options.json", json.dumps(options_by_id[tid], indent=2))
        trainable = tune.with_resources(
            tune.with_parameters(_run_trial, trial_function=trial_function,
                                 sweep_dir=str(sweep_dir), working_dir=os.getcwd()),
            {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(
                [{"id": tid, "options": options_by_id[tid]} for tid in pending])},
            tune_config=tune.TuneConfig(
                trial_dirname_creator=lambda trial: trial.config["trial"]["id"]),
            run_config=tune.RunConfig(
                name=time.strftime("%Y-%m-%d_%H-%M-%S"),
                storage_path=str(sweep_dir / "ray"), verbose=0,
                callbacks=[_progress_callback(tune, sweep_dir, labels, len(pending), write)]))
        for result in tuner.fit():
            if result.error is not None:
                errors[result.config["trial"]["id"]] = _describe_error(result.error)

    rows = results_table(sweep_dir, trials, errors)
    write_results(rows, sweep_dir, grid_keys=varying)
    finished = sum(row["status"] == "finished" for row in _one_row_per_trial(rows))
    write(f"sweep: {finished}/{len(trials)} trials finished; results in {sweep_dir}")
    return rows


def _finished_record(sweep_dir, tid):
    path = sweep_dir / "trials" / tid / TRIAL_RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------
# Results


def _varying_keys(trials):
    """Options that take more than one value across the trials, in grid order."""
    keys = list(dict.fromkeys(key for options in trials for key in options))
    return [key for key in keys
            if len({_canonical(options.get(key)) for options in trials}) > 1]


def _cell(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else _canonical(value)


def results_table(sweep_dir, trials, errors=None):
    """One row per (trial, method) of a finished trial, one row per other trial.

    Status is ``finished``, ``failed`` (error from ``errors``, by trial id) or ``unfinished``
    (interrupted or never started: running the sweep again resumes it).
    """
    errors = errors or {}
    rows = []
    for options in trials:
        tid = trial_id(options)
        base = {"trial_id": tid, **{key: _cell(value) for key, value in options.items()}}
        record = _finished_record(Path(sweep_dir), tid)
        if record is None:
            status = "failed" if tid in errors else "unfinished"
            rows.append({**base, "status": status, "method": None, "accuracy_mean": None,
                         "accuracy_std": None, "diverged": None, "seconds": None,
                         "error": errors.get(tid)})
            continue
        for summary in record["result"]["summary"]:
            rows.append({**base, "status": "finished", "method": summary["method"],
                         "accuracy_mean": summary["accuracy_mean"],
                         "accuracy_std": summary.get("accuracy_std"),
                         "diverged": summary.get("diverged", 0),
                         "seconds": summary.get("seconds"), "error": None})
    return rows


def _one_row_per_trial(rows):
    return list({row["trial_id"]: row for row in rows}.values())


def best_row(rows):
    """The finished row with the highest mean accuracy, or None."""
    finished = [row for row in rows if row["status"] == "finished"
                and row["accuracy_mean"] is not None and not math.isnan(row["accuracy_mean"])]
    return max(finished, key=lambda row: row["accuracy_mean"], default=None)


def write_results(rows, output_dir, grid_keys):
    """``results.csv``, ``results.json`` (rows and best row) and ``summary.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(output_dir / "results.csv.partial", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(output_dir / "results.csv.partial", output_dir / "results.csv")
    _write_atomic(output_dir / "results.json",
                  json.dumps({"rows": rows, "best": best_row(rows)}, indent=2))
    plot_summary(rows, grid_keys, output_dir / "summary.png")


def _ordered(values):
    """Distinct values in numeric order when they are all numbers, else in text order."""
    distinct = list({str(value): value for value in values}.values())
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in distinct):
        return sorted(distinct)
    return sorted(distinct, key=str)


def plot_summary(rows, grid_keys, path):
    """Accuracy against each swept option (and method, when several), best row starred.

    Every value of an option gets a slot, also when none of its trials finished, so that
    gaps show."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [row for row in rows if row["status"] == "finished"]
    methods = _ordered(row["method"] for row in finished)
    panels = list(grid_keys)
    if len(methods) > 1 and "method" not in panels:
        panels.append("method")
    panels = panels or ["method"]
    colors = {method: plt.get_cmap("tab10")(i % 10) for i, method in enumerate(methods)}
    best = best_row(rows)
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for axis, key in zip(axes[0], panels):
        labels = [str(value) for value in _ordered(row[key] for row in rows if row[key] is not None)]
        position = {label: i for i, label in enumerate(labels)}
        for method in methods:
            mine = [row for row in finished
                    if row["method"] == method and row["accuracy_mean"] is not None]
            axis.errorbar([position[str(row[key])] for row in mine],
                          [row["accuracy_mean"] for row in mine],
                          yerr=[row["accuracy_std"] or 0.0 for row in mine], fmt="o",
                          color=colors[method], alpha=0.7, capsize=3, label=method)
        if best is not None:
            axis.plot(position[str(best[key])], best["accuracy_mean"], marker="*", markersize=16,
                      color="tab:red", linestyle="none", label="best")
        axis.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0)
        axis.set_xlim(-0.5, len(labels) - 0.5)
        axis.set_xlabel(key)
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
    if finished:
        axes[0][-1].legend(loc="best", fontsize=8)
    unfinished = sum(row["status"] != "finished" for row in _one_row_per_trial(rows))
    title = "no finished trial" if best is None else (
        f"best {best['accuracy_mean']:.4g}: "
        + ", ".join(f"{key}={best[key]}" for key in panels))
    if unfinished:
        title += f"   ({unfinished} trials not finished)"
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------
# Command line


def add_arguments(parser):
    """Options of ``l2t-fast sweep`` (needs no Ray, so ``--help`` always works)."""
    parser.description = (
        "Run one `l2t-fast transfer` per combination of option values, as Ray Tune trials. "
        "Results: OUTPUT_DIR/results.csv, results.json, summary.png. Running the same command "
        "again skips finished trials and resumes the others from their last checkpoint.")
    parser.add_argument("--grid", metavar="FILE",
                        help="YAML or JSON file mapping transfer options to a value or a list "
                             "of values to sweep")
    parser.add_argument("--set", dest="set_options", action="append", default=[],
                        metavar="KEY=V1,V2",
                        help="sweep a transfer option over comma-separated values (repeatable; "
                             "overrides --grid); lists in brackets: pairs=[[0,0],[1,1]]")
    parser.add_argument("--output-dir", required=True,
                        help="sweep directory; run the same command again to resume it")
    parser.add_argument("--address", default=None,
                        help="address of a running Ray cluster to run the trials on (`auto` on "
                             "one of its nodes); default: start Ray on this machine")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="N",
                        help="CPUs Ray reserves for each trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="N",
                        help="GPUs Ray reserves for each trial; a fraction shares a GPU "
                             "(e.g. 0.25 runs four trials per GPU; default 0)")
    return parser


def main(args):
    """Run ``l2t-fast sweep``; returns the exit code (0: every trial finished)."""
    try:
        ray, _ = _import_ray()
        from l2t_fast.jobs.transfer import resolve_config
        trials = expand_grid(build_grid(args.grid, args.set_options))
        for options in trials:  # a bad value fails now, not in a trial hours later
            resolve_config(options)
        _check_resources(args.cpus_per_trial, args.gpus_per_trial)
    except (ImportError, ValueError, TypeError, OSError) as error:
        print(f"l2t-fast sweep: error: {error}", file=sys.stderr)
        return 2
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=args.address)
    try:
        rows = run_sweep(trials, args.output_dir, cpus_per_trial=args.cpus_per_trial,
                         gpus_per_trial=args.gpus_per_trial)
    finally:
        if started_here:
            ray.shutdown()
    statuses = [row["status"] for row in _one_row_per_trial(rows)]
    if statuses.count("finished") < len(statuses):
        print(f"l2t-fast sweep: {statuses.count('failed')} trials failed (errors in results.csv "
              f"and trials/<id>/error.txt), {statuses.count('unfinished')} interrupted; run the "
              f"same command again to retry and resume them (not Ray's Tuner.restore)",
              file=sys.stderr)
        return 1
    return 0

"""Tests of l2t_fast.jobs.sweep: the grid, the results table and plot, and sweeps on a local Ray
(tiny fake trials; one real run_transfer smoke test), including interrupt and resume."""
import argparse
import csv
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2t_fast.jobs import sweep
from l2t_fast.jobs import options


def parse_cli(argv):
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------
# The grid


def test_set_values_take_the_type_of_the_default():
    grid = sweep.build_grid(set_options=[
        "beta=1,0.5", "inner-steps=1,2", "--meta_lr=1e-4", "methods=fm,[l2t-w,l2t-ww]",
        "seeds=[0,1]", "pairs=all,[[0,0],[1,2]]", "device='cuda:0'", "data=1e-4",
        "labels_per_class=3"])
    assert grid == {
        "beta": [1.0, 0.5], "inner_steps": [1, 2], "meta_lr": [1e-4],
        "methods": [["fm"], ["l2t-w", "l2t-ww"]], "seeds": [[0, 1]], "labels_per_class": [3],
        "pairs": ["all", [[0, 0], [1, 2]]], "device": ["cuda:0"], "data": ["1e-4"]}
    assert type(grid["beta"][0]) is float and type(grid["inner_steps"][0]) is int


@pytest.mark.parametrize("option, message", [
    ("alpha=1", "unknown transfer option 'alpha'"),
    ("beta=fast", "beta must be a finite number"),
    ("beta=inf", "beta must be a finite number"),
    ("epochs=1.5", "epochs must be an int"),
    ("epochs=true", "epochs must be an int"),
    ("beta=0.5,.5", "lists a value twice"),
    ("beta", "KEY=VALUE"),
    ("beta=0.5,", "empty value"),
])
def test_bad_set_options_are_value_errors_naming_the_option(option, message):
    with pytest.raises(ValueError, match=message):
        sweep.build_grid(set_options=[option])


def test_an_empty_grid_is_an_error():
    with pytest.raises(ValueError, match="nothing to sweep"):
        sweep.build_grid()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_grid_file_lists_sweep_scalars_fix_and_set_overrides(tmp_path, suffix):
    content = {"beta": [0.25, 1], "epochs": 3, "methods": [["fm", "l2t-ww"]], "lr": [0.1, 0.01]}
    path = tmp_path / f"grid{suffix}"
    path.write_text(json.dumps(content))  # JSON is YAML too
    grid = sweep.build_grid(path, ["lr=0.5"])
    assert grid == {"beta": [0.25, 1.0], "epochs": [3], "methods": [["fm", "l2t-ww"]],
                    "lr": [0.5]}
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must hold a mapping"):
        sweep.build_grid(path)


def test_expand_grid_is_the_product_with_the_last_option_fastest():
    trials = sweep.expand_grid({"beta": [0.1, 0.2], "inner_steps": [1, 2, 3]})
    assert len(trials) == 6
    assert trials[:2] == [{"beta": 0.1, "inner_steps": 1}, {"beta": 0.1, "inner_steps": 2}]


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(options.table())),
                       st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
                       min_size=1, max_size=4))
def test_trial_ids_are_distinct_and_do_not_depend_on_option_order(grid):
    trials = sweep.expand_grid(grid)
    ids = [sweep.trial_id(options) for options in trials]
    assert len(set(ids)) == len(trials)
    assert ids == [sweep.trial_id(dict(reversed(list(options.items())))) for options in trials]


# ---------------------------------------------------------------------------------------
# Results without Ray


def write_finished_trial(sweep_dir, options, accuracies):
    """A finished trial as the sweep leaves it: ``trials/<id>/trial.json``."""
    trial_dir = Path(sweep_dir, "trials", sweep.trial_id(options))
    trial_dir.mkdir(parents=True)
    summary = [{"method": method, "accuracy_mean": accuracy, "accuracy_std": 0.01,
                "seconds": 1.0} for method, accuracy in accuracies.items()]
    (trial_dir / sweep.TRIAL_RESULT_FILE).write_text(json.dumps(
        {"trial_id": sweep.trial_id(options), "options": options, "result": {"summary": summary}}))


def test_results_table_csv_json_and_plot(tmp_path):
    trials = sweep.expand_grid({"beta": [0.5, 1.0, 2.0], "lr": [0.1]})
    write_finished_trial(tmp_path, trials[0], {"fm": 0.5, "l2t-ww": 0.7})
    write_finished_trial(tmp_path, trials[2], {"fm": 0.4, "l2t-ww": 0.6})
    failed_id = sweep.trial_id(trials[1])
    rows = sweep.results_table(tmp_path, trials, {failed_id: "RuntimeError: boom"})
    assert [(row["beta"], row["status"], row["method"]) for row in rows] == [
        (0.5, "finished", "fm"), (0.5, "finished", "l2t-ww"), (1.0, "failed", None),
        (2.0, "finished", "fm"), (2.0, "finished", "l2t-ww")]
    assert rows[2]["error"] == "RuntimeError: boom"

    sweep.write_results(rows, tmp_path, grid_keys=["beta"])
    with open(tmp_path / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["status"] for row in table] == [row["status"] for row in rows]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["best"]["beta"] == 0.5 and saved["best"]["method"] == "l2t-ww"
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_ray_the_command_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    code = sweep.main(parse_cli(["--set", "beta=0.5,1", "--output-dir", str(tmp_path)]))
    assert code == 2
    assert "pip install 'l2t_fast[sweep]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"ray\[tune\]"):
        sweep.run_sweep([{"beta": 0.5}], tmp_path, trial_function=fake_trial)


# ---------------------------------------------------------------------------------------
# Sweeps on Ray


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module: starting Ray takes seconds."""
    ray = pytest.importorskip("ray")
    # Ray workers cannot import this test module: ship its fake trial functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def fake_trial(config, *, output_dir, checkpoint_dir, resume, progress, on_epoch,
               fail_betas=(), interrupt_betas=(), driver_pid=None):
    """Stands in for run_transfer: 2 epochs, one checkpoint file per epoch, one line in
    ``calls.txt`` per call. Raises for ``fail_betas``; for ``interrupt_betas`` sends Ctrl-C
    to the driver after its first epoch (when not resuming) and waits to be stopped."""
    with open(Path(output_dir, "calls.txt"), "a") as handle:
        handle.write(f"resume={resume}\n")
    Path(output_dir, "job.json").write_text("{}")  # as run_transfer claims its folder first
    Path(checkpoint_dir).mkdir(exist_ok=True)
    done = len(os.listdir(checkpoint_dir)) if resume else 0
    for epoch in range(done + 1, 3):
        Path(checkpoint_dir, f"epoch{epoch}").write_text("")
        on_epoch({"epoch": epoch, "test_accuracy": config["beta"] / 10})
        if config["beta"] in fail_betas:
            raise RuntimeError(f"boom at beta={config['beta']}")
        if config["beta"] in interrupt_betas and not resume:
            os.kill(driver_pid, signal.SIGINT)
            time.sleep(60)
            raise AssertionError("the interrupted sweep did not stop this trial")
    return {"config": config, "runs": [], "cwd": os.getcwd(),
            "summary": [{"method": "l2t-ww", "accuracy_mean": config["beta"] / 10,
                         "accuracy_std": 0.0, "seconds": 0.0, "epochs_run": 2 - done}]}


def calls(sweep_dir, options):
    return Path(sweep_dir, "trials", sweep.trial_id(options), "calls.txt").read_text().split()


def test_failed_trial_is_reported_others_finish_and_a_rerun_retries_only_it(
        ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # trials run where the sweep was started, as transfer would
    trials = sweep.expand_grid({"beta": [1.0, 2.0, 3.0]})
    rows = sweep.run_sweep(trials, tmp_path, progress=False,
                           trial_function=functools.partial(fake_trial, fail_betas=(2.0,)))
    assert [row["status"] for row in rows] == ["finished", "failed", "finished"]
    assert rows[1]["error"] == "RuntimeError: boom at beta=2.0"
    error_file = tmp_path / "trials" / sweep.trial_id(trials[1]) / "error.txt"
    assert "RuntimeError: boom at beta=2.0" in error_file.read_text()
    assert sweep.best_row(rows)["beta"] == 3.0
    first = json.loads((tmp_path / "trials" / sweep.trial_id(trials[0]) / "trial.json").read_text())
    assert first["result"]["cwd"] == str(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["status"] == "failed"
    assert (tmp_path / "summary.png").is_file() and (tmp_path / "results.csv").is_file()

    rows = sweep.run_sweep(trials, tmp_path, progress=False, trial_function=fake_trial)
    assert [row["status"] for row in rows] == ["finished"] * 3
    assert calls(tmp_path, trials[0]) == calls(tmp_path, trials[2]) == ["resume=False"]
    assert calls(tmp_path, trials[1]) == ["resume=False", "resume=True"]
    assert not error_file.exists()


def test_interrupted_sweep_resumes_and_never_reruns_a_finished_trial(ray_session, tmp_path, capsys):
    trials = sweep.expand_grid({"beta": [1.0, 2.0, 3.0]})
    interrupting = functools.partial(fake_trial, interrupt_betas=(2.0,), driver_pid=os.getpid())
    # 2 CPUs per trial on a 2-CPU Ray: one trial at a time, in grid order
    rows = sweep.run_sweep(trials, tmp_path, trial_function=interrupting, cpus_per_trial=2)
    assert [row["status"] for row in rows] == ["finished", "unfinished", "unfinished"]
    assert calls(tmp_path, trials[1]) == ["resume=False"]
    assert not (tmp_path / "trials" / sweep.trial_id(trials[2]) / "calls.txt").exists()

    rows = sweep.run_sweep(trials, tmp_path, trial_function=interrupting, cpus_per_trial=2)
    assert [row["status"] for row in rows] == ["finished"] * 3
    assert [calls(tmp_path, options) for options in trials] == [
        ["resume=False"], ["resume=False", "resume=True"], ["resume=False"]]
    resumed = json.loads((tmp_path / "trials" / sweep.trial_id(trials[1])
                          / sweep.TRIAL_RESULT_FILE).read_text())
    assert resumed["resumed"] and resumed["result"]["summary"][0]["epochs_run"] == 1
    progress = capsys.readouterr().err
    assert "sweep: 3 trials, 1 finished earlier (skipped), 2 to run" in progress
    assert f"finished trial {sweep.trial_id(trials[2])} (beta=3.0)" in progress


def test_command_runs_real_transfers_and_skips_them_when_run_again(ray_session, tmp_path, capsys):
    output = tmp_path / "sweep"
    argv = ["--set", "epochs=1", "--set", "methods=scratch", "--set", "seeds=[0]",
            "--set", "source_model=resnet8", "--set", "target_model=resnet8",
            "--set", "image_size=8",
            "--set", "labels_per_class=1", "--set", "source_epochs=1",
            "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "device=cpu",
            "--output-dir", str(output), "--cpus-per-trial", "2"]
    assert sweep.main(parse_cli(argv)) == 0
    table = json.loads((output / "results.json").read_text())
    assert [(row["method"], row["status"]) for row in table["rows"]] == [("scratch", "finished")]
    assert 0 <= table["best"]["accuracy_mean"] <= 1
    trial_dir = output / "trials" / table["rows"][0]["trial_id"]
    assert (trial_dir / "results.json").is_file() and any((trial_dir / "checkpoints").iterdir())
    assert sweep.main(parse_cli(argv)) == 0
    assert "1 finished earlier (skipped), 0 to run" in capsys.readouterr().err


def test_command_rejects_bad_values_before_starting_anything(ray_session, tmp_path, capsys):
    code = sweep.main(parse_cli(["--set", "methods=fm,magic", "--output-dir", str(tmp_path)]))
    assert code == 2
    assert "magic" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())

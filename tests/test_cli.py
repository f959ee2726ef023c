"""The ``l2t-fast`` command line."""
import json
import subprocess
import sys

import pytest
import torch

from l2t_fast.cli import build_parser, main
from l2t_fast.jobs import options


pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_the_commands_and_every_transfer_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "transfer" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["transfer", "--help"])
    text = capsys.readouterr().out
    for key in list(options.table()) + ["output_dir", "checkpoint_dir", "resume", "quiet"]:
        assert "--" + key.replace("_", "-") in text


def test_no_arguments_means_the_default_config():
    args = build_parser().parse_args(["transfer"])
    assert options.from_arguments(args) == {}


def test_options_are_parsed_into_the_config():
    args = build_parser().parse_args(
        ["transfer", "--methods", "scratch", "l2t-ww", "--seeds", "4", "5", "--pairs", "0:1",
         "2:2", "--lr", "0.3", "--source-layers", "layer2", "layer3"])
    assert args.methods == ["scratch", "l2t-ww"] and args.seeds == [4, 5]
    assert args.pairs == [[0, 1], [2, 2]] and args.lr == 0.3
    assert args.source_layers == ["layer2", "layer3"]


@pytest.mark.parametrize("argv, message", [
    (["transfer", "--methods", "magic"], "unknown method 'magic'"),
    (["transfer", "--pairs", "0-1"], "SOURCE:TARGET"),
    (["transfer", "--epochs", "two"], "'two' is not an int"),
    (["transfer", "--epochs", "0"], "'0' is not an int >= 1"),
    (["transfer", "--lr", "inf"], "'inf' is not a finite number > 0"),
    (["transfer", "--beta", "inf"], "'inf' is not a finite number > 0"),
    (["transfer", "--weight-decay", "nan"], "'nan' is not a finite number >= 0"),
    (["transfer", "--momentum", "1"], "'1' is not a finite number >= 0 and < 1"),
    (["transfer", "--seeds", "0", "0"], "seeds must be one or more (no repeats)"),
    (["transfer", "--methods", "fm", "fm"], "lists 'fm' twice"),
    (["transfer", "--pairs", "all", "0:0"], "pairs must be 'all' or"),
    (["transfer", "--source-checkpoint", "/no/such/file.pt"], "is not a file"),
    (["transfer", "--resume", "/no/such/job"], "nothing to resume: '/no/such/job' does not "
                                               "exist"),
    (["transfer", "--backend", "cuda", "--methods", "fm"] if not torch.cuda.is_available()
     else ["transfer", "--backend", "magic"], "backend"),
    (["transfer", "--device", "cuda:7"] if not torch.cuda.is_available()
     else ["transfer", "--device", "nonsense"], "device"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_options_exit_with_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


TINY = ["transfer", "--image-size", "8", "--source-model", "resnet8", "--target-model",
        "resnet8", "--source-epochs", "1", "--epochs", "1", "--labels-per-class", "2",
        "--batch-size", "5", "--seeds", "0", "--backend", "reference", "--quiet"]


def test_each_run_gets_a_fresh_job_folder_and_resume_extends_the_latest(tmp_path, capsys):
    common = TINY + ["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    assert main(common + ["--methods", "scratch", "at"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "scratch" in out and "at " in out
    assert "vs scratch" in out
    first = (tmp_path / "out" / "latest").resolve()
    results = json.loads((first / "results.json").read_text())
    assert [row["method"] for row in results["summary"]] == ["scratch", "at"]
    assert (first / "results.png").stat().st_size > 0

    assert main(common + ["--methods", "scratch"]) == 0
    second = (tmp_path / "out" / "latest").resolve()
    assert second != first and json.loads((first / "results.json").read_text()) == results
    assert f"job folder: {second}" in capsys.readouterr().out

    assert main(common + ["--methods", "scratch", "--seeds", "0", "1", "--resume"]) == 0
    resumed = json.loads((second / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in resumed["runs"]] == [("scratch", 0), ("scratch", 1)]
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--methods", "scratch", "--lr", "0.5", "--resume", str(first)])
    assert exit_info.value.code == 2 and "keys ['lr'] differ" in capsys.readouterr().err


def test_diverged_runs_make_the_exit_status_say_so(tmp_path, capsys):
    status = main(TINY + ["--methods", "scratch", "fm", "--lr", "1000", "--epochs", "2",
                          "--cache-dir", str(tmp_path / "cache"),
                          "--output-dir", str(tmp_path / "out")])
    assert status == 1
    captured = capsys.readouterr()
    assert "diverged: fm seed 0 at epoch" in captured.err
    assert "(1 div.)" in captured.out


def test_python_dash_m_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "l2t_fast", "transfer", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--inner-steps" in done.stdout

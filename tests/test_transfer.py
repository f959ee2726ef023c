"""The transfer job: results, outputs, source caching, checkpoints and exact resumption."""
import json
import os

import pytest
import torch

import l2t_fast
from l2t_fast import checkpoint
from l2t_fast.jobs import options
from l2t_fast.jobs.transfer import resolve_config, run_transfer


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tmp_path, **changes):
    config = {"image_size": 8, "source_model": "resnet8", "target_model": "resnet8",
              "source_epochs": 1, "epochs": 2, "labels_per_class": 2, "batch_size": 5,
              "seeds": [0], "backend": "reference", "methods": ["scratch", "l2t-ww"],
              "cache_dir": str(tmp_path / "cache")}
    return {**config, **changes}


class Interrupted(Exception):
    pass


def test_results_json_png_and_source_cache(tmp_path):
    config = tiny_config(tmp_path, seeds=[0, 1])
    epochs_seen = []
    results = run_transfer(config, output_dir=tmp_path / "out", progress=False,
                           on_epoch=epochs_seen.append)
    assert [row["method"] for row in results["summary"]] == ["scratch", "l2t-ww"]
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [
        ("scratch", 0), ("scratch", 1), ("l2t-ww", 0), ("l2t-ww", 1)]
    for run in results["runs"]:
        assert 0 <= run["test_accuracy"] <= 1 and run["seconds"] > 0
    assert len(epochs_seen) == 8
    assert {"method", "seed", "epoch", "train_loss", "test_accuracy"} <= set(epochs_seen[0])
    where = results["method_outputs"]["l2t-ww"]["where_weights"]
    assert where["rows"] == where["columns"] == ["layer1", "layer2", "layer3"]
    assert all(value is not None for row in where["matrix"] for value in row)
    assert results["source"]["cached"] is False

    with open(tmp_path / "out" / "results.json") as file:
        assert json.load(file) == json.loads(json.dumps(results))
    with open(tmp_path / "out" / "results.png", "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"

    again = run_transfer({**config, "seeds": [0]}, output_dir=tmp_path / "again", progress=False)
    assert again["source"]["cached"] is True
    assert again["runs"][0] == results["runs"][0] | {"seconds": again["runs"][0]["seconds"]}


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    config = tiny_config(tmp_path, epochs=3, methods=["scratch", "fm", "l2t-ww"])
    straight = run_transfer(config, output_dir=tmp_path / "a", checkpoint_dir=tmp_path / "ca",
                            progress=False)

    def interrupt(metrics):
        if metrics["method"] == "fm" and metrics["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_transfer(config, output_dir=tmp_path / "b", checkpoint_dir=tmp_path / "cb",
                     progress=False, on_epoch=interrupt)
    assert checkpoint.load(tmp_path / "cb" / "fm-seed0.pt")["epoch"] == 2
    assert not os.path.exists(tmp_path / "cb" / "l2t-ww-seed0.pt")
    resumed_epochs = []
    resumed = run_transfer(config, output_dir=tmp_path / "b", checkpoint_dir=tmp_path / "cb",
                           resume=True, progress=False, on_epoch=resumed_epochs.append)
    assert [(m["method"], m["epoch"]) for m in resumed_epochs] == [
        ("fm", 3), ("l2t-ww", 1), ("l2t-ww", 2), ("l2t-ww", 3)]
    for a, b in zip(straight["runs"], resumed["runs"]):
        assert (a["method"], a["test_accuracy"], a["train_loss"]) == (
            b["method"], b["test_accuracy"], b["train_loss"])
    for name in ("scratch-seed0.pt", "fm-seed0.pt", "l2t-ww-seed0.pt"):
        state_a = torch.load(tmp_path / "ca" / name, weights_only=True)
        state_b = torch.load(tmp_path / "cb" / name, weights_only=True)
        assert state_a["finished"] and state_b["finished"]
        assert_same(state_a["method_state"], state_b["method_state"])


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_a_folder_holds_one_job(tmp_path):
    config = tiny_config(tmp_path, methods=["scratch"], epochs=1)
    run_transfer(config, output_dir=tmp_path / "a", checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"different config \(keys \['lr'\] differ"):
        run_transfer({**config, "lr": 0.01}, output_dir=tmp_path / "a",
                     checkpoint_dir=tmp_path / "c", resume=True, progress=False)
    with pytest.raises(ValueError, match="holds another job"):
        run_transfer(config, output_dir=tmp_path / "a", progress=False)
    # a checkpoint folder of another job is refused too, naming what differs
    with pytest.raises(ValueError, match="holds another job"):
        run_transfer(config, output_dir=tmp_path / "b", checkpoint_dir=tmp_path / "c",
                     progress=False)
    with pytest.raises(ValueError, match=r"keys \['lr'\] differ"):
        run_transfer({**config, "lr": 0.01}, output_dir=tmp_path / "b",
                     checkpoint_dir=tmp_path / "c", resume=True, progress=False)


def test_resume_extends_a_job_with_more_seeds_and_methods(tmp_path):
    config = tiny_config(tmp_path, methods=["scratch"], epochs=2)
    first = run_transfer(config, output_dir=tmp_path / "job", progress=False)
    epochs = []
    extended = run_transfer({**config, "seeds": [0, 1], "methods": ["scratch", "at"]},
                            output_dir=tmp_path / "job", resume=True, progress=False,
                            on_epoch=epochs.append)
    assert sorted({(m["method"], m["seed"]) for m in epochs}) == [
        ("at", 0), ("at", 1), ("scratch", 1)]  # scratch seed 0 was reused, not rerun
    assert extended["runs"][0] == first["runs"][0]
    assert [r["seed"] for r in extended["runs"]] == [0, 1, 0, 1]


def test_diverged_runs_are_marked_and_the_job_goes_on(tmp_path):
    # lr 1000: the BatchNorm-only scratch network survives it (finite, useless), feature
    # matching's regressors do not; L2T-ww's meta step is caught by the engine itself
    config = tiny_config(tmp_path, methods=["scratch", "fm", "l2t-ww"], seeds=[0, 1],
                         lr=1000.0, epochs=3)
    results = run_transfer(config, output_dir=tmp_path / "out", progress=False)
    assert [r["status"] for r in results["runs"]] == ["finished"] * 2 + ["diverged"] * 4
    for run in results["runs"][2:]:
        where = run["diverged"]
        assert where["epoch"] >= 1 and where["step"] >= 1 and "non-finite" in where["reason"]
        assert run["test_accuracy"] is None
    assert [(row["runs"], row["diverged"]) for row in results["summary"]] == [
        (2, 0), (0, 2), (0, 2)]
    assert results["summary"][1]["accuracy_mean"] is None
    text = (tmp_path / "out" / "results.json").read_text()
    json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in results.json"))
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    # a resumed job does not run the diverged runs again
    again = run_transfer(config, output_dir=tmp_path / "out", resume=True, progress=False,
                         on_epoch=lambda metrics: pytest.fail("a diverged run ran again"))
    assert again["runs"] == results["runs"]


def test_results_are_kept_after_every_finished_run(tmp_path):
    config = tiny_config(tmp_path, methods=["scratch", "at"], epochs=1)

    def fail_in_the_second_run(metrics):
        if metrics["method"] == "at":
            raise Interrupted

    with pytest.raises(Interrupted):
        run_transfer(config, output_dir=tmp_path / "out", progress=False,
                     on_epoch=fail_in_the_second_run)
    kept = json.loads((tmp_path / "out" / "results.json").read_text())
    assert kept["complete"] is False
    assert [(r["method"], r["status"]) for r in kept["runs"]] == [("scratch", "finished")]


def test_paired_difference_to_scratch(tmp_path):
    from l2t_fast.jobs.transfer import summarise

    runs = [{"method": m, "seed": s, "status": "finished", "test_accuracy": a, "seconds": 1.0}
            for m, s, a in [("scratch", 0, 0.5), ("scratch", 1, 0.6), ("scratch", 2, 0.7),
                            ("fm", 0, 0.6), ("fm", 1, 0.8), ("fm", 2, 0.7)]]
    paired = summarise(runs, ["scratch", "fm"])[1]["vs_scratch"]
    differences = [0.1, 0.2, 0.0]
    half = 4.302652729911275 * 0.1 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n), sd = 0.1
    assert paired["seeds"] == 3
    assert paired["mean"] == pytest.approx(sum(differences) / 3)
    assert paired["low"] == pytest.approx(0.1 - half) and paired["high"] == pytest.approx(0.1 + half)


def test_checkpoints_fall_back_to_the_previous_one_and_refuse_strangers(tmp_path):
    config = tiny_config(tmp_path, methods=["scratch", "at"], epochs=3)
    straight = run_transfer(config, output_dir=tmp_path / "a", progress=False)

    def stop(metrics):
        if metrics["method"] == "at" and metrics["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_transfer(config, output_dir=tmp_path / "b", progress=False, on_epoch=stop)
    latest = tmp_path / "b" / "checkpoints" / "at-seed0.pt"
    assert checkpoint.load(checkpoint.previous_path(latest))["epoch"] == 1
    latest.write_bytes(latest.read_bytes()[:100])  # cut short, as by a full disk
    with pytest.warns(UserWarning, match="previous checkpoint"):
        resumed = run_transfer(config, output_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed["runs"][1]["test_accuracy"] == straight["runs"][1]["test_accuracy"]

    scratch = tmp_path / "b" / "checkpoints" / "scratch-seed0.pt"
    latest.write_bytes(scratch.read_bytes())  # the wrong run's checkpoint
    with pytest.raises(checkpoint.CheckpointError, match="is of scratch seed 0, not at seed 0"):
        run_transfer(config, output_dir=tmp_path / "b", resume=True, progress=False)
    for path in (latest, checkpoint.previous_path(latest)):
        open(path, "wb").close()
    with pytest.raises(checkpoint.CheckpointError, match=r"at-seed0.pt' is empty.*delete it"):
        run_transfer(config, output_dir=tmp_path / "b", resume=True, progress=False)


def test_fails_before_the_first_run(tmp_path):
    config = tiny_config(tmp_path, methods=["fm"], backend="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' on cpu"):
            run_transfer(config, output_dir=tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot make the folder"):
        run_transfer(tiny_config(tmp_path), output_dir=tmp_path / "file" / "out",
                     progress=False)


def test_trained_networks_are_kept_for_analysis(tmp_path):
    from l2t_fast.jobs import runs

    config = tiny_config(tmp_path, methods=["scratch", "finetune"], epochs=1)
    results = run_transfer(config, output_dir=tmp_path / "out", progress=False)
    model = runs.load_model(tmp_path / "out", "finetune", 0)
    images = torch.randn(4, 3, 8, 8)
    assert model(images).shape == (4, 5)
    assert runs.load_results(tmp_path / "out")["runs"] == results["runs"]
    with pytest.raises(ValueError, match="no trained network of fm seed 0"):
        runs.load_model(tmp_path / "out", "fm", 0)


def test_source_cache_key_has_every_option_that_shapes_the_source(tmp_path):
    from l2t_fast.jobs.source import cache_path

    base = resolve_config(tiny_config(tmp_path))
    for key, value in [("augment_shift", 2), ("scenario", "domain"), ("source_epochs", 3),
                       ("image_size", 12), ("source_model", "resnet14")]:
        assert cache_path({**base, key: value}) != cache_path(base), key
    assert cache_path({**base, "lr": 0.5}) == cache_path(base)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    checkpoint.seed_everything(3)
    checkpoint.save_atomic({"rng": checkpoint.rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.seed_everything(99)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    assert os.listdir(tmp_path) == ["rng.pt"]  # no temporary file left behind


def test_source_checkpoint_file_is_used(tmp_path):
    from l2t_fast.models import build_model

    source = build_model("resnet8", 7)
    torch.save(source.state_dict(), tmp_path / "source.pt")
    results = run_transfer(tiny_config(tmp_path, methods=["finetune"], epochs=1,
                                       source_checkpoint=str(tmp_path / "source.pt")),
                           output_dir=tmp_path / "out", progress=False)
    assert results["source"]["path"] == str(tmp_path / "source.pt")
    with pytest.raises(ValueError, match="does not fit 'resnet14'"):
        run_transfer(tiny_config(tmp_path, source_model="resnet14",
                                 source_checkpoint=str(tmp_path / "source.pt")),
                     output_dir=tmp_path / "out2", progress=False)


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, r"unknown config keys \['colour'\]"),
    ({"methods": ["scratch", "magic"]}, "magic"),
    ({"seeds": []}, "seeds must be one or more"),
    ({"epochs": 0}, "epochs must be an int >= 1"),
    ({"lr": -1}, "lr must be a finite number > 0"),
    ({"pairs": "diagonal"}, "pairs must be 'all' or"),
    ({"source_layers": []}, "source_layers must be one or more"),
])
def test_bad_config_is_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(change)


def test_default_config_is_complete_and_json():
    config = resolve_config({})
    assert set(config) == set(options.table())
    assert json.loads(json.dumps(config)) == config
    assert resolve_config(config) == config


def test_pretrained_source_does_not_depend_on_the_global_rng(tmp_path):
    """Two first runs in different RNG states (torch seeds every process at random) cache
    the same source network."""
    from l2t_fast.data import load_data
    from l2t_fast.jobs.source import source_model

    weights = []
    for state in (1, 2):
        config = resolve_config(tiny_config(tmp_path, cache_dir=str(tmp_path / f"cache{state}")))
        data = load_data(config["data"], config["data_root"], config["image_size"])
        torch.manual_seed(state)
        model, info = source_model(config, data, torch.device("cpu"), show=False)
        assert not info["cached"]
        weights.append(model.state_dict())
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_resume_is_exact_at_any_thread_count(tmp_path, threads):
    """The compiled backend's reductions have a fixed order, so that an interrupted and
    resumed run ends bit for bit as an uninterrupted one, whatever the thread count."""
    if "cpu" not in l2t_fast.available_backends():
        pytest.skip("needs the compiled extension")
    config = tiny_config(tmp_path, methods=["fm"], epochs=3, backend="cpu", batch_size=10,
                         labels_per_class=4)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        straight = run_transfer(config, output_dir=tmp_path / "a", progress=False)

        def stop(metrics):
            if metrics["epoch"] == 2:
                raise Interrupted

        with pytest.raises(Interrupted):
            run_transfer(config, output_dir=tmp_path / "b", progress=False, on_epoch=stop)
        resumed = run_transfer(config, output_dir=tmp_path / "b", resume=True, progress=False)
    finally:
        torch.set_num_threads(previous)
    assert resumed["runs"][0]["train_loss"] == straight["runs"][0]["train_loss"]
    a = torch.load(tmp_path / "a" / "checkpoints" / "fm-seed0.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "fm-seed0.pt", weights_only=True)
    assert_same(a["method_state"], b["method_state"])

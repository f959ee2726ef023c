"""The transfer job: results, outputs, source caching, checkpoints and exact resumption."""
import json
import os

import pytest
import torch

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


def test_resume_with_another_config_is_refused(tmp_path):
    config = tiny_config(tmp_path, methods=["scratch"], epochs=1)
    run_transfer(config, output_dir=tmp_path / "a", checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"different config \(keys \['lr'\]"):
        run_transfer({**config, "lr": 0.01}, output_dir=tmp_path / "a",
                     checkpoint_dir=tmp_path / "c", resume=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        run_transfer(config, output_dir=tmp_path / "a", resume=True)


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
                     output_dir=tmp_path / "out", progress=False)


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

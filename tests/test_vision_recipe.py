"""The paper's recipe (docs/paper_recipe.md) runs as written, end to end, on a tiny generated
image folder: the documented command with only the data, the size, the epochs, the seeds,
the device and the output folder swapped for CI's (3 classes, 64 px, 1 epoch, CPU); its
ImageNet weights come from torchvision's own cache, filled here with random weights, so
that nothing is downloaded. The sweep grid of the recipe expands to its six trials."""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from test_vision_pretrain import make_image_folder

pytestmark = pytest.mark.vision

RECIPE = Path(__file__).resolve().parents[1] / "docs" / "paper_recipe.md"
CI_VALUES = {"--image-size": "64", "--epochs": "1", "--seeds": "0", "--device": "cpu"}


def recipe_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", RECIPE.read_text(), flags=re.S)


def recipe_command():
    text = RECIPE.read_text()
    block = text[text.index("<!-- recipe:begin"):text.index("<!-- recipe:end")]
    command = re.search(r"```bash\n(.*?)```", block, flags=re.S).group(1)
    return shlex.split(command.replace("\\\n", " "))


def substituted(argv, values):
    """``argv`` with the words after each flag in ``values`` replaced by its value."""
    out, skipping = [], False
    for word in argv:
        if word.startswith("--"):
            skipping = word in values
            out.append(word)
            if skipping:
                out.append(values[word])
        elif not skipping:
            out.append(word)
    return out


def test_the_recipe_command_runs_on_a_tiny_image_folder(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    argv = recipe_command()
    assert argv[:2] == ["l2t-fast", "transfer"]
    flags = set(word for word in argv if word.startswith("--"))
    assert {"--source-weights", "--pairs", "--inner-steps", "--data"} <= flags
    # torchvision's cache holds the source weights the recipe names, so nothing downloads
    weights = torchvision.models.ResNet34_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34().state_dict(), cache / weights.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = make_image_folder(tmp_path / "cub", classes=3, per_class=4, size=64)
    values = {**CI_VALUES, "--data": str(folder), "--output-dir": str(tmp_path / "runs")}

    from l2t_fast import cli

    status = cli.main(substituted(argv, values)[1:] + ["--quiet"])
    assert status == 0
    results = json.loads((tmp_path / "runs" / "latest" / "results.json").read_text())
    assert [(r["method"], r["status"]) for r in results["runs"]] == [
        ("scratch", "finished"), ("l2t-ww", "finished")]
    config = results["config"]
    assert config["source_weights"] == "IMAGENET1K_V1" and config["inner_steps"] == 2
    assert config["source_layers"] == ["layer1", "layer2", "layer3", "layer4"]
    matrix = results["method_outputs"]["l2t-ww"]["where_weights"]["matrix"]
    assert len(matrix) == 4 and all(len(row) == 4 and None not in row for row in matrix)


def test_the_recipe_sweep_grid_expands_to_six_valid_trials(tmp_path):
    from l2t_fast.jobs.sweep import build_grid, expand_grid
    from l2t_fast.jobs.transfer import resolve_config

    (grid,) = [block for block in recipe_blocks("yaml") if "cub200.yaml" in block]
    path = tmp_path / "cub200.yaml"
    path.write_text(grid)
    trials = expand_grid(build_grid(str(path)))
    assert len(trials) == 6
    for trial in trials:
        config = resolve_config(trial)
        assert config["methods"] == ["scratch", "l2t-ww"] and config["seeds"] == [0, 1, 2]
        assert config["source_layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert sorted({(t["beta"], t["meta_lr"]) for t in trials}) == [
        (0.1, 1e-4), (0.1, 1e-3), (0.5, 1e-4), (0.5, 1e-3), (1.0, 1e-4), (1.0, 1e-3)]

"""``l2t-fast pretrain`` and the source checkpoints ``--source-checkpoint`` reads (state
dicts and full training checkpoints); built-in models only, so no torchvision needed."""
import numpy as np
import pytest
import torch

from l2t_fast import cli
from l2t_fast.jobs.source import load_source
from l2t_fast.models import build_model


def make_image_folder(root, classes=2, per_class=4, size=16, split=True):
    """A tiny image folder of coloured noise, one hue per class (so it can be learned)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, count in ((("train", per_class), ("test", per_class // 2)) if split
                        else (("", per_class),)):
        for label in range(classes):
            folder = root / part / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (size, size, 3))
                pixels[..., label % 3] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


def source_config(path, model="resnet8", image_size=16):
    return {"source_checkpoint": str(path), "source_model": model, "image_size": image_size}


def test_pretrain_saves_what_source_checkpoint_reads(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images")
    output = tmp_path / "source.pt"
    status = cli.main(["pretrain", "--data", str(folder), "--model", "resnet8",
                       "--image-size", "16", "--epochs", "2", "--batch-size", "4",
                       "--output", str(output), "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "saved to" in printed and "--source-checkpoint" in printed
    saved = torch.load(output, weights_only=True)
    assert saved["info"]["num_classes"] == 2 and 0 <= saved["info"]["test_accuracy"] <= 1
    model, info = load_source(source_config(output), "cpu")
    assert model.fc.out_features == 2 and info["path"] == str(output)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved["model"][name])


def test_full_checkpoints_and_data_parallel_prefixes_load(tmp_path):
    trained = build_model("resnet8", 3)
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet8", "state_dict": state, "best_acc1": 0.5}, path)
    model, _ = load_source(source_config(path), "cpu")
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "holds a list, not a state_dict"),
    ({"epoch": 3, "optimizer": {"lr": 0.1}}, "neither a state_dict nor a checkpoint"),
])
def test_files_that_hold_no_state_dict_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        load_source(source_config(path), "cpu")


def test_pretrain_refuses_bad_arguments_before_training(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    with pytest.raises(SystemExit):  # argparse exits 2 on a bad device, naming it
        cli.main(["pretrain", "--data", str(folder), "--model", "resnet8", "--epochs", "1",
                  "--output", str(tmp_path / "out.pt"), "--device", "cuda:7"])
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--data", str(folder), "--model", "resnet8", "--epochs", "0",
                  "--output", str(tmp_path / "out.pt")])

"""The streaming data pipeline: image folders and torchvision data sets read batch by batch
through DataLoader workers, their transforms, their determinism (a function of the
generator alone, whatever the worker count, so that resumed jobs are exact), the source's
normalisation statistics, and the job's --workers, --amp, --channels-last options."""
import json
import sys
import types

import numpy as np
import pytest
import torch

from l2t_fast.data import load_data
from l2t_fast.data.streaming import StreamingData
from l2t_fast.data.transforms import ImageTransform, center_crop_box, random_crop_box
from l2t_fast.jobs.transfer import prepare, resolve_config, run_transfer

pytestmark = pytest.mark.usefixtures("one_thread")


def make_folder(root, classes=3, per_class=4, split=False):
    """Coloured noise, one hue per class, of varied (non-square) sizes up to 32 px."""
    from PIL import Image

    rng = np.random.default_rng(0)
    parts = (("train", per_class), ("test", per_class // 2)) if split else (("", per_class),)
    for part, count in parts:
        for label in range(classes):
            folder = root / part / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (int(rng.integers(16, 33)), 24, 3))
                pixels[..., label % 3] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_a_folder_streams_from_its_file_list(tmp_path):
    make_folder(tmp_path, classes=3, per_class=4)
    data = load_data(str(tmp_path), image_size=16)
    assert isinstance(data, StreamingData) and not data.has_source_task
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vars(data).values())
    assert torch.bincount(data.pool_labels).tolist() == [2, 2, 2]
    assert torch.bincount(data.test_labels).tolist() == [2, 2, 2]
    assert data.example_input().shape == (2, 3, 16, 16)
    pool = torch.cat([x for x, _ in data.pool_batches(torch.arange(6), batch_size=4)])
    # normalised with the pool's own statistics (evaluation transform)
    assert pool.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(pool.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    test = list(data.test_batches(batch_size=4))
    assert [len(y) for _, y in test] == [4, 2]
    assert torch.equal(data.probe_images(3), test[0][0][:3])


def test_in_memory_holds_the_evaluation_images_for_analyze(tmp_path):
    make_folder(tmp_path, classes=2, per_class=4)
    data = load_data(str(tmp_path), image_size=8)
    tensors = data.in_memory()
    (test, labels), = data.test_batches()
    assert torch.equal(tensors.test_images, test) and torch.equal(tensors.test_labels, labels)
    assert tensors.pool_images.shape == (4, 3, 8, 8) and tensors.num_classes == 2


def test_train_and_val_subfolders(tmp_path):
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / "val", per_class=2)
    data = load_data(str(tmp_path), image_size=8)
    assert len(data.pool_labels) == 9 and len(data.test_labels) == 6


def test_random_resized_crops_fit_and_follow_the_seed():
    for seed in range(200):
        rng = np.random.default_rng([seed, 1])
        left, top, right, bottom = random_crop_box(40, 30, rng)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        area = (right - left) * (bottom - top)
        if area < 40 * 30:  # a drawn crop, not the fallback: the scale and ratio ranges
            assert area >= 0.08 * 1200 * 0.9
            assert 3 / 4 * 0.8 <= (right - left) / (bottom - top) <= 4 / 3 * 1.25
    # a very wide image falls back to a central crop of the widest allowed ratio
    assert random_crop_box(400, 10, np.random.default_rng(0), scale=(1.0, 1.0)) == (
        193, 0, 206, 10)
    assert center_crop_box(40, 20) == pytest.approx((11.25, 1.25, 28.75, 18.75))


def test_image_transform_is_seeded_and_flips_half_the_time():
    from PIL import Image

    pixels = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    image = Image.fromarray(pixels)
    train = ImageTransform(12, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=True)
    assert torch.equal(train(image, (7, 3)), train(image, (7, 3)))
    assert not torch.equal(train(image, (7, 3)), train(image, (7, 4)))
    evaluation = ImageTransform(12, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=False)
    x = evaluation(image)
    assert x.shape == (3, 12, 12) and x.is_contiguous()
    expected = torch.from_numpy(np.array(image.resize((12, 12), Image.BILINEAR,
                                                      box=center_crop_box(30, 20))))
    assert torch.allclose(x, (expected.permute(2, 0, 1).float() / 255 - 0.5) / 0.25)
    # left-right increasing pixels: a flipped crop decreases along the width
    crops = [train(image, (0, k))[0] for k in range(40)]
    slopes = [float(torch.sign((crop[:, -1] - crop[:, 0]).mean())) for crop in crops]
    assert 10 <= slopes.count(-1.0) <= 30 and slopes.count(-1.0) + slopes.count(1.0) == 40
    with pytest.raises(ValueError, match="mean and std"):
        ImageTransform(12, (0.5, 0.5), (1, 1, 1), train=True)


def test_batches_are_a_function_of_the_generator_whatever_the_worker_count(tmp_path):
    make_folder(tmp_path, classes=2, per_class=8)
    epochs = {}
    for workers in (0, 2):
        data = load_data(str(tmp_path), image_size=16, workers=workers)
        assert data.workers == workers
        generator = torch.Generator().manual_seed(5)
        indices = torch.arange(8)
        epochs[workers] = [list(data.labelled_batches(indices, 3, generator, shift=4))
                           for _ in range(2)]
        epochs[workers].append(list(data.unlabelled_batches([4, 3], generator, shift=4)))
        epochs[workers].append(generator.get_state())
    *labelled, unlabelled, state = epochs[0]
    assert torch.equal(state, epochs[2][-1])  # the same draws, whatever the workers
    for a, b in zip(labelled + [unlabelled], epochs[2][:-1]):
        for xa, xb in zip(a, b):
            if isinstance(xa, torch.Tensor):  # an unlabelled batch
                assert torch.equal(xa, xb)
            else:
                assert torch.equal(xa[0], xb[0]) and torch.equal(xa[1], xb[1])
    assert [[len(y) for _, y in epoch] for epoch in labelled] == [[3, 3, 2]] * 2
    first, second = labelled
    assert [x.shape for x in unlabelled] == [(4, 3, 16, 16), (3, 3, 16, 16)]
    assert not torch.equal(unlabelled[0][:3], unlabelled[1])
    # a new epoch draws a new order and new crops
    assert not torch.equal(first[0][0], second[0][0])


def test_statistics_of_the_source_weights_normalise_a_folder(tmp_path, monkeypatch):
    import l2t_fast.jobs.transfer as transfer

    make_folder(tmp_path / "images", classes=2, per_class=4)
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    asked = []
    monkeypatch.setattr(transfer, "pretrained_statistics",
                        lambda *args: asked.append(args) or imagenet)
    config = resolve_config({"data": str(tmp_path / "images"),
                             "source_model": "torchvision:resnet18",
                             "source_weights": "IMAGENET1K_V1", "workers": 0})
    data = transfer.load_job_data(config)
    assert asked == [("torchvision:resnet18", "IMAGENET1K_V1")]
    assert (data.mean, data.std) == imagenet


def test_pretrained_statistics_come_from_the_libraries_records(monkeypatch):
    from l2t_fast.models import pretrained_statistics

    class Preset:
        mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)

    class Weights:
        def transforms(self):
            return Preset()

    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.SimpleNamespace(
        get_model_weights=lambda name: {"DEFAULT": Weights(), "IMAGENET1K_V1": Weights()})
    timm = types.ModuleType("timm")
    timm.models = types.SimpleNamespace(get_pretrained_cfg=lambda name: types.SimpleNamespace(
        mean=(0.5,) * 3, std=(0.25,) * 3, name=name))
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "timm", timm)
    assert pretrained_statistics("torchvision:resnet34", "IMAGENET1K_V1") == (
        [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert pretrained_statistics("torchvision:resnet34", "NO_SUCH") is None
    assert pretrained_statistics("timm:vit_tiny_patch16_224", "DEFAULT") == (
        [0.5] * 3, [0.25] * 3)
    assert pretrained_statistics("torchvision:resnet34", None) is None
    assert pretrained_statistics("resnet8", "DEFAULT") is None


def test_a_torchvision_data_set_streams_through_its_items(tmp_path, monkeypatch):
    from PIL import Image

    class FakeSet:
        """Like CIFAR10: PIL images by index, labels in ``targets``."""

        def __init__(self, root, train, download):
            count = 6 if train else 4
            self.targets = [i % 2 for i in range(count)]
            self.images = [Image.fromarray(np.full((12, 12, 3), 60 + 100 * (i % 2), np.uint8))
                           for i in range(count)]

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return self.images[index], self.targets[index]

    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = types.SimpleNamespace(FakeSet=FakeSet)
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    data = load_data("FakeSet", str(tmp_path), image_size=8, workers=0)
    assert data.num_classes == 2 and data.pool_labels.tolist() == [0, 1, 0, 1, 0, 1]
    (x, y), = data.test_batches()
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 1, 0, 1]
    assert torch.equal(x[0], x[2]) and not torch.equal(x[0], x[1])


def folder_job(tmp_path, **changes):
    """A tiny transfer job on a generated image folder, with a random resnet8 source."""
    from l2t_fast.models import build_model

    folder = tmp_path / "images"
    if not folder.exists():
        make_folder(folder, classes=2, per_class=8, split=True)
        torch.manual_seed(0)
        torch.save(build_model("resnet8", 3).state_dict(), tmp_path / "source.pt")
    config = {"data": str(folder), "source_checkpoint": str(tmp_path / "source.pt"),
              "image_size": 16, "source_model": "resnet8", "target_model": "resnet8",
              "epochs": 3, "labels_per_class": 0, "batch_size": 5, "seeds": [0],
              "backend": "reference", "methods": ["scratch", "fm"], "workers": 0}
    return {**config, **changes}


class Interrupted(Exception):
    pass


def test_a_resumed_folder_job_ends_as_an_uninterrupted_one(tmp_path):
    """Interrupted with 2 workers, resumed with none: the same losses, accuracies and
    weights, bit for bit, as a run without interruption."""
    straight = run_transfer(folder_job(tmp_path), output_dir=tmp_path / "a", progress=False)

    def stop(metrics):
        if metrics["method"] == "fm" and metrics["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_transfer(folder_job(tmp_path, workers=2), output_dir=tmp_path / "b",
                     progress=False, on_epoch=stop)
    resumed = run_transfer(folder_job(tmp_path), output_dir=tmp_path / "b", resume=True,
                           progress=False)
    for a, b in zip(straight["runs"], resumed["runs"]):
        assert (a["method"], a["test_accuracy"], a["train_loss"]) == (
            b["method"], b["test_accuracy"], b["train_loss"])
    for name in ("scratch-seed0.pt", "fm-seed0.pt"):
        a = torch.load(tmp_path / "a" / "checkpoints" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / "checkpoints" / name, weights_only=True)
        for key, tensor in a["method_state"]["model"].items():
            assert torch.equal(tensor, b["method_state"]["model"][key]), key


def test_workers_amp_and_channels_last_options():
    config = resolve_config({"workers": "3", "channels_last": "yes"})
    assert config["workers"] == 3 and config["channels_last"] is True
    assert resolve_config({})["workers"] == "auto" and resolve_config({})["amp"] == "off"
    with pytest.raises(ValueError, match="workers must be auto or an int >= 0"):
        resolve_config({"workers": -1})
    with pytest.raises(ValueError, match="amp must be one of off, bf16"):
        resolve_config({"amp": "fp16"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--amp bf16 needs a CUDA device"):
            prepare({"amp": "bf16", "device": "cpu"})


def test_the_command_line_takes_the_new_options(tmp_path):
    import argparse

    from l2t_fast.jobs import options
    from l2t_fast.jobs.transfer import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--workers", "0", "--amp", "bf16", "--channels-last"])
    assert options.from_arguments(args) == {"workers": 0, "amp": "bf16",
                                            "channels_last": True}
    assert options.from_arguments(parser.parse_args(["--workers", "auto"])) == {
        "workers": "auto"}


def test_a_channels_last_job_runs_on_the_cpu(tmp_path):
    config = folder_job(tmp_path, methods=["scratch", "fm"], epochs=1, channels_last=True)
    plain = run_transfer({**config, "channels_last": False}, output_dir=tmp_path / "plain",
                         progress=False)
    results = run_transfer(config, output_dir=tmp_path / "cl", progress=False)
    assert [r["status"] for r in results["runs"]] == ["finished", "finished"]
    for a, b in zip(plain["runs"], results["runs"]):  # the same numbers up to rounding
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def test_a_job_with_source_weights_can_rebuild_its_source(tmp_path, monkeypatch):
    """runs.load_source of a --source-weights job asks the library for the same weights
    (here a stand-in for torchvision's loader: nothing downloads)."""
    import l2t_fast.models as models
    from l2t_fast.jobs import runs

    calls = []

    def fake_torchvision(name, num_classes, weights):
        calls.append((name, num_classes, weights))
        torch.manual_seed(42)  # "the pretrained weights": the same on every call
        return models.build_model("resnet8", 7)

    monkeypatch.setattr(models, "_build_torchvision", fake_torchvision)
    config = {"image_size": 8, "source_model": "torchvision:resnet18",
              "source_weights": "IMAGENET1K_V1", "target_model": "resnet8", "epochs": 1,
              "labels_per_class": 2, "batch_size": 5, "seeds": [0], "methods": ["scratch"],
              "cache_dir": str(tmp_path / "cache")}
    results = run_transfer(config, output_dir=tmp_path / "job", progress=False)
    assert results["source"] == {"model": "torchvision:resnet18", "weights": "IMAGENET1K_V1",
                                 "cached": False}
    source = runs.load_source(tmp_path / "job")
    assert calls == [("resnet18", None, "IMAGENET1K_V1")] * 2
    torch.manual_seed(42)
    expected = models.build_model("resnet8", 7).state_dict()
    assert not source.training
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_the_target_model_is_built_for_the_image_size(tmp_path, monkeypatch):
    import l2t_fast.jobs.transfer as transfer

    sizes = []
    real = transfer.build_model

    def recording(name, num_classes, **kwargs):
        sizes.append((name, kwargs.get("image_size")))
        return real(name, num_classes, **kwargs)

    monkeypatch.setattr(transfer, "build_model", recording)
    run_transfer(folder_job(tmp_path, methods=["scratch"], epochs=1, image_size=12),
                 output_dir=tmp_path / "out", progress=False)
    assert sizes and all(size == ("resnet8", 12) for size in sizes)


@pytest.mark.vision
def test_a_timm_vit_target_trains_at_a_small_image_size(tmp_path):
    pytest.importorskip("timm")
    from l2t_fast.jobs import runs

    config = folder_job(tmp_path, target_model="timm:vit_tiny_patch16_224", image_size=32,
                        methods=["scratch", "fm"], epochs=1, batch_size=4)
    results = run_transfer(config, output_dir=tmp_path / "out", progress=False)
    assert [r["status"] for r in results["runs"]] == ["finished", "finished"]
    model = runs.load_model(tmp_path / "out", "scratch", 0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    json.dumps(results)

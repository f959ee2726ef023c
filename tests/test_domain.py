"""The domain scenario's data (digits over photographs) and which methods run where."""
import math

import pytest
import torch

from l2t_fast.data import load_data
from l2t_fast.data.domain import blend, load_domain, photographs, random_crops
from l2t_fast.jobs.transfer import resolve_config, run_transfer
from l2t_fast.methods import registry

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def domain():
    return load_domain(image_size=8)


def test_shapes_splits_and_channels(domain):
    assert domain.num_classes == domain.num_source_classes == 10
    for images, labels in ((domain.pool_images, domain.pool_labels),
                           (domain.test_images, domain.test_labels),
                           (domain.source_images, domain.source_labels)):
        assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (len(images),) and labels.dtype == torch.int64
        assert torch.equal(labels.unique(), torch.arange(10))
    # every sklearn digit once: half the source, the other half the target's pool and test
    assert len(domain.pool_images) + len(domain.test_images) + len(domain.source_images) == 1797
    assert abs(len(domain.source_images) - 1797 / 2) <= 10
    assert abs(len(domain.pool_images) - len(domain.test_images)) <= 10
    # the source is grey, the target in colour; both standardised
    assert torch.equal(domain.source_images[:, 0], domain.source_images[:, 2])
    target = torch.cat([domain.pool_images, domain.test_images])
    assert (target[:, 0] - target[:, 2]).abs().mean() > 0.1
    torch.testing.assert_close(target.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(target.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)


def test_the_seed_fixes_the_split_and_the_crops(domain):
    again = load_domain(image_size=8)
    assert torch.equal(again.pool_images, domain.pool_images)
    assert torch.equal(again.test_labels, domain.test_labels)
    other = load_domain(image_size=8, seed=1)
    assert not torch.equal(other.source_labels, domain.source_labels)  # another split
    assert not torch.equal(other.pool_images[:5], domain.pool_images[:5])


def edge_maps(images):
    """Gradient magnitude, averaged over channels: strokes show through any background."""
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return (dx[..., :-1, :].pow(2) + dy[..., :, :-1].pow(2)).sqrt().mean(dim=1)


def class_means(images, labels):
    means = torch.stack([images[labels == c].mean(0).flatten() for c in range(10)])
    means = means - means.mean(dim=1, keepdim=True)
    return means / means.norm(dim=1, keepdim=True)


def test_target_labels_are_the_digits_drawn(domain):
    """Each target class's mean edge map is most like the same source digit's: shuffled or
    shifted labels would fail this."""
    source = class_means(edge_maps(domain.source_images), domain.source_labels)
    for images, labels in ((domain.pool_images, domain.pool_labels),
                           (domain.test_images, domain.test_labels)):
        similarity = class_means(edge_maps(images), labels) @ source.T
        assert torch.equal(similarity.argmax(dim=1), torch.arange(10))


def test_blend_is_mnist_m_absolute_difference():
    backgrounds = torch.rand(2, 3, 4, 4)
    digits = torch.zeros(2, 1, 4, 4)
    digits[:, :, 1:3, 1:3] = 1.0
    blended = blend(digits, backgrounds)
    assert torch.equal(blended[:, :, 0, 0], backgrounds[:, :, 0, 0])
    torch.testing.assert_close(blended[:, :, 1, 1], 1 - backgrounds[:, :, 1, 1])
    with pytest.raises(ValueError, match="same count and size"):
        blend(digits[:1], backgrounds)


def test_random_crops_are_photograph_patches_fixed_by_the_generator():
    photos = photographs()
    assert len(photos) == 2 and all(p.shape[0] == 3 for p in photos)
    first = random_crops(photos, 6, 8, torch.Generator().manual_seed(3))
    again = random_crops(photos, 6, 8, torch.Generator().manual_seed(3))
    assert first.shape == (6, 3, 8, 8) and torch.equal(first, again)
    assert 0 <= first.min() and first.max() <= 1 and first.std() > 0.01


def test_the_scenario_option_loads_it_and_sets_a_handful_of_labels():
    data = load_data("digits", image_size=8, scenario="domain")
    assert data.name == "digits-domain" and data.num_source_classes == 10
    config = resolve_config({"scenario": "domain"})
    assert config["labels_per_class"] == 5
    assert resolve_config({"scenario": "domain", "labels_per_class": 3})["labels_per_class"] == 3
    assert resolve_config({})["labels_per_class"] == 10  # the task scenario is unchanged


def test_methods_that_cannot_run_are_refused_with_the_reason():
    every = list(registry())
    assert resolve_config({"scenario": "domain"})["methods"] == every
    task = resolve_config({"scenario": "task"})["methods"]
    assert task == [name for name in every if name != "dann"]
    with pytest.raises(ValueError, match="dann needs a source task with the target's classes"):
        resolve_config({"scenario": "task", "methods": ["dann"]})
    with pytest.raises(ValueError, match="multitask needs labelled images of the source task"):
        resolve_config({"data": "some/folder", "methods": ["multitask"]})


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_every_method_trains_in_each_scenario_it_supports(scenario, tmp_path):
    config = {"scenario": scenario, "image_size": 8, "source_model": "resnet8",
              "target_model": "resnet8", "source_epochs": 1, "epochs": 1,
              "labels_per_class": 1, "batch_size": 5, "seeds": [0], "backend": "reference",
              "cache_dir": str(tmp_path / "cache")}
    results = run_transfer(config, output_dir=tmp_path / "out", progress=False)
    expected = [name for name in registry() if scenario == "domain" or name != "dann"]
    assert [run["method"] for run in results["runs"]] == expected
    for run in results["runs"]:
        assert run["status"] == "finished", run
        assert 0 <= run["test_accuracy"] <= 1
        assert all(math.isfinite(loss) for loss in run["train_loss"])

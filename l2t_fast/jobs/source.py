"""The source network of a job: loaded from the user's checkpoint, or pretrained on the
data's source task and cached, keyed by everything that shaped it."""
import hashlib
import json
import os
import time

import torch

from l2t_fast import checkpoint
from l2t_fast.data import batches, stratified_mask
from l2t_fast.methods.base import evaluate
from l2t_fast.models import build_model, head_name, replace_head

# Every option that shapes a pretrained source: its cache key.
SOURCE_KEY_OPTIONS = ("data", "scenario", "image_size", "source_model", "source_epochs",
                      "augment_shift")


def source_model(config, data, device, show):
    """The frozen source network and a dict about it: from ``source_checkpoint``, from
    ``source_weights`` (the library's pretrained weights), from the cache, or pretrained now
    on the data's source task (and then cached)."""
    if config["source_checkpoint"] is not None and config["source_weights"] is not None:
        raise ValueError("give source_checkpoint (--source-checkpoint) or source_weights "
                         "(--source-weights), not both")
    if config["source_checkpoint"] is not None:
        return load_source(config, device)
    if config["source_weights"] is not None:
        model = build_model(config["source_model"], None, weights=config["source_weights"],
                            image_size=config["image_size"])
        info = {"model": config["source_model"], "weights": config["source_weights"],
                "cached": False}
        return model.to(device).eval().requires_grad_(False), info
    if not data.has_source_task:
        raise ValueError(f"data {config['data']!r} has no source task to pretrain on: give "
                         f"source_checkpoint (--source-checkpoint), a state_dict file of "
                         f"{config['source_model']!r} (l2t-fast pretrain makes one), or "
                         f"source_weights (--source-weights) of a torchvision or timm model")
    path = cache_path(config)
    if os.path.exists(path):
        model = build_model(config["source_model"], data.num_source_classes)
        cached = checkpoint.load(path)
        model.load_state_dict(cached["model"])
        info = {**cached["info"], "cached": True}
    else:
        # torch seeds itself at random in every process: without this, the source's initial
        # weights, and so the cached network, would differ from one first run to the next
        checkpoint.seed_everything(0)
        model = build_model(config["source_model"], data.num_source_classes)
        info = pretrain(model, config, data, show)
        checkpoint.save_atomic({"model": model.state_dict(), "info": info}, path)
        info = {**info, "cached": False}
    return model.to(device).eval().requires_grad_(False), {**info, "path": path}


def cache_path(config):
    key_fields = {k: config[k] for k in SOURCE_KEY_OPTIONS}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = config["cache_dir"] or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "l2t_fast")
    return os.path.join(cache_dir, f"source-{config['source_model'].replace(':', '-')}-{key}.pt")


# where full training checkpoints keep the model's weights, in the order they are looked for
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")


def load_source(config, device):
    """The user's ``source_checkpoint``: a state_dict, or a full checkpoint (a dict with the
    state_dict under "model", "state_dict" or "model_state_dict", as ``l2t-fast pretrain``,
    the common training scripts and Lightning-style code save it; a "module." prefix of
    DataParallel is dropped)."""
    path = config["source_checkpoint"]
    if not os.path.isfile(path):
        raise ValueError(f"source_checkpoint {path!r} is not a file")
    state = state_dict_of(checkpoint.load(path, "source_checkpoint",
                                          "give a state_dict saved with torch.save"), path)
    model = build_model(config["source_model"], 1, image_size=config.get("image_size"))
    head_weight = state.get(head_name(model) + ".weight")
    if head_weight is None:
        raise ValueError(f"source_checkpoint {path!r} has no {head_name(model)}.weight: is it "
                         f"a state_dict of {config['source_model']!r}?")
    replace_head(model, head_weight.shape[0])
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"source_checkpoint {path!r} does not fit {config['source_model']!r}: "
                         f"{error}") from error
    info = {"model": config["source_model"], "path": path, "cached": False}
    return model.to(device).eval().requires_grad_(False), info


def state_dict_of(loaded, path):
    """The model's state_dict inside what ``torch.load`` read from ``path``."""
    if not isinstance(loaded, dict):
        raise ValueError(f"source_checkpoint {path!r} holds a {type(loaded).__name__}, not a "
                         f"state_dict: save model.state_dict()")
    for key in STATE_DICT_KEYS:
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ValueError(f"source_checkpoint {path!r} is neither a state_dict nor a checkpoint "
                         f"with one under {', '.join(STATE_DICT_KEYS)}; its keys: "
                         f"{sorted(loaded)[:8]}")
    if loaded and all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}
    return loaded


def pretrain(model, config, data, show):
    """Plain supervised training on the source task (80%; the other 20% measure it), on the
    CPU; with the seeding in ``source_model``, the cached network does not depend on where
    or after what it was made."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(0)
    held_out = stratified_mask(data.source_labels, 0.2, seed=0)
    images, labels = data.source_images[~held_out], data.source_labels[~held_out]
    epochs = config["source_epochs"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    started = time.perf_counter()
    for _ in tqdm(range(epochs), desc="pretraining source", unit="epoch", disable=not show):
        model.train()
        for x, y in batches(images, labels, 64, generator, config["augment_shift"]):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        scheduler.step()
    accuracy = evaluate(model, data.source_images[held_out], data.source_labels[held_out])
    return {"model": config["source_model"], "epochs": epochs, "test_accuracy": accuracy,
            "seconds": time.perf_counter() - started}

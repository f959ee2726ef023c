"""The transfer job: pretrain (or load) a source network, then train every chosen method on
the few-label target task for every seed, and compare their target test accuracies.

``run_transfer(config)`` is the whole job behind ``l2t-fast transfer`` and the unit a sweep
runs. Each (method, seed) run is independent: it seeds every generator from its seed alone,
draws its labelled images from the training pool with that seed, and trains a fresh network,
so runs can be checkpointed, resumed and repeated one by one.
"""
import copy
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

from l2t_fast import checkpoint
from l2t_fast.data import batches, labelled_subset, load_data
from l2t_fast.methods import METHODS, build_method, evaluate
from l2t_fast.models import build_model, head_name, replace_head

# Every option of ``l2t-fast transfer`` (its long option with dashes -> underscores) with its
# default, except the output/checkpoint folders, --resume and --quiet, which are keyword
# arguments of run_transfer. The defaults are the embedded digits demo, which takes a few
# minutes on two CPU cores (benchmarks/RESULTS.md).
DEFAULT_CONFIG = {
    "data": "digits",           # "digits", an image-folder path, or a torchvision data set name
    "data_root": None,          # where a torchvision data set was downloaded
    "image_size": 16,
    "source_model": "resnet14",  # built-in resnet8/14/20, "torchvision:NAME", "timm:NAME"
    # the source's architecture: a resnet8 target learns these digits nearly as well alone
    # (benchmarks/RESULTS.md), a resnet14 one overfits 50 labels and gains from transfer
    "target_model": "resnet14",
    "source_checkpoint": None,  # a state_dict file for the source model, else pretrain it
    "source_epochs": 15,        # pretraining of the source on the data's source task
    "cache_dir": None,          # pretrained sources are cached here; None: ~/.cache/l2t_fast
    "source_layers": None,      # module names; None: suggested (the stages layer1.. of ResNets)
    "target_layers": None,
    "pairs": "all",             # "all" or a list of [source index, target index]
    "methods": list(METHODS),
    # five: single runs spread by 2-3 points across seeds, which three seeds cannot tell
    # from the 1-2 point differences between methods
    "seeds": [0, 1, 2, 3, 4],
    "labels_per_class": 10,     # labelled target images per class (0: the whole pool)
    "epochs": 40,
    "batch_size": 25,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "beta": 0.2,                # weight of the matching loss (fm, l2t-w, l2t-ww)
    "inner_steps": 2,           # T, lookahead steps on the matching loss (l2t-w, l2t-ww)
    "meta_lr": 1e-2,
    "freeze_stages": 0,         # finetune: stages that keep their source weights
    "lwf_temperature": 2.0,
    # the AT paper's 1000 (one pair per stage, 32x32 maps) swamps CE on 9 pairs of 16x16 maps
    "at_beta": 10.0,
    "augment_shift": 4,         # random translation in pixels, the only augmentation
    "device": "auto",           # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    "backend": "auto",          # weighted feature-matching backend
}


def resolve_config(config):
    """``config`` merged over ``DEFAULT_CONFIG``, checked; unknown keys are a ValueError."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(DEFAULT_CONFIG)}")
    merged = {**copy.deepcopy(DEFAULT_CONFIG), **copy.deepcopy(config)}
    methods = merged["methods"] = list(merged["methods"])
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods {bad or methods} unknown or empty; choose from "
                         f"{', '.join(METHODS)}")
    merged["seeds"] = [_int("seeds", s, 0) for s in merged["seeds"]]
    if not merged["seeds"]:
        raise ValueError("seeds is empty: give at least one seed")
    for key, low in (("epochs", 1), ("batch_size", 2), ("labels_per_class", 0),
                     ("inner_steps", 1), ("freeze_stages", 0), ("augment_shift", 0),
                     ("source_epochs", 1), ("image_size", 8)):
        merged[key] = _int(key, merged[key], low)
    for key in ("lr", "meta_lr", "beta", "lwf_temperature", "at_beta"):
        if not isinstance(merged[key], (int, float)) or not merged[key] > 0:
            raise ValueError(f"{key} must be a number > 0, got {merged[key]!r}")
    for key in ("momentum", "weight_decay"):
        if not isinstance(merged[key], (int, float)) or merged[key] < 0:
            raise ValueError(f"{key} must be a number >= 0, got {merged[key]!r}")
    if merged["pairs"] != "all":
        if isinstance(merged["pairs"], str):
            raise ValueError(f"pairs must be 'all' or a list of [source, target] index pairs, "
                             f"got {merged['pairs']!r}")
        merged["pairs"] = [[_int("pairs", i, 0) for i in pair] for pair in merged["pairs"]]
    for key in ("source_layers", "target_layers"):
        if merged[key] is not None:
            if isinstance(merged[key], str) or not merged[key]:
                raise ValueError(f"{key} must be a non-empty list of module names or None, "
                                 f"got {merged[key]!r}")
            merged[key] = list(merged[key])
    return merged


def _int(key, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
    return value


def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r} is not a valid torch device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def run_transfer(config, *, output_dir, checkpoint_dir=None, resume=False, progress=True,
                 on_epoch=None):
    """Run the transfer job; return its results and write them to ``output_dir``.

    - ``config``: a dict of options, possibly partial, merged over ``DEFAULT_CONFIG``;
      unknown keys raise a ValueError naming them.
    - Writes ``results.json`` and ``results.png`` into ``output_dir`` and returns the same
      JSON-serialisable dict: ``{"config", "source", "runs": [{"method", "seed",
      "test_accuracy", "seconds", "train_loss"...}], "summary": [{"method", "runs",
      "accuracy_mean", "accuracy_std", "seconds"}], "where_weights", "seconds"}``.
    - With ``checkpoint_dir``, every run is checkpointed after every epoch (and when done);
      ``resume=True`` skips finished runs and continues unfinished ones, with the same
      result as an uninterrupted run. Resuming with a different config is a ValueError.
    - ``on_epoch(metrics)``, if given, is called after each epoch with ``{"method", "seed",
      "epoch", "epochs", "train_loss", "train_accuracy", "test_accuracy"}`` (the accuracy on
      the held-out target test split).
    - ``progress``: a tqdm bar on stderr, shown only when stderr is a terminal.
    """
    from tqdm.auto import tqdm

    from l2t_fast import report

    config = resolve_config(config)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir to resume from")
    started = time.perf_counter()
    device = _device(config["device"])
    data = load_data(config["data"], config["data_root"], config["image_size"])
    show = progress and sys.stderr.isatty()
    source_model, source_info = _source_model(config, data, device, show)
    job = _Job(config, data, device, source_model, checkpoint_dir, resume, on_epoch)

    runs = []
    total = len(config["methods"]) * len(config["seeds"]) * config["epochs"]
    with tqdm(total=total, desc="transfer", unit="epoch", disable=not show) as bar:
        for method in config["methods"]:
            for seed in config["seeds"]:
                runs.append(job.run(method, seed, bar))

    results = {
        "config": config,
        "source": source_info,
        "runs": runs,
        "summary": summarise(runs, config["methods"]),
        "where_weights": _where_matrix(runs, job.source_layers, job.target_layers),
        "seconds": time.perf_counter() - started,
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    report.plot(results, os.path.join(output_dir, "results.png"))
    return results


def summarise(runs, methods):
    """Per method: mean and sample standard deviation of test accuracy over seeds, mean time."""
    summary = []
    for method in methods:
        accuracies = [r["test_accuracy"] for r in runs if r["method"] == method]
        seconds = [r["seconds"] for r in runs if r["method"] == method]
        summary.append({
            "method": method,
            "runs": len(accuracies),
            "accuracy_mean": float(np.mean(accuracies)),
            "accuracy_std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
            "seconds": float(np.mean(seconds)),
        })
    return summary


def _where_matrix(runs, source_layers, target_layers):
    """Mean learned Where weight per (source layer, target layer) over the L2T-ww runs;
    ``None`` where no pair was chosen, or no L2T-ww run at all."""
    weights = [r["where_weights"] for r in runs if "where_weights" in r]
    if not weights:
        return None
    matrix = [[None] * len(target_layers) for _ in source_layers]
    for m, n in weights[0]["pairs"]:
        matrix[m][n] = 0.0
    for run in weights:
        for (m, n), value in zip(run["pairs"], run["values"]):
            matrix[m][n] += value / len(weights)
    return {"source_layers": source_layers, "target_layers": target_layers, "matrix": matrix}


# ---- the source network -------------------------------------------------------------------

def _source_model(config, data, device, show):
    """The frozen source network: from ``source_checkpoint``, from the cache, or pretrained
    now on the data's source task (and then cached, keyed by everything that shaped it)."""
    if config["source_checkpoint"] is not None:
        return _load_source(config, device)
    if data.source_images is None:
        raise ValueError(f"data {config['data']!r} has no source task to pretrain on: give "
                         f"source_checkpoint (--source-checkpoint), a state_dict file of "
                         f"{config['source_model']!r}")
    key_fields = {k: config[k] for k in ("data", "image_size", "source_model", "source_epochs")}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = config["cache_dir"] or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "l2t_fast")
    path = os.path.join(cache_dir, f"source-{config['source_model'].replace(':', '-')}-{key}.pt")
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
        info = _pretrain_source(model, config, data, show)
        checkpoint.save_atomic({"model": model.state_dict(), "info": info}, path)
        info = {**info, "cached": False}
    return model.to(device).eval().requires_grad_(False), {**info, "path": path}


def _load_source(config, device):
    path = config["source_checkpoint"]
    if not os.path.isfile(path):
        raise ValueError(f"source_checkpoint {path!r} is not a file")
    state = checkpoint.load(path)
    state = state.get("model", state)
    model = build_model(config["source_model"], 1)
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


def _pretrain_source(model, config, data, show):
    """Plain supervised training on the source task (80%; the other 20% measure it), on the
    CPU; with the seeding in ``_source_model``, the cached network does not depend on where
    or after what it was made."""
    from tqdm.auto import tqdm

    from l2t_fast.data import stratified_mask

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


# ---- one (method, seed) run ---------------------------------------------------------------

class _Job:
    """What the runs share: config, data on the device, the source network, the layers."""

    def __init__(self, config, data, device, source_model, checkpoint_dir, resume, on_epoch):
        from l2t_fast.features import suggest_layers

        self.config, self.data, self.device = config, data, device
        self.source_model = source_model
        self.checkpoint_dir, self.resume, self.on_epoch = checkpoint_dir, resume, on_epoch
        self.pool_images = data.pool_images.to(device)
        self.pool_labels = data.pool_labels.to(device)
        self.test_images = data.test_images.to(device)
        self.test_labels = data.test_labels.to(device)
        self.example = self.pool_images[:2]
        self.source_layers = config["source_layers"] or suggest_layers(source_model, self.example)
        target = build_model(config["target_model"], data.num_classes)
        self.target_layers = config["target_layers"] or suggest_layers(target, self.example.cpu())
        self.config_json = json.dumps(config, sort_keys=True)

    def _checkpoint_path(self, method, seed):
        return os.path.join(self.checkpoint_dir, f"{method}-seed{seed}.pt")

    def _saved_state(self, method, seed):
        if not (self.resume and os.path.exists(self._checkpoint_path(method, seed))):
            return None
        state = checkpoint.load(self._checkpoint_path(method, seed))
        if state["config"] != self.config_json:
            saved = json.loads(state["config"])
            differ = sorted(k for k in set(saved) | set(self.config)
                            if saved.get(k) != self.config.get(k))
            raise ValueError(f"cannot resume {self._checkpoint_path(method, seed)}: it was made "
                             f"with a different config (keys {differ} differ)")
        return state

    def run(self, method_name, seed, bar):
        config = self.config
        state = self._saved_state(method_name, seed)
        if state is not None and state["finished"]:
            bar.update(config["epochs"])
            return state["result"]

        checkpoint.seed_everything(seed)
        generator = torch.Generator().manual_seed(seed)
        chosen = labelled_subset(self.data.pool_labels, config["labels_per_class"], generator)
        chosen = chosen.to(self.device)
        images, labels = self.pool_images[chosen], self.pool_labels[chosen]
        target_model = build_model(config["target_model"], self.data.num_classes).to(self.device)
        method = build_method(
            method_name, source_model=self.source_model, target_model=target_model,
            num_classes=self.data.num_classes, source_layers=self.source_layers,
            target_layers=self.target_layers, example_input=self.example,
            pairs="all" if config["pairs"] == "all" else [tuple(p) for p in config["pairs"]],
            **{k: config[k] for k in ("lr", "momentum", "weight_decay", "beta", "inner_steps",
                                      "meta_lr", "freeze_stages", "lwf_temperature",
                                      "at_beta", "backend")})
        history, seconds, start_epoch = [], 0.0, 0
        if state is not None:
            method.load_state_dict(state["method_state"])
            checkpoint.set_rng_state(state["rng"])
            generator.set_state(state["data_generator"])
            history, seconds, start_epoch = state["history"], state["seconds"], state["epoch"]
            bar.update(start_epoch)

        for epoch in range(start_epoch, config["epochs"]):
            started = time.perf_counter()
            _set_lr(method.optimizer, config["lr"], epoch, config["epochs"])
            losses = [method.train_step(x, y) for x, y in
                      batches(images, labels, config["batch_size"], generator,
                              config["augment_shift"])]
            seconds += time.perf_counter() - started
            history.append(float(np.mean([loss["loss"] for loss in losses])))
            if self.checkpoint_dir is not None:
                self._save(method_name, seed, {
                    "finished": False, "epoch": epoch + 1, "method_state": method.state_dict(),
                    "rng": checkpoint.rng_state(), "data_generator": generator.get_state(),
                    "history": history, "seconds": seconds})
            bar.update(1)
            bar.set_postfix(method=method_name, seed=seed, loss=f"{history[-1]:.3f}")
            if self.on_epoch is not None:
                self.on_epoch({
                    "method": method_name, "seed": seed, "epoch": epoch + 1,
                    "epochs": config["epochs"], "train_loss": history[-1],
                    "train_accuracy": evaluate(method.model, images, labels),
                    "test_accuracy": evaluate(method.model, self.test_images, self.test_labels)})

        result = {"method": method_name, "seed": seed,
                  "test_accuracy": evaluate(method.model, self.test_images, self.test_labels),
                  "seconds": seconds, "train_loss": history}
        if method_name == "l2t-ww":
            result["where_weights"] = {
                "pairs": [list(p) for p in method.engine.pairs],
                "values": method.pair_weights(self.test_images[:512]).tolist()}
        if self.checkpoint_dir is not None:
            self._save(method_name, seed, {"finished": True, "result": result,
                                           "method_state": method.state_dict()})
        return result

    def _save(self, method, seed, state):
        checkpoint.save_atomic({"config": self.config_json, **state},
                               self._checkpoint_path(method, seed))


def _set_lr(optimizer, base_lr, epoch, epochs):
    """Cosine annealing by epoch, written straight into the optimizer: a pure function of
    the epoch, so that a resumed run needs no scheduler state."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))

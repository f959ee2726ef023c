"""The transfer job: pretrain (or load) a source network, then train every chosen method on
the few-label target task for every seed, and compare their target test accuracies.

``run_transfer(config)`` is the whole job behind ``l2t-fast transfer`` and the unit a sweep
runs. Each (method, seed) run is independent: it seeds every generator from its seed alone,
draws its labelled images from the training pool with that seed, and trains a fresh network,
so runs can be checkpointed, resumed and repeated one by one.
"""
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

from l2t_fast import checkpoint, methods
from l2t_fast.data import labelled_subset, load_data, offers
from l2t_fast.data.digits import SCENARIO_SETTINGS
from l2t_fast.jobs import options
from l2t_fast.jobs.source import source_model
from l2t_fast.methods.base import Batch, Setup, evaluate
from l2t_fast.models import build_model
from l2t_fast.models.layers import suggest_layers


def resolve_config(config):
    """The complete, checked config: the option table's defaults, then (on the embedded
    digits) the scenarios' settings, then ``config``. Unknown keys and bad values are
    ValueErrors naming them; ``methods: "all"`` becomes every method the data allows."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    table = options.table()
    unknown = sorted(set(config) - set(table))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(table)}")
    merged = {name: copy.deepcopy(option.default) for name, option in table.items()}
    if config.get("data", merged["data"]) == "digits":
        scenario = table["scenario"].coerce(config.get("scenario", merged["scenario"]))
        merged.update(SCENARIO_SETTINGS[scenario])
    merged.update(copy.deepcopy(config))
    resolved = {name: table[name].coerce(value) for name, value in merged.items()}
    resolved["methods"] = _methods(resolved)
    return resolved


def _methods(config):
    """The methods to run: every one the data allows for "all"; a named one that needs
    what the data lacks is an error that says what."""
    available = offers(config["data"], config["scenario"])
    registry = methods.registry()
    if config["methods"] == "all":
        return [name for name, spec in registry.items() if spec.needs <= available]
    for name in config["methods"]:
        missing = registry[name].needs - available
        if missing:
            what = "; ".join(methods.NEEDS[need] for need in sorted(missing))
            data = config["data"] + (f" (scenario {config['scenario']})"
                                     if config["data"] == "digits" else "")
            raise ValueError(f"method {name} needs {what}, which data {data} does not have")
    return list(config["methods"])


def method_options(name, config):
    """The options of ``config`` that method ``name`` takes."""
    return {option.name: config[option.name] for option in methods.spec(name).options}


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

    - ``config``: a dict of options, possibly partial (see ``resolve_config``).
    - Writes ``results.json`` and ``results.png`` into ``output_dir`` and returns the same
      JSON-serialisable dict: ``{"config", "source", "runs": [{"method", "seed",
      "test_accuracy", "seconds", "train_loss", "outputs"...}], "summary": [{"method",
      "runs", "accuracy_mean", "accuracy_std", "seconds"}], "method_outputs", "seconds"}``;
      ``method_outputs`` holds, per method, what its runs learned besides their networks
      (L2T-ww's where-weights heat map), as drawn in the figure.
    - With ``checkpoint_dir``, every run is checkpointed after every epoch (and when done);
      ``resume=True`` skips finished runs and continues unfinished ones, with the same
      result as an uninterrupted run. Resuming with a different config is a ValueError.
    - ``on_epoch(metrics)``, if given, is called after each epoch with ``{"method", "seed",
      "epoch", "epochs", "train_loss", "train_accuracy", "test_accuracy"}`` (the accuracy on
      the held-out target test split).
    - ``progress``: a tqdm bar on stderr, shown only when stderr is a terminal.
    """
    from tqdm.auto import tqdm

    from l2t_fast.jobs import report

    config = resolve_config(config)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir to resume from")
    started = time.perf_counter()
    device = _device(config["device"])
    data = load_data(config["data"], config["data_root"], config["image_size"],
                     config["scenario"])
    show = progress and sys.stderr.isatty()
    source, source_info = source_model(config, data, device, show)
    job = _Job(config, data, device, source, checkpoint_dir, resume, on_epoch)

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
        "method_outputs": _method_outputs(runs, config["methods"], job.source_layers,
                                          job.target_layers),
        "seconds": time.perf_counter() - started,
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    report.plot(results, os.path.join(output_dir, "results.png"))
    return results


def summarise(runs, method_names):
    """Per method: mean and sample standard deviation of test accuracy over seeds, mean time."""
    summary = []
    for method in method_names:
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


def _method_outputs(runs, method_names, source_layers, target_layers):
    """Each method's summary of its runs' ``outputs`` (``Method.combine_outputs``)."""
    combined = {}
    for name in method_names:
        outputs = [r["outputs"] for r in runs if r["method"] == name and r["outputs"]]
        if outputs:
            combined[name] = methods.spec(name).cls.combine_outputs(outputs, source_layers,
                                                                    target_layers)
    return combined


# ---- one (method, seed) run ---------------------------------------------------------------

class _Job:
    """What the runs share: config, data on the device, the source network, the layers."""

    def __init__(self, config, data, device, source, checkpoint_dir, resume, on_epoch):
        self.config, self.device = config, device
        self.pool_labels = data.pool_labels  # on the CPU: labelled subsets are drawn there
        self.data = data.to(device)
        self.source_model = source
        self.checkpoint_dir, self.resume, self.on_epoch = checkpoint_dir, resume, on_epoch
        self.example = self.data.example_input()
        self.source_layers = config["source_layers"] or suggest_layers(source, self.example)
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

    def _batches(self, chosen, generator, extras_generator, needs):
        """One epoch of ``Batch``es of the labelled images ``chosen``; the source-task and
        unlabelled images that the method ``needs`` are drawn at random, as many as the
        labelled batch has, from their own generator (so methods that need none draw
        nothing)."""
        shift = self.config["augment_shift"]
        for x, y in self.data.labelled_batches(chosen, self.config["batch_size"], generator,
                                               shift):
            batch = Batch(x, y)
            if "source_batches" in needs:
                batch.source_x, batch.source_y = self.data.random_source(
                    len(x), extras_generator, shift)
            if "unlabelled" in needs:
                batch.unlabelled = self.data.random_unlabelled(len(x), extras_generator, shift)
            yield batch

    def run(self, method_name, seed, bar):
        config = self.config
        state = self._saved_state(method_name, seed)
        if state is not None and state["finished"]:
            bar.update(config["epochs"])
            return state["result"]

        checkpoint.seed_everything(seed)
        generator = torch.Generator().manual_seed(seed)
        extras_generator = torch.Generator().manual_seed(seed + (1 << 40))
        chosen = labelled_subset(self.pool_labels, config["labels_per_class"], generator)
        chosen = chosen.to(self.device)
        target_model = build_model(config["target_model"], self.data.num_classes).to(self.device)
        setup = Setup(self.source_model, target_model, self.data.num_classes,
                      self.source_layers, self.target_layers, self.example,
                      self.data.num_source_classes)
        method = methods.build_method(method_name, setup, **method_options(method_name, config))
        needs = methods.spec(method_name).needs
        history, seconds, start_epoch = [], 0.0, 0
        if state is not None:
            method.load_state_dict(state["method_state"])
            checkpoint.set_rng_state(state["rng"])
            generator.set_state(state["data_generator"])
            extras_generator.set_state(state["extras_generator"])
            history, seconds, start_epoch = state["history"], state["seconds"], state["epoch"]
            bar.update(start_epoch)

        for epoch in range(start_epoch, config["epochs"]):
            started = time.perf_counter()
            _set_lr(method.optimizer, config["lr"], epoch, config["epochs"])
            losses = [method.train_step(batch) for batch in
                      self._batches(chosen, generator, extras_generator, needs)]
            seconds += time.perf_counter() - started
            history.append(float(np.mean([loss["loss"] for loss in losses])))
            if self.checkpoint_dir is not None:
                self._save(method_name, seed, {
                    "finished": False, "epoch": epoch + 1, "method_state": method.state_dict(),
                    "rng": checkpoint.rng_state(), "data_generator": generator.get_state(),
                    "extras_generator": extras_generator.get_state(),
                    "history": history, "seconds": seconds})
            bar.update(1)
            bar.set_postfix(method=method_name, seed=seed, loss=f"{history[-1]:.3f}")
            if self.on_epoch is not None:
                self.on_epoch({
                    "method": method_name, "seed": seed, "epoch": epoch + 1,
                    "epochs": config["epochs"], "train_loss": history[-1],
                    "train_accuracy": evaluate(method.model, *self.data.labelled(chosen)),
                    "test_accuracy": evaluate(method.model, self.data.test_batches())})

        result = {"method": method_name, "seed": seed,
                  "test_accuracy": evaluate(method.model, self.data.test_batches()),
                  "seconds": seconds, "train_loss": history,
                  "outputs": method.outputs(self.data.probe_images(512))}
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


# ---- the command line ---------------------------------------------------------------------

def add_arguments(parser):
    """``l2t-fast transfer``: a flag per row of the option table, and where results go."""
    parser.description = ("Train every transfer method on the target task for several seeds "
                          "and compare test accuracies. With no options: the embedded digits "
                          "job (a few minutes on 2 CPU cores).")
    options.add_arguments(parser)
    parser.add_argument("--output-dir", default="l2t_fast_results",
                        help="where results.json and results.png go (default: l2t_fast_results)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint every run here after every epoch")
    parser.add_argument("--resume", action="store_true",
                        help="continue from --checkpoint-dir: finished runs are reused")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args):
    """Run ``l2t-fast transfer``: the job, then its table on stdout."""
    from l2t_fast.jobs import report

    results = run_transfer(options.from_arguments(args), output_dir=args.output_dir,
                           checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                           progress=not args.quiet)
    source = results["source"]
    if "test_accuracy" in source:
        print(f"source {source['model']}: {100 * source['test_accuracy']:.2f}% on held-out "
              f"source images ({'cached' if source['cached'] else 'pretrained now'})")
    print(report.format_table(results["summary"]))
    print(f"total {results['seconds']:.1f} s; results in {args.output_dir}/results.json "
          f"and results.png")
    return 0

"""The transfer job: pretrain (or load) a source network, then train every chosen method on
the few-label target task for every seed, and compare their target test accuracies.

``run_transfer(config)`` is the whole job behind ``l2t-fast transfer`` and the unit a sweep
runs. Each (method, seed) run is independent: it seeds every generator from its seed alone,
draws its labelled images from the training pool with that seed, and trains a fresh network,
so runs can be checkpointed, resumed and repeated one by one.
"""
import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

from l2t_fast import checkpoint, methods
from l2t_fast.data import batch_spans, labelled_subset, load_data, offers
from l2t_fast.data.digits import SCENARIO_SETTINGS
from l2t_fast.jobs import options
from l2t_fast.jobs import runs as runs_module
from l2t_fast.jobs.source import source_model
from l2t_fast.methods.base import Batch, Setup, evaluate
from l2t_fast.models import build_model, pretrained_statistics
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


def prepare(config):
    """The resolved config and the torch device, with every check that needs no data done:
    options, device, and a named matching backend that cannot run there fail now, not
    mid-job."""
    from l2t_fast.matching import backends

    config = resolve_config(config)
    device = _device(config["device"])
    if config["source_checkpoint"] is not None and not os.path.isfile(config["source_checkpoint"]):
        raise ValueError(f"source_checkpoint {config['source_checkpoint']!r} is not a file")
    if config["amp"] != "off" and device.type != "cuda":
        raise ValueError(f"--amp {config['amp']} needs a CUDA device, not {device} (amp: "
                         f"{config['amp']})")
    uses_backend = any("backend" in method_options(name, config) for name in config["methods"])
    if config["backend"] != "auto" and uses_backend:
        try:
            backends.resolve(config["backend"], device, torch.float32)
        except backends.BackendUnavailable as error:
            raise ValueError(f"backend {config['backend']!r} on {device}: {error}") from None
    return config, device


def run_transfer(config, *, output_dir, checkpoint_dir=None, resume=False, progress=True,
                 on_epoch=None):
    """Run the transfer job in job folder ``output_dir``; return its results.

    - ``config``: a dict of options, possibly partial (see ``resolve_config``).
    - ``output_dir`` becomes this job's folder (``l2t_fast.jobs.runs``): ``job.json`` first,
      then ``results.json`` (strict JSON, rewritten after every finished run, so that a
      failure late in a job keeps what was done), ``results.png``, every run's trained
      network in ``models/``. A folder of another job is refused; ``resume=True`` continues
      the job there: finished runs are reused, unfinished ones continue from their last
      checkpoint (the same result as an uninterrupted run), and new methods or seeds run.
    - Every run is checkpointed after every epoch into ``checkpoint_dir`` (default
      ``output_dir/checkpoints``), keeping the previous checkpoint too.
    - A run whose loss or parameters turn non-finite stops there and is marked ``diverged``
      (with the epoch and step); the job goes on with the others.
    - Returns ``{"config", "source", "runs": [{"method", "seed", "status", "test_accuracy",
      "seconds", "train_loss", "outputs", ...}], "summary": [...], "method_outputs",
      "seconds", "complete"}``; ``method_outputs`` holds, per method, what its runs learned
      besides their networks (L2T-ww's where-weights heat map), as drawn in the figure.
    - ``on_epoch(metrics)``, if given, is called after each epoch with ``{"method", "seed",
      "epoch", "epochs", "train_loss", "train_accuracy", "test_accuracy"}`` (the accuracy on
      the held-out target test split).
    - ``progress``: a tqdm bar on stderr, shown only when stderr is a terminal.
    """
    from tqdm.auto import tqdm

    from l2t_fast.jobs import report

    config, device = prepare(config)
    output_dir = os.fspath(output_dir)
    checkpoint_dir = os.fspath(checkpoint_dir or os.path.join(output_dir, "checkpoints"))
    runs_module.claim(output_dir, config, resume)
    if os.path.realpath(checkpoint_dir) != os.path.realpath(
            os.path.join(output_dir, "checkpoints")):
        runs_module.claim(checkpoint_dir, config, resume)
    started = time.perf_counter()
    data = load_job_data(config)
    show = progress and sys.stderr.isatty()
    source, source_info = source_model(config, data, device, show)
    job = _Job(config, data, device, source, output_dir, checkpoint_dir, on_epoch)

    def results(runs, complete):
        return {
            "config": config,
            "source": source_info,
            "runs": runs,
            "summary": summarise(runs, config["methods"]),
            "method_outputs": _method_outputs(runs, config["methods"], job.source_layers,
                                              job.target_layers),
            "seconds": time.perf_counter() - started,
            "complete": complete,
        }

    runs = []
    total = len(config["methods"]) * len(config["seeds"]) * config["epochs"]
    with tqdm(total=total, desc="transfer", unit="epoch", disable=not show) as bar:
        for method in config["methods"]:
            for seed in config["seeds"]:
                runs.append(job.run(method, seed, bar))
                runs_module.write_json(os.path.join(output_dir, "results.json"),
                                       results(runs, complete=False))
    final = results(runs, complete=True)
    runs_module.write_json(os.path.join(output_dir, "results.json"), final)
    report.plot(final, os.path.join(output_dir, "results.png"))
    return json.loads(json.dumps(runs_module.finite(final)))


def load_job_data(config):
    """The job's data; a folder or named data set is normalised with the statistics of the
    source's pretrained weights where their library records them, else its pool's own."""
    statistics = None
    if config["data"] != "digits":
        statistics = pretrained_statistics(config["source_model"], config["source_weights"])
    return load_data(config["data"], config["data_root"], config["image_size"],
                     config["scenario"], statistics=statistics, workers=config["workers"])


def summarise(runs, method_names):
    """Per method: over its finished runs, the mean and sample standard deviation of test
    accuracy and the mean time; the count of diverged runs; and, for every method but
    ``scratch`` when scratch ran, the paired difference to scratch over the seeds both
    finished: its mean and 95% confidence interval (Student's t over the seed-wise
    differences; none from a single seed)."""
    from scipy import stats

    finished = {(r["method"], r["seed"]): r["test_accuracy"] for r in runs
                if r["status"] == "finished"}
    summary = []
    for method in method_names:
        mine = [r for r in runs if r["method"] == method]
        accuracies = [finished[method, r["seed"]] for r in mine if (method, r["seed"]) in finished]
        row = {
            "method": method,
            "runs": len(accuracies),
            "diverged": sum(r["status"] == "diverged" for r in mine),
            "accuracy_mean": float(np.mean(accuracies)) if accuracies else None,
            "accuracy_std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
            "seconds": float(np.mean([r["seconds"] for r in mine])) if mine else None,
        }
        if method != "scratch" and "scratch" in method_names:
            differences = [finished[method, r["seed"]] - finished["scratch", r["seed"]]
                           for r in mine if (method, r["seed"]) in finished
                           and ("scratch", r["seed"]) in finished]
            paired = {"seeds": len(differences), "mean": None, "low": None, "high": None}
            if differences:
                paired["mean"] = float(np.mean(differences))
            if len(differences) > 1:
                half = (stats.t.ppf(0.975, len(differences) - 1)
                        * np.std(differences, ddof=1) / np.sqrt(len(differences)))
                paired["low"] = float(paired["mean"] - half)
                paired["high"] = float(paired["mean"] + half)
            row["vs_scratch"] = paired
        summary.append(row)
    return summary


def _method_outputs(runs, method_names, source_layers, target_layers):
    """Each method's summary of its finished runs' ``outputs`` (``Method.combine_outputs``)."""
    combined = {}
    for name in method_names:
        outputs = [r["outputs"] for r in runs
                   if r["method"] == name and r["status"] == "finished" and r["outputs"]]
        if outputs:
            combined[name] = methods.spec(name).cls.combine_outputs(outputs, source_layers,
                                                                    target_layers)
    return combined


def _parameters_finite(optimizer):
    """Whether every parameter the optimizer moves is finite: one reduction, one sync."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norms = torch._foreach_norm([p.detach() for p in params])
    return bool(torch.isfinite(torch.stack(norms)).all())


# ---- one (method, seed) run ---------------------------------------------------------------

class _Job:
    """What the runs share: config, data on the device, the source network, the layers;
    and how inputs are laid out (``channels_last``) and forward passes run (``amp``)."""

    def __init__(self, config, data, device, source, output_dir, checkpoint_dir, on_epoch):
        self.config, self.device = config, device
        self.pool_labels = data.pool_labels  # on the CPU: labelled subsets are drawn there
        self.data = data.to(device)
        if config["channels_last"]:
            source = source.to(memory_format=torch.channels_last)
        self.source_model = source
        self.output_dir, self.checkpoint_dir, self.on_epoch = output_dir, checkpoint_dir, on_epoch
        self.example = self.data.example_input()
        self.source_layers = config["source_layers"] or suggest_layers(source, self.example)
        target = self._target_model()
        self.target_layers = config["target_layers"] or suggest_layers(target, self.example.cpu())
        # what a run's checkpoint must match: the config but for the methods and seeds run
        # and what does not change results
        run_config = {k: v for k, v in config.items()
                      if k not in runs_module.EXTENDABLE + runs_module.RESULT_NEUTRAL}
        self.run_config_json = json.dumps(run_config, sort_keys=True)
        self.config_hash = hashlib.sha256(self.run_config_json.encode()).hexdigest()[:16]

    def _target_model(self):
        """A freshly initialised target network (on the CPU), built for the image size."""
        return build_model(self.config["target_model"], self.data.num_classes,
                           image_size=self.config["image_size"])

    def _layout(self, images):
        """``images`` in the memory format the models are in."""
        if self.config["channels_last"]:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def _autocast(self):
        """Where forward passes run: under bfloat16 autocast with ``amp`` bf16."""
        if self.config["amp"] == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _evaluate(self, model, batches):
        with self._autocast():
            return evaluate(model, ((self._layout(x), y) for x, y in batches))

    def _checkpoint_path(self, method, seed):
        return os.path.join(self.checkpoint_dir, f"{method}-seed{seed}.pt")

    def _saved_state(self, method, seed):
        path = self._checkpoint_path(method, seed)
        state = checkpoint.load_latest(path, "checkpoint",
                                       "delete it (and its .previous.pt) to rerun that run")
        if state is None:
            return None
        if (state.get("method"), state.get("seed")) != (method, seed):
            raise checkpoint.CheckpointError(
                f"checkpoint {path!r} is of {state.get('method')} seed {state.get('seed')}, not "
                f"{method} seed {seed}: it was moved or copied there; delete it")
        if state.get("config_hash") != self.config_hash:
            saved = json.loads(state["config"])
            differ = runs_module.differing_keys(saved, json.loads(self.run_config_json))
            raise checkpoint.CheckpointError(
                f"cannot resume {path!r}: it was made with a different config (keys {differ} "
                f"differ)")
        return state

    def _batches(self, chosen, generator, extras_generator, needs):
        """One epoch of ``Batch``es of the labelled images ``chosen``; the source-task and
        unlabelled images that the method ``needs`` are drawn at random, as many as the
        labelled batch has, from their own generator (so methods that need none draw
        nothing)."""
        shift, batch_size = self.config["augment_shift"], self.config["batch_size"]
        if "unlabelled" in needs:
            sizes = [stop - start for start, stop in batch_spans(len(chosen), batch_size)]
            unlabelled = iter(self.data.unlabelled_batches(sizes, extras_generator, shift))
        for x, y in self.data.labelled_batches(chosen, batch_size, generator, shift):
            batch = Batch(self._layout(x), y)
            if "source_batches" in needs:
                source_x, batch.source_y = self.data.random_source(
                    len(x), extras_generator, shift)
                batch.source_x = self._layout(source_x)
            if "unlabelled" in needs:
                batch.unlabelled = self._layout(next(unlabelled))
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
        target_model = self._target_model().to(self.device)
        if config["channels_last"]:
            target_model = target_model.to(memory_format=torch.channels_last)
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

        steps_per_epoch = -(-len(chosen) // config["batch_size"])
        for epoch in range(start_epoch, config["epochs"]):
            started = time.perf_counter()
            _set_lr(method.optimizer, config["lr"], epoch, config["epochs"])
            losses, images = [], 0
            for step, batch in enumerate(self._batches(chosen, generator, extras_generator,
                                                       needs)):
                method.set_progress((epoch + step / steps_per_epoch) / config["epochs"])
                images += len(batch.x)
                try:
                    with self._autocast():
                        loss = method.train_step(batch)
                except FloatingPointError as error:  # a method's own check (Diverged)
                    return self._diverged(method_name, seed, epoch, step, str(error),
                                          history, seconds, bar)
                if not all(math.isfinite(value) for value in loss.values()):
                    return self._diverged(method_name, seed, epoch, step,
                                          f"non-finite loss {loss}", history, seconds, bar)
                losses.append(loss)
            if not _parameters_finite(method.optimizer):
                return self._diverged(method_name, seed, epoch, len(losses) - 1,
                                      "a parameter turned non-finite", history, seconds, bar)
            epoch_seconds = time.perf_counter() - started
            seconds += epoch_seconds
            history.append(float(np.mean([loss["loss"] for loss in losses])))
            self._save(method_name, seed, {
                "finished": False, "epoch": epoch + 1, "method_state": method.state_dict(),
                "rng": checkpoint.rng_state(), "data_generator": generator.get_state(),
                "extras_generator": extras_generator.get_state(),
                "history": history, "seconds": seconds})
            bar.update(1)
            bar.set_postfix({"method": method_name, "seed": seed, "loss": f"{history[-1]:.3f}",
                             "images/s": f"{images / epoch_seconds:.1f}"})
            if self.on_epoch is not None:
                self.on_epoch({
                    "method": method_name, "seed": seed, "epoch": epoch + 1,
                    "epochs": config["epochs"], "train_loss": history[-1],
                    "train_accuracy": self._evaluate(method.model,
                                                     self.data.pool_batches(chosen)),
                    "test_accuracy": self._evaluate(method.model, self.data.test_batches())})

        result = {"method": method_name, "seed": seed, "status": "finished",
                  "test_accuracy": self._evaluate(method.model, self.data.test_batches()),
                  "seconds": seconds, "train_loss": history,
                  "outputs": self._outputs(method)}
        runs_module.save_model(self.output_dir, method_name, seed, method.model, config,
                               self.data.num_classes)
        self._save(method_name, seed, {"finished": True, "result": result,
                                       "method_state": method.state_dict()})
        return result

    def _outputs(self, method):
        with self._autocast():
            return method.outputs(self._layout(self.data.probe_images(512)))

    def _diverged(self, method_name, seed, epoch, step, reason, history, seconds, bar):
        """The result of a run that stopped on a non-finite loss or parameter (kept, so
        that a resumed job does not run it again)."""
        result = {"method": method_name, "seed": seed, "status": "diverged",
                  "diverged": {"epoch": epoch + 1, "step": step + 1, "reason": reason},
                  "test_accuracy": None, "seconds": seconds, "train_loss": history,
                  "outputs": {}}
        self._save(method_name, seed, {"finished": True, "result": result})
        bar.update(self.config["epochs"] - epoch)
        return result

    def _save(self, method, seed, state):
        checkpoint.save_atomic({"method": method, "seed": seed,
                                "config_hash": self.config_hash,
                                "config": self.run_config_json, **state},
                               self._checkpoint_path(method, seed), keep_previous=True)


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
                          "job (a few minutes on 2 CPU cores). Each job gets a fresh folder "
                          "OUTPUT_DIR/<date-time> (OUTPUT_DIR/latest points at the newest).")
    options.add_arguments(parser)
    parser.add_argument("--output-dir", default=os.path.join("runs", "transfer"),
                        help="where job folders go (default: runs/transfer)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint every run here after every epoch (default: the job "
                             "folder's checkpoints/)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="JOB",
                        help="continue a job folder (default: OUTPUT_DIR/latest): finished runs "
                             "are reused, unfinished ones continue, new --methods or --seeds "
                             "run too")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args):
    """Run ``l2t-fast transfer``: the job in a fresh (or the resumed) job folder, then its
    table on stdout. Exit status 1 when some runs diverged."""
    from l2t_fast.jobs import report

    config = options.from_arguments(args)
    prepare(config)  # a bad option, device or backend fails before any folder is made
    if args.resume is not None:
        folder = runs_module.folder_to_resume(
            args.output_dir, None if args.resume == "latest" else args.resume)
    else:
        folder = runs_module.new_run_folder(args.output_dir)
    print(f"job folder: {folder}", flush=True)
    results = run_transfer(config, output_dir=folder, checkpoint_dir=args.checkpoint_dir,
                           resume=args.resume is not None, progress=not args.quiet)
    source = results["source"]
    if "test_accuracy" in source:
        print(f"source {source['model']}: {100 * source['test_accuracy']:.2f}% on held-out "
              f"source images ({'cached' if source['cached'] else 'pretrained now'})")
    print(report.format_table(results["summary"]))
    print(f"total {results['seconds']:.1f} s; results in {folder}/results.json and "
          f"results.png")
    diverged = [r for r in results["runs"] if r["status"] == "diverged"]
    for run in diverged:
        where = run["diverged"]
        print(f"diverged: {run['method']} seed {run['seed']} at epoch {where['epoch']}, step "
              f"{where['step']}: {where['reason']}", file=sys.stderr)
    return 1 if diverged else 0

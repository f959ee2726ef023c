"""``l2t-fast analyze``: what was transferred, measured on the networks of a transfer job.

With no options it runs a small ``l2t-fast transfer`` job on the embedded default (the
source from the cache or pretrained now, then scratch, finetune and L2T-ww for seeds 0 and
1) and analyses it; ``--results JOB`` analyses a finished job instead, and ``--models A B``
any two networks. Everything lands in a fresh folder ``OUTPUT_DIR/<date-time>``:
``analysis.json`` (strict JSON) and ``analysis.png``, with the transfer job in
``transfer/`` and the block-shuffle runs in ``block_shuffle/`` when it ran them.

The measurements (``l2t_fast.analysis``): the minibatch CKA of every (source layer, target
layer) pair, set against L2T-ww's learned where-weights of the same pairs; parameter
distances and the loss along straight lines between networks (fine-tuned pairs, scratch
pairs, across); module criticality of a fine-tuned and a scratch network; the transfer gain
of fine-tuning over scratch on block-shuffled images; how often the networks err on the same
test images; the proxy A-distance between source and target images in the source's
features.
"""
import itertools
import math
import os
import sys
import time

import torch

from l2t_fast import analysis, checkpoint, methods
from l2t_fast.data import TransferData
from l2t_fast.jobs import options
from l2t_fast.jobs import runs as runs_module
from l2t_fast.jobs.transfer import load_job_data
from l2t_fast.methods.base import Setup
from l2t_fast.models import build_model
from l2t_fast.models.layers import suggest_layers

ANALYSIS_KEYS = tuple(option.name for option in options.ANALYZE_OPTIONS)


def resolve_settings(config):
    """``(settings, job_config)``: the analysis options, complete and checked, and the
    transfer-job options the user gave (the job or the data of ``--models``)."""
    rows = options.analyze_table()
    unknown = sorted(set(config) - set(rows))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(rows)}")
    settings = {name: rows[name].coerce(config.get(name, rows[name].default))
                for name in ANALYSIS_KEYS}
    if settings["analyses"] == "all":
        settings["analyses"] = list(options.ANALYSES)
    if settings["models"] is not None and len(settings["models"]) != 2:
        raise ValueError(f"models must name exactly 2 networks, got {settings['models']}")
    if settings["models"] is not None and settings["results"] is not None:
        raise ValueError("give models or results, not both")
    job_config = {k: v for k, v in config.items() if k not in ANALYSIS_KEYS}
    if settings["results"] is not None and job_config:
        raise ValueError(f"options {sorted(job_config)} configure the job that analyze runs; "
                         f"with results the job's own config is used")
    return settings, job_config


def run_analysis(config, *, output_dir, progress=True):
    """Run the analyses into ``output_dir`` (made if missing) and return their results, as
    also written to ``analysis.json`` and drawn in ``analysis.png``. ``config``: options of
    ``options.analyze_table()`` (the analysis rows, and transfer-job rows for the job it
    runs when neither ``results`` nor ``models`` is given)."""
    from l2t_fast.jobs.transfer import prepare, run_transfer

    settings, job_config = resolve_settings(config)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    show = progress and sys.stderr.isatty()
    started = time.perf_counter()
    job_seconds = None
    if settings["models"] is not None:
        job_config, device = prepare(job_config)
        results = _Analysis(job_config, settings, device, output_dir, show).of_models()
    else:
        folder = settings["results"]
        if folder is None:
            folder = os.path.join(output_dir, "transfer")
            job_seconds = run_transfer({**options.ANALYZE_JOB_DEFAULTS, **job_config},
                                       output_dir=folder, progress=progress)["seconds"]
        job = runs_module.load_results(folder)
        job_config, device = prepare(job["config"])
        results = _Analysis(job_config, settings, device, output_dir, show).of_job(folder, job)
    results["transfer_job_seconds"] = job_seconds
    results["seconds"] = time.perf_counter() - started
    runs_module.write_json(os.path.join(output_dir, "analysis.json"), results)
    plot(results, os.path.join(output_dir, "analysis.png"))
    return runs_module.finite(results)


def initial_network(config, data, source, method, seed, source_layers, target_layers):
    """The network run (``method``, ``seed``) of a transfer job started from, rebuilt the way
    ``l2t_fast.jobs.transfer`` builds it (the same seeding, then the same constructors)."""
    checkpoint.seed_everything(seed)
    target = build_model(config["target_model"], data.num_classes,
                         image_size=config["image_size"])
    setup = Setup(source, target, data.num_classes, source_layers, target_layers,
                  data.example_input(), data.num_source_classes)
    options_of_method = {option.name: config[option.name]
                         for option in methods.spec(method).options}
    return methods.build_method(method, setup, **options_of_method).model.eval()


def _same_architecture(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        state_a[k].shape == state_b[k].shape for k in state_a)


def _spearman(a, b):
    """Spearman correlation of two matrices over the entries both have (None if undefined)."""
    from scipy import stats

    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)
             if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return None
    value = stats.spearmanr(*zip(*pairs)).statistic
    return None if not math.isfinite(value) else float(value)


def _mean_matrix(matrices):
    return (sum(matrices) / len(matrices)).tolist()


class _Analysis:
    """One analysis: the data, the device and the settings the measurements share."""

    def __init__(self, config, settings, device, output_dir, show):
        self.config, self.settings, self.device = config, settings, device
        self.output_dir, self.show = output_dir, show
        self.data = load_job_data(config)
        if not isinstance(self.data, TransferData):  # streamed from disk: make tensors
            self.data = self.data.in_memory()
        test = self.data.to(device)
        self.test = (test.test_images, test.test_labels)
        count = settings["analysis_images"]
        self.probe = (test.test_images[:count], test.test_labels[:count])
        self.skipped = {}

    def wants(self, name):
        return name in self.settings["analyses"]

    def cka_loader(self):
        images, size = self.probe[0], self.settings["cka_batch_size"]
        batches = [images[i:i + size] for i in range(0, len(images), size)]
        if len(batches) > 1 and len(batches[-1]) < 4:  # too few for the unbiased HSIC
            batches.pop()
        return batches

    def cka(self, a, b, layers_a, layers_b):
        return analysis.cka_over_loader(a, b, self.cka_loader(), layers_a, layers_b,
                                        debiased=True, progress=self.show)

    # ---- a transfer job -----------------------------------------------------------------

    def of_job(self, folder, job):
        self.folder = os.path.realpath(folder)
        self.source = runs_module.load_source(folder).to(self.device)
        example = self.data.example_input().to(self.device)
        self.source_layers = self.config["source_layers"] or suggest_layers(self.source, example)
        target = build_model(self.config["target_model"], self.data.num_classes,
                             image_size=self.config["image_size"])
        self.target_layers = (self.config["target_layers"]
                              or suggest_layers(target, example.cpu()))
        finished = [(r["method"], r["seed"]) for r in job["runs"] if r["status"] == "finished"]
        self.networks = {}
        for method, seed in finished:
            try:
                network = runs_module.load_model(folder, method, seed)
            except ValueError:
                continue  # a run that kept no network (not one architecture)
            self.networks.setdefault(method, {})[seed] = network.to(self.device)
        results = {"job": self.folder, "config": self.config, "settings": self.settings,
                   "layers": {"source": self.source_layers, "target": self.target_layers},
                   "networks": {m: sorted(s) for m, s in self.networks.items()}}
        where = job.get("method_outputs", {}).get("l2t-ww", {}).get("where_weights")
        steps = [("cka", lambda: self.job_cka(where)), ("distance", self.job_distances),
                 ("interpolation", self.job_interpolation),
                 ("criticality", self.job_criticality),
                 ("block_shuffle", self.block_shuffle), ("mistakes", self.job_mistakes),
                 ("domain", self.domain)]
        timings = {}
        for name, step in steps:
            if self.wants(name):
                started = time.perf_counter()
                value = step()
                timings[name] = time.perf_counter() - started
                if value is not None:
                    results[name] = value
        results["skipped"], results["analysis_seconds"] = self.skipped, timings
        return results

    def _layers_of(self, method):
        """Fine-tuning trains the source network, so its layers are the source's."""
        return self.source_layers if method == "finetune" else self.target_layers

    def _need(self, analysis_name, *requirements):
        """Whether each (method, count) requirement holds; else record why not."""
        for method, count in requirements:
            have = len(self.networks.get(method, {}))
            if have < count:
                self.skipped[analysis_name] = (f"needs {count} finished {method} run(s) with "
                                               f"a kept network, the job has {have}")
                return False
        return True

    def job_cka(self, where):
        matrices = {}
        for method, by_seed in self.networks.items():
            layers = self._layers_of(method)
            try:
                matrices[method] = _mean_matrix([
                    self.cka(self.source, network, self.source_layers, layers)
                    for network in by_seed.values()])
            except ValueError as error:
                self.skipped[f"cka of {method}"] = str(error)
        if not matrices:
            self.skipped["cka"] = "no trained network in the job"
            return None
        where_matrix = where["matrix"] if where else None
        correlation = {}
        if where_matrix is not None:
            correlation = {method: _spearman(where_matrix, matrix)
                           for method, matrix in matrices.items() if method != "finetune"}
        return {"estimator": "debiased minibatch CKA", "images": len(self.probe[0]),
                "rows": self.source_layers, "columns": self.target_layers,
                "source_vs": matrices, "where_weights": where_matrix,
                "spearman_with_where_weights": correlation}

    def _initial(self, method, seed):
        return initial_network(self.config, self.data.to(self.device), self.source, method,
                               seed, self.source_layers, self.target_layers).to(self.device)

    def job_distances(self):
        groups = {}
        for method in ("finetune", "scratch"):
            by_seed = self.networks.get(method, {})
            groups[f"{method}-{method}"] = [
                {"a": f"{method}/{i}", "b": f"{method}/{j}",
                 **analysis.parameter_distance(by_seed[i], by_seed[j])}
                for i, j in itertools.combinations(sorted(by_seed), 2)]
            groups[f"{method}-initial"] = [
                {"a": f"{method}/{seed}", "b": "initial",
                 **analysis.parameter_distance(network, self._initial(method, seed))}
                for seed, network in sorted(by_seed.items())]
        finetuned, scratch = self.networks.get("finetune", {}), self.networks.get("scratch", {})
        cross = [(i, j) for i in sorted(finetuned) for j in sorted(scratch)]
        if cross and _same_architecture(finetuned[cross[0][0]], scratch[cross[0][1]]):
            groups["finetune-scratch"] = [
                {"a": f"finetune/{i}", "b": f"scratch/{j}",
                 **analysis.parameter_distance(finetuned[i], scratch[j])} for i, j in cross]
        groups = {name: rows for name, rows in groups.items() if rows}
        if not groups:
            self.skipped["distance"] = "no finetune or scratch network in the job"
            return None
        return {"groups": groups,
                "mean_total": {name: sum(r["total"] for r in rows) / len(rows)
                               for name, rows in groups.items()}}

    def _line_pairs(self):
        finetuned, scratch = self.networks.get("finetune", {}), self.networks.get("scratch", {})
        pairs = {}
        if len(finetuned) >= 2:
            i, j = sorted(finetuned)[:2]
            pairs["finetune-finetune"] = (f"finetune/{i}", finetuned[i], f"finetune/{j}",
                                          finetuned[j])
        if len(scratch) >= 2:
            i, j = sorted(scratch)[:2]
            pairs["scratch-scratch"] = (f"scratch/{i}", scratch[i], f"scratch/{j}", scratch[j])
        if finetuned and scratch:
            i, j = min(finetuned), min(scratch)
            if _same_architecture(finetuned[i], scratch[j]):
                pairs["finetune-scratch"] = (f"finetune/{i}", finetuned[i], f"scratch/{j}",
                                             scratch[j])
        return pairs

    def job_interpolation(self):
        curves = {}
        for name, (name_a, a, name_b, b) in self._line_pairs().items():
            curves[name] = {"a": name_a, "b": name_b, **analysis.interpolation(
                a, b, self.test, self.settings["interpolation_points"], progress=self.show)}
        if not curves:
            self.skipped["interpolation"] = "needs two finetune or two scratch networks"
            return None
        return {"data": "target test split", "curves": curves}

    def job_criticality(self):
        results = {}
        for method in ("finetune", "scratch"):
            by_seed = self.networks.get(method, {})
            if not by_seed:
                continue
            seed = min(by_seed)
            results[method] = {"network": f"{method}/{seed}", **analysis.module_criticality(
                by_seed[seed], self._initial(method, seed), self.probe,
                alphas=self.settings["criticality_alphas"],
                sigmas=self.settings["criticality_sigmas"],
                epsilon=self.settings["criticality_epsilon"], progress=self.show)}
        if not results:
            self.skipped["criticality"] = "no finetune or scratch network in the job"
            return None
        return results

    def block_sizes(self):
        size = self.config["image_size"]
        sizes = self.settings["block_sizes"]
        if sizes is None:
            sizes = [b for b in (2 ** k for k in range(size.bit_length(), -1, -1))
                     if size % b == 0]
        for block in sizes:
            if size % block:
                raise ValueError(f"block_sizes: {block} does not divide the image size {size}")
        return sorted(sizes, reverse=True)

    def block_shuffle(self):
        """Fine-tuning and scratch trained and tested on block-shuffled target images (the
        source stays as pretrained on whole images), with the job's training settings."""
        from tqdm.auto import tqdm

        from l2t_fast.jobs.transfer import _Job

        seeds, sizes = self.config["seeds"], self.block_sizes()
        method_names = ("finetune", "scratch")
        accuracy = {m: [] for m in method_names}
        total = len(sizes) * len(seeds) * len(method_names) * self.config["epochs"]
        with tqdm(total=total, desc="block shuffle", unit="epoch", disable=not self.show) as bar:
            for block in sizes:
                scores = {m: [] for m in method_names}
                for seed in seeds:
                    data = self.data.to("cpu")
                    data.pool_images = analysis.block_shuffle(data.pool_images, block, seed)
                    data.test_images = analysis.block_shuffle(data.test_images, block, seed)
                    folder = os.path.join(self.output_dir, "block_shuffle",
                                          f"block{block}-seed{seed}")
                    job = _Job(self.config, data, self.device, self.source, folder,
                               os.path.join(folder, "checkpoints"), None)
                    for method in method_names:
                        result = job.run(method, seed, bar)
                        if result["status"] == "finished":
                            scores[method].append(result["test_accuracy"])
                for method in method_names:
                    values = scores[method]
                    accuracy[method].append(sum(values) / len(values) if values else None)
        gain = [None if f is None or s is None else f - s
                for f, s in zip(accuracy["finetune"], accuracy["scratch"])]
        return {"block_sizes": sizes, "seeds": seeds, "accuracy": accuracy,
                "gain": gain}

    def job_mistakes(self):
        named = {f"{method}/{seed}": network for method, by_seed in self.networks.items()
                 for seed, network in sorted(by_seed.items())}
        if len(named) < 2:
            self.skipped["mistakes"] = "needs at least two trained networks"
            return None
        return analysis.mistake_overlap(named, self.test)

    @torch.no_grad()
    def domain(self):
        """Source-task images against target test images: on pixels, and on the source
        network's features at each of its layers (channel means)."""
        from l2t_fast.models.hooks import FeatureHooks

        if not self.data.has_source_task:
            self.skipped["domain"] = "the data has no source task"
            return None
        count = self.settings["analysis_images"]
        source_images = self.data.source_images[:count].to(self.device)
        target_images = self.probe[0]
        self.source.eval()
        with FeatureHooks(self.source, self.source_layers) as hooks:
            features = [hooks.run(self.source, images, stop_early=True)[1]
                        for images in (source_images, target_images)]
        names = ["pixels"] + list(self.source_layers)
        pairs = [(source_images, target_images)] + [
            (s.mean((2, 3)) if s.dim() == 4 else s, t.mean((2, 3)) if t.dim() == 4 else t)
            for s, t in zip(*features)]
        distances = [analysis.domain_distance(s, t) for s, t in pairs]
        return {"features": names, "distance": [d["distance"] for d in distances],
                "error": [d["error"] for d in distances]}

    # ---- two networks ---------------------------------------------------------------------

    def of_models(self):
        specs = self.settings["models"]
        networks = [load_network(spec, self.data.num_classes, index,
                                 self.config["image_size"]).to(self.device)
                    for index, spec in enumerate(specs)]
        example = self.data.example_input().to(self.device)
        layers = [self.config["source_layers"] or suggest_layers(networks[0], example),
                  self.config["target_layers"] or suggest_layers(networks[1], example)]
        results = {"models": specs, "config": self.config, "settings": self.settings,
                   "layers": {"a": layers[0], "b": layers[1]}}
        if self.wants("cka"):
            results["cka"] = {"estimator": "debiased minibatch CKA",
                              "images": len(self.probe[0]), "rows": layers[0],
                              "columns": layers[1],
                              "matrix": self.cka(*networks, *layers).tolist()}
        outputs = [network(example).shape[1] for network in networks]
        classify = all(o == self.data.num_classes for o in outputs)
        same = _same_architecture(*networks)
        if self.wants("distance"):
            if same:
                results["distance"] = analysis.parameter_distance(*networks)
            else:
                self.skipped["distance"] = "the two networks are not one architecture"
        if self.wants("interpolation"):
            if same and classify:
                results["interpolation"] = {"data": "target test split", "curves": {
                    "a-b": {"a": specs[0], "b": specs[1], **analysis.interpolation(
                        *networks, self.test, self.settings["interpolation_points"],
                        progress=self.show)}}}
            else:
                self.skipped["interpolation"] = ("needs two networks of one architecture "
                                                 f"with {self.data.num_classes} outputs")
        if self.wants("mistakes"):
            if classify:
                results["mistakes"] = analysis.mistake_overlap(dict(zip(specs, networks)),
                                                               self.test)
            else:
                self.skipped["mistakes"] = (f"needs networks with {self.data.num_classes} "
                                            f"outputs (the data's classes), got {outputs}")
        for name in ("criticality", "block_shuffle", "domain"):
            if self.wants(name):
                self.skipped[name] = ("needs a transfer job (initial weights, the source and "
                                      "its training): give results, or no models")
        results["skipped"] = self.skipped
        return results


def load_network(spec, num_classes, index=0, image_size=None):
    """A network from ``spec``: a model name (random weights, seeded by ``index``), a trained
    network file of a job (``models/*.pt``, built for the image size it records), or
    ``NAME=FILE`` (a state_dict of ``NAME``); built for ``image_size`` (what timm's
    fixed-grid models, ViT and Swin, need)."""
    from l2t_fast.jobs.source import load_source

    if "=" in spec:
        name, path = spec.split("=", 1)
        return load_source({"source_checkpoint": path, "source_model": name,
                            "image_size": image_size}, "cpu")[0]
    if os.path.isfile(spec):
        saved = checkpoint.load(spec, "network file")
        if not (isinstance(saved, dict) and "architecture" in saved and "state_dict" in saved):
            raise ValueError(f"{spec!r} is not a trained network of a job (no architecture in "
                             f"it); for a plain state_dict give NAME={spec}")
        network = build_model(saved["architecture"], saved["num_classes"],
                              image_size=saved.get("image_size", image_size))
        network.load_state_dict(saved["state_dict"])
        return network.eval()
    if os.sep in spec or spec.endswith(".pt"):
        raise ValueError(f"models: {spec!r} is not a file")
    checkpoint.seed_everything(index)
    return build_model(spec, num_classes, image_size=image_size).eval()


# ---- the figure -----------------------------------------------------------------------------

def _heatmap(axis, figure, matrix, rows, columns, title, vmin=None, vmax=None, fmt="{:.2f}"):
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], float)
    image = axis.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax)
    axis.set_xticks(range(len(columns)), columns, rotation=30, fontsize=8)
    axis.set_yticks(range(len(rows)), rows, fontsize=8)
    axis.set_title(title, fontsize=9)
    if values.size <= 64:
        for (m, n), value in np.ndenumerate(values):
            if not np.isnan(value):
                axis.text(n, m, fmt.format(value), ha="center", va="center", color="w",
                          fontsize=7)
    figure.colorbar(image, ax=axis, fraction=0.046)


def _panels(results):
    """``[draw(axis, figure)]``: a panel for everything the results hold, in reading order."""
    panels = []
    cka = results.get("cka")
    if cka and "source_vs" in cka:
        correlation = cka.get("spearman_with_where_weights", {})
        for method in ("scratch", "l2t-ww", "finetune"):
            if method in cka["source_vs"]:
                rho = correlation.get(method)
                title = f"CKA(source, {method} target)" + (
                    f"\nSpearman vs where-weights {rho:+.2f}" if rho is not None else "")
                columns = cka["rows"] if method == "finetune" else cka["columns"]
                panels.append((lambda a, f, m=method, t=title, c=columns: _heatmap(
                    a, f, cka["source_vs"][m], cka["rows"], c, t, 0, 1)))
        if cka["where_weights"] is not None:
            panels.append(lambda a, f: _heatmap(a, f, cka["where_weights"], cka["rows"],
                                                cka["columns"],
                                                "L2T-ww: mean learned where-weight"))
    elif cka:
        panels.append(lambda a, f: _heatmap(a, f, cka["matrix"], cka["rows"], cka["columns"],
                                            "CKA(a, b)", 0, 1))
    distance = results.get("distance")
    if distance and "groups" in distance:
        def draw_distance(axis, figure):
            names = list(distance["mean_total"])
            axis.bar(range(len(names)), [distance["mean_total"][n] for n in names],
                     color="tab:blue")
            axis.set_xticks(range(len(names)), names, rotation=30, fontsize=8, ha="right")
            axis.set_ylabel("parameter l2 distance")
            axis.set_title("distance between networks (mean)", fontsize=9)
        panels.append(draw_distance)
    interpolation = results.get("interpolation")
    if interpolation:
        for key, label in (("loss", "test loss"), ("accuracy", "test accuracy")):
            def draw_line(axis, figure, key=key, label=label):
                for name, curve in interpolation["curves"].items():
                    barrier = curve["loss_barrier" if key == "loss" else "error_barrier"]
                    axis.plot(curve["t"], curve[key], marker=".",
                              label=f"{name} (barrier {barrier:.2f})")
                axis.set_xlabel("t: (1 - t) a + t b")
                axis.set_ylabel(label)
                axis.set_title(f"interpolation: {label}", fontsize=9)
                axis.legend(fontsize=7)
            panels.append(draw_line)
    shuffle = results.get("block_shuffle")
    if shuffle:
        def draw_shuffle(axis, figure):
            sizes = shuffle["block_sizes"]
            for method, values in shuffle["accuracy"].items():
                axis.plot(range(len(sizes)), [None if v is None else 100 * v for v in values],
                          marker="o", label=method)
            axis.set_xticks(range(len(sizes)), sizes)
            axis.set_xlabel("block size (px; left: whole images)")
            axis.set_ylabel("target test accuracy (%)")
            gains = ", ".join("-" if g is None else f"{100 * g:+.1f}" for g in shuffle["gain"])
            axis.set_title(f"block shuffle: finetune gain {gains}", fontsize=9)
            axis.legend(fontsize=7)
        panels.append(draw_shuffle)
    mistakes = results.get("mistakes")
    if mistakes:
        panels.append(lambda a, f: _heatmap(
            a, f, mistakes["overlap"], mistakes["models"], mistakes["models"],
            "common mistakes: both wrong / either wrong", 0, 1))
    domain = results.get("domain")
    if domain:
        def draw_domain(axis, figure):
            axis.bar(range(len(domain["features"])), domain["distance"], color="tab:green")
            axis.set_xticks(range(len(domain["features"])), domain["features"], fontsize=8)
            axis.set_ylim(min(0, *domain["distance"]), 2)
            axis.set_ylabel("proxy A-distance")
            axis.set_title("source vs target images, in the source's features", fontsize=9)
        panels.append(draw_domain)
    for method, result in (results.get("criticality") or {}).items():
        for module, cell in result["modules"].items():
            value = cell["criticality"]
            title = (f"{method} {module}: criticality "
                     + ("none" if value is None else f"{value:.3g}"))
            panels.append(lambda a, f, c=cell, t=title, r=result: _criticality(a, f, c, r, t))
    return panels


def _criticality(axis, figure, cell, result, title):
    _heatmap(axis, figure, cell["error"], [f"{s:g}" for s in result["sigmas"]],
             [f"{a:g}" for a in result["alphas"]], title, 0, 1)
    axis.set_xlabel("alpha (0: initial weights)", fontsize=8)
    axis.set_ylabel("sigma (relative)", fontsize=8)


def plot(results, path):
    """``analysis.png``: every panel the results hold, five to a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(results)
    columns = 5
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows),
                                squeeze=False)
    for axis, draw in zip(axes.flat, panels):
        draw(axis, figure)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    where = results.get("job") or " vs ".join(results.get("models", []))
    figure.suptitle(f"What was transferred? {where}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---- the command line ---------------------------------------------------------------------

def add_arguments(parser):
    """``l2t-fast analyze``: the analysis options, the transfer job's, and where it goes."""
    parser.description = ("Measure what was transferred: CKA next to L2T-ww's where-weights, "
                          "parameter distances, interpolation barriers, module criticality, "
                          "block shuffling, common mistakes, domain distance. With no options: "
                          "runs a small transfer job on the embedded digits (scratch, "
                          "finetune, l2t-ww; seeds 0 1) and analyses it, in a few minutes on "
                          "2 CPU cores.")
    options.add_arguments(parser, options.analyze_table())
    parser.add_argument("--output-dir", default=os.path.join("runs", "analyze"),
                        help="where analysis folders go (default: runs/analyze)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _summary_lines(results):
    lines = []
    cka = results.get("cka")
    if cka and cka.get("spearman_with_where_weights"):
        for method, rho in cka["spearman_with_where_weights"].items():
            if rho is not None:
                lines.append(f"where-weights vs CKA(source, {method}): Spearman {rho:+.2f}")
    distance = results.get("distance")
    if distance and "mean_total" in distance:
        lines.append("mean parameter distance: " + ", ".join(
            f"{name} {value:.2f}" for name, value in distance["mean_total"].items()))
    for name, curve in (results.get("interpolation") or {}).get("curves", {}).items():
        lines.append(f"interpolation {name}: loss barrier {curve['loss_barrier']:.3f}, error "
                     f"barrier {100 * curve['error_barrier']:.1f} points")
    for method, result in (results.get("criticality") or {}).items():
        lines.append(f"criticality of {method}: " + ", ".join(
            f"{module} " + ("none" if cell["criticality"] is None
                            else format(cell["criticality"], ".3g"))
            for module, cell in result["modules"].items()))
    shuffle = results.get("block_shuffle")
    if shuffle:
        lines.append("block shuffle, finetune - scratch (points): " + ", ".join(
            f"{b}px {'-' if g is None else format(100 * g, '+.1f')}"
            for b, g in zip(shuffle["block_sizes"], shuffle["gain"])))
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"skipped {name}: {reason}")
    return lines


def main(args):
    """Run ``l2t-fast analyze`` into a fresh folder and print what it found."""
    rows = options.analyze_table()
    config = options.from_arguments(args, rows)
    resolve_settings(config)  # a bad option fails before any folder is made
    folder = runs_module.new_run_folder(args.output_dir)
    print(f"analysis folder: {folder}", flush=True)
    results = run_analysis(config, output_dir=folder, progress=not args.quiet)
    for line in _summary_lines(results):
        print(line)
    print(f"total {results['seconds']:.1f} s; results in {folder}/analysis.json and "
          f"analysis.png")
    return 0

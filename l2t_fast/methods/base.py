"""What every method shares: the batch it trains on, the setup it is built from, the
``Method`` interface, evaluation, and the option rows that several methods take.

A ``Method`` owns the network it trains (``.model``, the one evaluated on the target test
split), takes one SGD iteration with ``train_step(batch)``, and saves/restores all of its
training state with ``state_dict()``/``load_state_dict()`` (tensors, dicts and numbers only,
so checkpoints load with ``torch.load(..., weights_only=True)``). ``outputs(probe)`` gives
what a method learned besides its network (L2T-ww's where-weights); ``combine_outputs``
averages those over a job's runs for results.json and the figure.
"""
import copy
import itertools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2t_fast.jobs.options import Choice, Float, ListOf, Option, Pair
from l2t_fast.models.hooks import FeatureHooks

SGD_OPTIONS = (
    Option("lr", 0.1, Float(0, above=True), "SGD learning rate (cosine-annealed over the "
           "epochs)"),
    Option("momentum", 0.9, Float(0, 1, below=True), "SGD momentum"),
    Option("weight_decay", 1e-4, Float(0), "SGD weight decay"),
)
PAIRS = Option("pairs", "all", ListOf(Pair(), everything="all"),
               "'all', or pairs SOURCE:TARGET of layer indices, e.g. 0:0 1:1 2:2")
BETA = Option("beta", 0.5, Float(0, above=True), "weight of the feature-matching loss")
BACKEND = Option("backend", "auto", Choice("auto", "reference", "cpu", "cuda", "triton"),
                 "feature-matching backend")


class Diverged(FloatingPointError):
    """A training step made a loss, a gradient or a parameter non-finite; the message says
    which. The job marks the run ``diverged`` and goes on with the others."""


@dataclass
class Batch:
    """One training iteration's data. ``x``, ``y``: labelled target images; the rest only
    for methods that ask for them (``register(needs=...)``)."""
    x: Tensor
    y: Tensor
    unlabelled: Optional[Tensor] = None  # target images without labels
    source_x: Optional[Tensor] = None    # labelled images of the source task
    source_y: Optional[Tensor] = None


@dataclass
class Setup:
    """What a method is built from.

    ``source_model``: the pretrained source network (``build_method`` hands each method its
    own frozen copy, so that methods never share hooks or state); ``target_model``: a freshly
    initialised target network, trained in place by the methods that train one;
    ``example_input``: a batch shaped like the data, which tells feature channel counts.
    """
    source_model: nn.Module
    target_model: nn.Module
    num_classes: int
    source_layers: list
    target_layers: list
    example_input: Tensor
    num_source_classes: Optional[int] = None

    def frozen_source(self):
        source = copy.deepcopy(self.source_model).eval().requires_grad_(False)
        return replace(self, source_model=source)


def resolve_pairs(pairs, num_source, num_target):
    """``"all"`` -> every (source layer, target layer) index pair; a list is checked."""
    if pairs == "all":
        return list(itertools.product(range(num_source), range(num_target)))
    if isinstance(pairs, str):
        raise ValueError(f"pairs must be 'all' or a list of (source, target) index pairs, "
                         f"got {pairs!r}")
    resolved = [tuple(pair) for pair in pairs]
    if not resolved:
        raise ValueError("pairs is empty: at least one (source, target) pair is needed")
    for i, pair in enumerate(resolved):
        if len(pair) != 2 or not (0 <= pair[0] < num_source and 0 <= pair[1] < num_target):
            raise ValueError(f"pairs[{i}] = {pair} is out of range for {num_source} source "
                             f"and {num_target} target layers")
    return resolved


class Method:
    """Plain supervised training of ``model`` with SGD; subclasses add a transfer loss."""

    name = None  # set by ``register``

    def __init__(self, model, lr, momentum, weight_decay, extra_parameters=()):
        self.model = model
        parameters = [p for p in model.parameters() if p.requires_grad] + list(extra_parameters)
        self.optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)

    def train_step(self, batch):
        """One SGD iteration on ``batch``; returns its losses as floats (``loss``, ``ce``...)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.losses(batch)
        total = sum(losses.values())
        total.backward()
        self.optimizer.step()
        return {"loss": total.item(), **{name: value.item() for name, value in losses.items()}}

    def losses(self, batch):
        return {"ce": F.cross_entropy(self.model(batch.x), batch.y)}

    def set_progress(self, progress):
        """Called by the job before every ``train_step`` with the fraction of training done,
        in [0, 1), for methods whose loss follows a schedule (DANN's reversal coefficient);
        a function of epoch and step alone, so that a resumed run sees the same values."""

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def outputs(self, probe):
        """What the run learned besides its network, measured on ``probe`` (target test
        images): a JSON-serialisable dict, stored with the run's result."""
        return {}

    @classmethod
    def combine_outputs(cls, outputs, source_layers, target_layers):
        """The runs' ``outputs`` (a list, one per seed) summarised for the whole job:
        ``{name: figure panel}``, each panel a dict with ``kind`` ("heatmap": ``rows``,
        ``columns``, ``matrix`` with None for no value, ``title``), drawn by the report."""
        return {}


class SourceGuided(Method):
    """A target network trained with CE plus a loss on (source, target) feature pairs."""

    def __init__(self, setup, pairs, extra_parameters=(), **sgd):
        self.source_model = setup.source_model
        self.source_hooks = FeatureHooks(setup.source_model, setup.source_layers)
        self.target_hooks = FeatureHooks(setup.target_model, setup.target_layers)
        self.pairs = resolve_pairs(pairs, len(setup.source_layers), len(setup.target_layers))
        super().__init__(setup.target_model, extra_parameters=extra_parameters, **sgd)

    def features(self, x):
        with torch.no_grad():
            _, source_feats = self.source_hooks.run(self.source_model, x, stop_early=True)
        logits, target_feats = self.target_hooks(x)
        return logits, source_feats, target_feats


@torch.no_grad()
def evaluate(model, images, labels=None, batch_size=256):
    """Top-1 accuracy of ``model`` (eval mode; its modes are restored afterwards) on
    ``images`` and ``labels`` (tensors), or on ``images`` alone as an iterable of
    ``(x, y)`` batches (a data loader)."""
    if labels is not None:
        batches = ((images[i:i + batch_size], labels[i:i + batch_size])
                   for i in range(0, len(images), batch_size))
    else:
        batches = images
    flags = [m.training for m in model.modules()]
    model.eval()
    correct = total = 0
    try:
        for x, y in batches:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    finally:
        for module, flag in zip(model.modules(), flags):
            module.training = flag
    return correct / total

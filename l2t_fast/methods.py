"""Every transfer method behind one interface, so that all are trained and evaluated alike.

A ``Method`` owns the network it trains (``.model``, the one evaluated on the target test
split), takes one SGD iteration with ``train_step(x, y)``, and saves/restores all of its
training state with ``state_dict()``/``load_state_dict()`` (tensors, dicts and numbers only,
so checkpoints load with ``torch.load(..., weights_only=True)``).

Which network each method trains:
- ``scratch``, ``at``, ``fm``, ``l2t-w``, ``l2t-ww``: the target network, freshly initialised,
  with the source network (frozen) guiding it through its features.
- ``finetune``, ``lwf``: a copy of the source network with a new head; fine-tuning *is*
  training the source network on the target task, whatever the target architecture.
"""
import copy
import itertools

import torch
import torch.nn.functional as F

from l2t_fast.features import FeatureHooks
from l2t_fast.models import get_module, head_name, replace_head, stage_names

METHODS = ("scratch", "finetune", "lwf", "at", "fm", "l2t-w", "l2t-ww")


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

    def __init__(self, model, lr, momentum, weight_decay, extra_parameters=()):
        self.model = model
        parameters = [p for p in model.parameters() if p.requires_grad] + list(extra_parameters)
        self.optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)

    def train_step(self, x, y):
        """One SGD iteration on the batch; returns its losses as floats (``loss``, ``ce``...)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.losses(x, y)
        total = sum(losses.values())
        total.backward()
        self.optimizer.step()
        return {"loss": total.item(), **{name: value.item() for name, value in losses.items()}}

    def losses(self, x, y):
        return {"ce": F.cross_entropy(self.model(x), y)}

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class FineTune(Method):
    """The source network with a new head; its first ``freeze_stages`` stages (see
    ``models.stage_names``) keep their source weights and BatchNorm statistics."""

    def __init__(self, source_model, num_classes, freeze_stages, **sgd):
        model = replace_head(copy.deepcopy(source_model), num_classes).requires_grad_(True)
        stages = stage_names(model)
        if not 0 <= freeze_stages <= len(stages):
            raise ValueError(f"freeze_stages must be in [0, {len(stages)}] for this model "
                             f"(stages {stages}), got {freeze_stages}")
        self.frozen = [get_module(model, name) for name in stages[:freeze_stages]]
        for stage in self.frozen:
            stage.requires_grad_(False)
        super().__init__(model, **sgd)

    def losses(self, x, y):
        for stage in self.frozen:
            stage.eval()
        return super().losses(x, y)


class LearningWithoutForgetting(Method):
    """LwF: the fine-tuned network keeps a trainable copy of the source head, whose outputs
    on the target images are pulled towards the frozen source's, softened by
    ``temperature`` (KL divergence, weight 1 as in the LwF paper), next to CE on the new head."""

    def __init__(self, source_model, num_classes, temperature, **sgd):
        if temperature <= 0:
            raise ValueError(f"lwf temperature must be > 0, got {temperature}")
        self.source_model = source_model
        self.temperature = temperature
        model = copy.deepcopy(source_model).requires_grad_(True)
        self.old_head = copy.deepcopy(get_module(model, head_name(model)))
        replace_head(model, num_classes)
        self._penultimate = None
        get_module(model, head_name(model)).register_forward_pre_hook(
            lambda module, inputs: setattr(self, "_penultimate", inputs[0]))
        super().__init__(model, extra_parameters=self.old_head.parameters(), **sgd)

    def losses(self, x, y):
        logits = self.model(x)
        old_logits = self.old_head(self._penultimate)
        with torch.no_grad():
            source_logits = self.source_model(x)
        t = self.temperature
        distill = F.kl_div(F.log_softmax(old_logits / t, dim=1),
                           F.log_softmax(source_logits / t, dim=1),
                           log_target=True, reduction="batchmean")
        return {"ce": F.cross_entropy(logits, y), "distill": distill}

    def state_dict(self):
        return {**super().state_dict(), "old_head": self.old_head.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.old_head.load_state_dict(state["old_head"])


class _SourceGuided(Method):
    """A target network trained with CE plus a loss on (source, target) feature pairs."""

    def __init__(self, source_model, target_model, source_layers, target_layers, pairs,
                 extra_parameters=(), **sgd):
        self.source_model = source_model
        self.source_hooks = FeatureHooks(source_model, source_layers)
        self.target_hooks = FeatureHooks(target_model, target_layers)
        self.pairs = resolve_pairs(pairs, len(source_layers), len(target_layers))
        super().__init__(target_model, extra_parameters=extra_parameters, **sgd)

    def features(self, x):
        with torch.no_grad():
            _, source_feats = self.source_hooks.run(self.source_model, x, stop_early=True)
        logits, target_feats = self.target_hooks(x)
        return logits, source_feats, target_feats


def attention_map(features, size=None):
    """Zagoruyko & Komodakis' spatial attention: ``normalize(mean_c F^2)``, flattened to
    ``[B, H*W]``; resized bilinearly to ``size`` first when it differs."""
    energy = features.pow(2).mean(dim=1, keepdim=True)
    if size is not None and tuple(energy.shape[-2:]) != tuple(size):
        energy = F.interpolate(energy, size=tuple(size), mode="bilinear", align_corners=False)
    return F.normalize(energy.flatten(1), dim=1)


class AttentionTransfer(_SourceGuided):
    """AT: ``at_beta / 2 * mean((a_s - a_t)^2)`` summed over pairs (the paper's beta = 1000);
    the source map is resized to the target's spatial size where they differ."""

    def __init__(self, *args, at_beta, **kwargs):
        super().__init__(*args, **kwargs)
        self.at_beta = at_beta

    def losses(self, x, y):
        logits, source_feats, target_feats = self.features(x)
        attention = sum(
            (attention_map(source_feats[m], target_feats[n].shape[-2:])
             - attention_map(target_feats[n])).pow(2).mean()
            for m, n in self.pairs)
        return {"ce": F.cross_entropy(logits, y), "attention": self.at_beta / 2 * attention}


class FeatureMatching(_SourceGuided):
    """FM: the weighted feature-matching loss with no channel or pair weights; its 1x1
    regressors train with the target network."""

    def __init__(self, source_model, target_model, source_layers, target_layers, pairs,
                 beta, backend, example_input, **sgd):
        from l2t_fast.loss import WeightedFeatureMatching

        with FeatureHooks(source_model, source_layers) as hooks, torch.no_grad():
            source_channels = [f.shape[1] for f in hooks.run(source_model.eval(), example_input)[1]]
        with FeatureHooks(target_model, target_layers) as hooks, torch.no_grad():
            target_channels = [f.shape[1] for f in hooks.run(target_model.eval(), example_input)[1]]
        pairs = resolve_pairs(pairs, len(source_layers), len(target_layers))
        first = next(target_model.parameters())
        self.matching = WeightedFeatureMatching(source_channels, target_channels, pairs, beta,
                                                backend=backend).to(first.device, first.dtype)
        super().__init__(source_model, target_model, source_layers, target_layers, pairs,
                         extra_parameters=self.matching.parameters(), **sgd)

    def losses(self, x, y):
        logits, source_feats, target_feats = self.features(x)
        return {"ce": F.cross_entropy(logits, y),
                "matching": self.matching(source_feats, target_feats)}

    def state_dict(self):
        return {**super().state_dict(), "matching": self.matching.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.matching.load_state_dict(state["matching"])


class LearnedTransfer(Method):
    """L2T-ww (``learn_where=True``) and L2T-w (``False``): the bilevel engine of
    ``l2t_fast.engine.L2TWW`` behind the common interface."""

    def __init__(self, source_model, target_model, source_layers, target_layers, **options):
        from l2t_fast.engine import L2TWW

        self.engine = L2TWW(source_model, target_model, source_layers, target_layers,
                            **options)
        self.model = self.engine.target_model
        self.optimizer = self.engine.optimizer

    def train_step(self, x, y):
        return {name: float(value) for name, value in self.engine.step(x, y).items()}

    def state_dict(self):
        return self.engine.state_dict()

    def load_state_dict(self, state):
        self.engine.load_state_dict(state)

    def pair_weights(self, x):
        """Mean learned Where weight of each of ``self.engine.pairs`` on ``x``."""
        return self.engine.pair_weights(x)


def build_method(name, *, source_model, target_model, num_classes, source_layers,
                 target_layers, example_input, pairs="all", lr=0.1, momentum=0.9,
                 weight_decay=5e-4, beta=0.5, inner_steps=2, meta_lr=1e-4,
                 meta_weight_decay=1e-4, freeze_stages=0, lwf_temperature=2.0, at_beta=1000.0,
                 backend="auto"):
    """The method ``name`` (one of ``METHODS``), ready to ``train_step``.

    ``source_model`` is copied (so that methods never share hooks or state) and frozen;
    ``target_model`` is trained in place by the methods that train a target network.
    ``example_input`` (a batch shaped like the data) tells feature channel counts.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    source_model = copy.deepcopy(source_model).eval().requires_grad_(False)
    sgd = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "scratch":
        return Method(target_model, **sgd)
    if name == "finetune":
        return FineTune(source_model, num_classes, freeze_stages, **sgd)
    if name == "lwf":
        return LearningWithoutForgetting(source_model, num_classes, lwf_temperature, **sgd)
    layers = (source_model, target_model, source_layers, target_layers)
    if name == "at":
        return AttentionTransfer(*layers, pairs, at_beta=at_beta, **sgd)
    if name == "fm":
        return FeatureMatching(*layers, pairs, beta, backend, example_input, **sgd)
    if pairs != "all":
        pairs = resolve_pairs(pairs, len(source_layers), len(target_layers))
    return LearnedTransfer(*layers, pairs=pairs, beta=beta, inner_steps=inner_steps,
                           meta_lr=meta_lr, meta_weight_decay=meta_weight_decay,
                           learn_where=name == "l2t-ww", backend=backend,
                           example_input=example_input, **sgd)


@torch.no_grad()
def evaluate(model, images, labels, batch_size=256):
    """Top-1 accuracy of ``model`` (eval mode) on ``images``; the model's mode is restored."""
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        correct = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size])
                      .sum().item() for i in range(0, len(images), batch_size))
    finally:
        for module, flag in zip(model.modules(), flags):
            module.training = flag
    return correct / len(images)

"""Transfer by matching the source network's outputs or features: LwF (outputs), AT
(attention maps) and FM (feature maps through 1x1 regressors, the unweighted form of the
L2T-ww loss)."""
import copy

import torch
import torch.nn.functional as F

from l2t_fast.jobs.options import Float, Option
from l2t_fast.matching.loss import WeightedFeatureMatching
from l2t_fast.methods import register
from l2t_fast.methods.base import BACKEND, BETA, PAIRS, Method, SourceGuided, resolve_pairs
from l2t_fast.models import get_module, head_name, replace_head
from l2t_fast.models.hooks import feature_channels


@register("lwf", order=20, summary="Learning without Forgetting: fine-tuning that keeps the "
          "source head's outputs on the target images",
          options=[Option("lwf_temperature", 2.0, Float(0, above=True),
                          "LwF distillation temperature")])
class LearningWithoutForgetting(Method):
    """LwF: the fine-tuned network keeps a trainable copy of the source head, whose outputs
    on the target images are pulled towards the frozen source's, softened by
    ``temperature`` (KL divergence, weight 1 as in the LwF paper), next to CE on the new head."""

    def __init__(self, setup, lwf_temperature, **sgd):
        self.source_model = setup.source_model
        self.temperature = lwf_temperature
        model = copy.deepcopy(setup.source_model).requires_grad_(True)
        self.old_head = copy.deepcopy(get_module(model, head_name(model)))
        replace_head(model, setup.num_classes)
        self._penultimate = None
        get_module(model, head_name(model)).register_forward_pre_hook(
            lambda module, inputs: setattr(self, "_penultimate", inputs[0]))
        super().__init__(model, extra_parameters=self.old_head.parameters(), **sgd)

    def losses(self, batch):
        logits = self.model(batch.x)
        old_logits = self.old_head(self._penultimate)
        with torch.no_grad():
            source_logits = self.source_model(batch.x)
        t = self.temperature
        distill = F.kl_div(F.log_softmax(old_logits / t, dim=1),
                           F.log_softmax(source_logits / t, dim=1),
                           log_target=True, reduction="batchmean")
        return {"ce": F.cross_entropy(logits, batch.y), "distill": distill}

    def state_dict(self):
        return {**super().state_dict(), "old_head": self.old_head.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.old_head.load_state_dict(state["old_head"])


def attention_map(features, size=None):
    """Zagoruyko & Komodakis' spatial attention: ``normalize(mean_c F^2)``, flattened to
    ``[B, H*W]``; resized bilinearly to ``size`` first when it differs."""
    energy = features.pow(2).mean(dim=1, keepdim=True)
    if size is not None and tuple(energy.shape[-2:]) != tuple(size):
        energy = F.interpolate(energy, size=tuple(size), mode="bilinear", align_corners=False)
    return F.normalize(energy.flatten(1), dim=1)


@register("at", order=30, summary="attention transfer: the target's spatial attention maps "
          "pulled towards the source's",
          options=[PAIRS, Option("at_beta", 1000.0, Float(0, above=True),
                                 "attention-transfer loss weight (the AT paper's 1000)")])
class AttentionTransfer(SourceGuided):
    """AT: ``at_beta / 2 * mean((a_s - a_t)^2)`` summed over pairs; the source map is
    resized to the target's spatial size where they differ."""

    def __init__(self, setup, pairs, at_beta, **sgd):
        super().__init__(setup, pairs, **sgd)
        self.at_beta = at_beta

    def losses(self, batch):
        logits, source_feats, target_feats = self.features(batch.x)
        attention = sum(
            (attention_map(source_feats[m], target_feats[n].shape[-2:])
             - attention_map(target_feats[n])).pow(2).mean()
            for m, n in self.pairs)
        return {"ce": F.cross_entropy(logits, batch.y), "attention": self.at_beta / 2 * attention}


@register("fm", order=40, summary="feature matching: the weighted feature-matching loss with "
          "no channel or pair weights", options=[PAIRS, BETA, BACKEND])
class FeatureMatching(SourceGuided):
    """FM: the weighted feature-matching loss with no channel or pair weights; its 1x1
    regressors train with the target network."""

    def __init__(self, setup, pairs, beta, backend, **sgd):
        source_channels = feature_channels(setup.source_model, setup.source_layers,
                                           setup.example_input)
        target_channels = feature_channels(setup.target_model, setup.target_layers,
                                           setup.example_input)
        first = next(setup.target_model.parameters())
        resolved = resolve_pairs(pairs, len(source_channels), len(target_channels))
        self.matching = WeightedFeatureMatching(source_channels, target_channels, resolved,
                                                beta, backend=backend).to(first.device,
                                                                          first.dtype)
        super().__init__(setup, pairs, extra_parameters=self.matching.parameters(), **sgd)

    def losses(self, batch):
        logits, source_feats, target_feats = self.features(batch.x)
        return {"ce": F.cross_entropy(logits, batch.y),
                "matching": self.matching(source_feats, target_feats)}

    def state_dict(self):
        return {**super().state_dict(), "matching": self.matching.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.matching.load_state_dict(state["matching"])

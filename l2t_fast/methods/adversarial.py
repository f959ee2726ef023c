"""Domain-adversarial training: DANN (Ganin et al. 2015)."""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from l2t_fast.methods import register
from l2t_fast.methods.base import Method
from l2t_fast.models import get_module, head_name


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coefficient):
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coefficient * grad, None


def reverse_gradient(x, coefficient):
    """The identity forward; backward multiplies the gradient by ``-coefficient``."""
    return _GradientReversal.apply(x, float(coefficient))


def reversal_coefficient(progress):
    """Ganin et al.'s schedule ``2 / (1 + exp(-10 p)) - 1``: 0 at the start of training,
    near 1 at its end, so that the domain classifier is learnt before it steers the
    features."""
    if not 0 <= progress <= 1:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return 2 / (1 + math.exp(-10 * progress)) - 1


@register("dann", order=70, summary="DANN: the source network trained on the source and "
          "target labels while a domain classifier behind a gradient reversal layer makes "
          "its features domain-invariant",
          needs=["source_batches", "unlabelled", "shared_labels"])
class DomainAdversarial(Method):
    """The feature extractor and label predictor start as the source network (its head
    already predicts the target's classes). Loss: CE on the source batch, CE on the
    target's labels, and the domain classifier's binary cross-entropy (source 0, target
    1, on the source batch and the unlabelled target images), whose gradient reaches the
    features reversed and scaled by ``reversal_coefficient(progress)``. The domain
    classifier is an MLP (one hidden layer as wide as the features) on the penultimate
    features. All images go through the network as one batch, as in the public
    implementations, so BatchNorm sees both domains."""

    def __init__(self, setup, **sgd):
        if setup.num_source_classes != setup.num_classes:
            raise ValueError(f"dann needs the source task to have the target's classes: the "
                             f"source has {setup.num_source_classes}, the target "
                             f"{setup.num_classes}")
        model = copy.deepcopy(setup.source_model).requires_grad_(True)
        head = get_module(model, head_name(model))
        width = head.in_features
        self.domain_classifier = nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                               nn.Linear(width, 1))
        self.domain_classifier.to(head.weight.device, head.weight.dtype)
        self.coefficient = 0.0
        self._penultimate = None
        head.register_forward_pre_hook(
            lambda module, inputs: setattr(self, "_penultimate", inputs[0]))
        super().__init__(model, extra_parameters=self.domain_classifier.parameters(), **sgd)

    def set_progress(self, progress):
        self.coefficient = reversal_coefficient(progress)

    def losses(self, batch):
        labelled, source = len(batch.x), len(batch.source_x)
        logits = self.model(torch.cat([batch.x, batch.source_x, batch.unlabelled]))
        features = reverse_gradient(self._penultimate[labelled:], self.coefficient)
        domain_logits = self.domain_classifier(features).squeeze(1)
        domain = torch.cat([domain_logits.new_zeros(source),
                            domain_logits.new_ones(len(batch.unlabelled))])
        return {"ce": F.cross_entropy(logits[:labelled], batch.y),
                "source_ce": F.cross_entropy(logits[labelled:labelled + source],
                                             batch.source_y),
                "domain": F.binary_cross_entropy_with_logits(domain_logits, domain)}

    def state_dict(self):
        return {**super().state_dict(), "domain_classifier": self.domain_classifier.state_dict(),
                "coefficient": self.coefficient}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.domain_classifier.load_state_dict(state["domain_classifier"])
        self.coefficient = state["coefficient"]

"""Multi-task learning: one trunk, initialised from the source, trained jointly on the
source task and the target task."""
import copy

import torch
import torch.nn.functional as F

from l2t_fast.jobs.options import Float, Option
from l2t_fast.methods import register
from l2t_fast.methods.base import Method
from l2t_fast.models import get_module, head_name, replace_head


@register("multitask", order=25, summary="one trunk from the source with a source head and a "
          "new target head, trained jointly on source and target batches",
          options=[Option("multitask_lambda", 1.0, Float(0),
                          "multitask: weight of the source task's cross-entropy")],
          needs=["source_batches"])
class MultiTask(Method):
    """``CE_target + multitask_lambda * CE_source``. The model is the source network with
    a new target head (what is evaluated); the source head, a trainable copy of the
    source's, sits on the same penultimate features. Target and source images go through
    the trunk as one batch, so BatchNorm normalises both tasks alike in training, as its
    running statistics do at evaluation."""

    def __init__(self, setup, multitask_lambda, **sgd):
        model = copy.deepcopy(setup.source_model).requires_grad_(True)
        self.source_head = copy.deepcopy(get_module(model, head_name(model)))
        replace_head(model, setup.num_classes)
        self.weight = multitask_lambda
        self._penultimate = None
        get_module(model, head_name(model)).register_forward_pre_hook(
            lambda module, inputs: setattr(self, "_penultimate", inputs[0]))
        super().__init__(model, extra_parameters=self.source_head.parameters(), **sgd)

    def losses(self, batch):
        count = len(batch.x)
        logits = self.model(torch.cat([batch.x, batch.source_x]))[:count]
        source_logits = self.source_head(self._penultimate[count:])
        return {"ce": F.cross_entropy(logits, batch.y),
                "source_ce": self.weight * F.cross_entropy(source_logits, batch.source_y)}

    def state_dict(self):
        return {**super().state_dict(), "source_head": self.source_head.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.source_head.load_state_dict(state["source_head"])

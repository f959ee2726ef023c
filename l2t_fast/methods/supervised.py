"""Supervised baselines: a target network trained from scratch, and fine-tuning of the
source network (optionally with its first stages frozen)."""
import copy

from l2t_fast.jobs.options import Int, Option
from l2t_fast.methods import register
from l2t_fast.methods.base import Method
from l2t_fast.models import get_module, replace_head, stage_names


@register("scratch", order=0, summary="the target network trained on the target labels "
          "alone, from a random initialisation")
class Scratch(Method):
    def __init__(self, setup, **sgd):
        super().__init__(setup.target_model, **sgd)


def first_stages(model, count, option):
    """The names of the first ``count`` stages of ``model`` (``models.stage_names``); a count
    the model does not have is a ValueError naming ``option``."""
    stages = stage_names(model)
    if not 0 <= count <= len(stages):
        raise ValueError(f"{option} must be in [0, {len(stages)}] for this model "
                         f"(stages {stages}), got {count}")
    return stages[:count]


class WithFrozenStages(Method):
    """Trains ``model`` with the stages named ``frozen`` fixed: no gradients, and BatchNorm
    statistics kept too (those stages are put in eval mode before every step, since the job
    puts the whole model in train mode)."""

    def __init__(self, model, frozen, **sgd):
        self.frozen = [get_module(model, name) for name in frozen]
        for stage in self.frozen:
            stage.requires_grad_(False)
        super().__init__(model, **sgd)

    def losses(self, batch):
        for stage in self.frozen:
            stage.eval()
        return super().losses(batch)


@register("finetune", order=10, summary="the source network with a new head, trained on "
          "the target labels",
          options=[Option("freeze_stages", 0, Int(0),
                          "finetune: keep the first k stages of the source frozen")])
class FineTune(WithFrozenStages):
    """The source network with a new head; its first ``freeze_stages`` stages keep their
    source weights and BatchNorm statistics. Fine-tuning *is* training the source network
    on the target task, whatever the target architecture."""

    def __init__(self, setup, freeze_stages, **sgd):
        model = replace_head(copy.deepcopy(setup.source_model), setup.num_classes)
        model.requires_grad_(True)
        super().__init__(model, first_stages(model, freeze_stages, "freeze_stages"), **sgd)

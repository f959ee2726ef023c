"""Linear probing: the frozen source network as a fixed feature extractor."""
import copy

from l2t_fast.methods import register
from l2t_fast.methods.base import Method
from l2t_fast.models import get_module, head_name, replace_head


@register("linear-probe", order=12, summary="the frozen source network as a fixed feature "
          "extractor (its penultimate features), a new linear classifier trained on the "
          "target labels")
class LinearProbe(Method):
    """A copy of the source network whose head is replaced by a fresh linear classifier,
    the only part that trains; the rest stays in eval mode, so its BatchNorm statistics
    stay the source's too."""

    def __init__(self, setup, **sgd):
        model = replace_head(copy.deepcopy(setup.source_model), setup.num_classes)
        model.requires_grad_(False)
        self.head = get_module(model, head_name(model))
        self.head.requires_grad_(True)
        super().__init__(model, **sgd)

    def losses(self, batch):
        self.model.eval()
        self.head.train()
        return super().losses(batch)

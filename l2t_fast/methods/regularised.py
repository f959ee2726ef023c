"""Conservative fine-tuning: L2-SP (Li et al. 2018), fine-tuning pulled towards the
source weights instead of towards zero."""
import copy

from l2t_fast.jobs.options import Float, Option
from l2t_fast.methods import register
from l2t_fast.methods.base import Method
from l2t_fast.models import get_module, head_name, replace_head


@register("l2-sp", order=16, summary="L2-SP: fine-tuning whose weights from the source are "
          "pulled towards their source values (alpha/2 times the squared distance) and whose "
          "new head towards 0 (beta/2 times its squared norm), with no weight decay",
          options=[Option("l2sp_alpha", 0.01, Float(0),
                          "L2-SP: weight of the pull towards the source weights"),
                   Option("l2sp_beta", 0.01, Float(0),
                          "L2-SP: weight of the plain L2 penalty on the new head")])
class L2SP(Method):
    """The source network with a new head. Every parameter that came from the source
    (BatchNorm's affine ones included, as in the public implementations) is penalised by
    ``l2sp_alpha / 2 * ||w - w0||^2``, the head's by ``l2sp_beta / 2 * ||w||^2``. The
    penalties replace SGD's weight decay: the ``weight_decay`` option is not used."""

    def __init__(self, setup, l2sp_alpha, l2sp_beta, weight_decay, **sgd):
        model = replace_head(copy.deepcopy(setup.source_model), setup.num_classes)
        model.requires_grad_(True)
        head = get_module(model, head_name(model))
        self.head_parameters = list(head.parameters())
        head_ids = {id(p) for p in self.head_parameters}
        self.source_parameters = [p for p in model.parameters() if id(p) not in head_ids]
        self.starting_point = [p.detach().clone() for p in self.source_parameters]
        self.alpha, self.beta = l2sp_alpha, l2sp_beta
        super().__init__(model, weight_decay=0.0, **sgd)

    def losses(self, batch):
        losses = super().losses(batch)
        to_source = sum((p - p0).pow(2).sum()
                        for p, p0 in zip(self.source_parameters, self.starting_point))
        head = sum(p.pow(2).sum() for p in self.head_parameters)
        return {**losses, "sp": self.alpha / 2 * to_source, "head_l2": self.beta / 2 * head}

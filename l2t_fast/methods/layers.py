"""Layer transfer (Yosinski et al. 2014): the first k stages of the source network copied
into a freshly initialised network of the source's architecture."""
import copy

from l2t_fast.jobs.options import Flag, Int, Option
from l2t_fast.methods import register
from l2t_fast.methods.supervised import WithFrozenStages, first_stages
from l2t_fast.models import replace_head


def reinitialise(module):
    """Every submodule of ``module`` back to its constructor's initialisation (PyTorch's
    ``reset_parameters``, which is how the built-in networks are initialised), BatchNorm
    statistics included."""
    for child in module.modules():
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()
        elif any(True for _ in child.parameters(recurse=False)):
            raise ValueError(f"cannot re-initialise {type(child).__name__}: it has parameters "
                             f"but no reset_parameters()")


@register("layer-transfer", order=14, summary="the first k stages of the source copied into "
          "a freshly initialised network of the source's architecture, optionally frozen "
          "(Yosinski et al.'s AnB+ / AnB)",
          options=[Option("transfer_stages", 2, Int(0),
                          "layer-transfer: how many stages (stem, layer1, ...) to copy from "
                          "the source"),
                   Option("freeze_transferred", False, Flag(),
                          "layer-transfer: keep the copied stages fixed (AnB) instead of "
                          "fine-tuning them (AnB+)")])
class LayerTransfer(WithFrozenStages):
    """Stages are ``models.stage_names``; the stages after the first ``transfer_stages``
    and the new head start from a fresh initialisation. With ``freeze_transferred`` the
    copied stages keep their weights and BatchNorm statistics (eval mode)."""

    def __init__(self, setup, transfer_stages, freeze_transferred, **sgd):
        model = replace_head(copy.deepcopy(setup.source_model), setup.num_classes)
        model.requires_grad_(True)
        copied = first_stages(model, transfer_stages, "transfer_stages")
        for name, child in model.named_children():
            if name not in copied:
                reinitialise(child)
        super().__init__(model, copied if freeze_transferred else [], **sgd)

"""Progressive networks (Rusu et al. 2016): the frozen source column beside a new target
column that reads the source column's stage outputs through learned lateral adapters."""
from functools import partial

import torch
from torch import nn

from l2t_fast.methods import register
from l2t_fast.methods.base import Method
from l2t_fast.models import get_module, stage_names
from l2t_fast.models.hooks import FeatureHooks


def _stage_outputs(model, stages, example_input):
    """The shapes of ``stages``' outputs on ``example_input`` (eval mode, modes restored)."""
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        with FeatureHooks(model, stages) as hooks, torch.no_grad():
            _, outputs = hooks(example_input)
    finally:
        for module, flag in zip(model.modules(), flags):
            module.training = flag
    return [tuple(output.shape[1:]) for output in outputs]


class ProgressiveNetwork(nn.Module):
    """Two columns: ``source`` (frozen, always in eval mode) and ``target``. The output of
    the target's stage i (``models.stage_names``) becomes ``target_i + adapter_i(source_i)``
    with ``adapter_i`` a 1x1 convolution (no bias), so that every next stage, and the
    head after the last one, also reads the source column's features at that depth."""

    def __init__(self, source, target, example_input):
        super().__init__()
        source_stages, target_stages = stage_names(source), stage_names(target)
        if len(source_stages) != len(target_stages):
            raise ValueError(f"progressive: the source has stages {source_stages}, the target "
                             f"{target_stages}; a lateral per stage needs as many in both")
        source_shapes = _stage_outputs(source, source_stages, example_input)
        target_shapes = _stage_outputs(target, target_stages, example_input)
        for i, (s, t) in enumerate(zip(source_shapes, target_shapes)):
            if len(s) != 3 or len(t) != 3 or s[1:] != t[1:]:
                raise ValueError(f"progressive: stage {i} outputs {s} in the source "
                                 f"({source_stages[i]}) and {t} in the target "
                                 f"({target_stages[i]}); a 1x1 lateral needs [C, H, W] maps "
                                 f"of the same H and W")
        self.source = source.eval().requires_grad_(False)
        self.target = target
        self.adapters = nn.ModuleList(nn.Conv2d(s[0], t[0], 1, bias=False)
                                      for s, t in zip(source_shapes, target_shapes))
        first = next(target.parameters())
        self.adapters.to(first.device, first.dtype)
        self._source_hooks = FeatureHooks(source, source_stages)
        self._target_stages = [get_module(target, name) for name in target_stages]

    def train(self, mode=True):
        super().train(mode)
        self.source.eval()
        return self

    def forward(self, x):
        with torch.no_grad():
            _, laterals = self._source_hooks.run(self.source, x, stop_early=True)
        # hooked for this pass only: outside it the target column is a plain network
        handles = [stage.register_forward_hook(partial(self._add_lateral, adapter, lateral))
                   for stage, adapter, lateral in zip(self._target_stages, self.adapters,
                                                      laterals)]
        try:
            return self.target(x)
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _add_lateral(adapter, lateral, module, inputs, output):
        return output + adapter(lateral)


@register("progressive", order=65, summary="progressive network: the frozen source column "
          "and a new target column whose every stage also reads the source column's stage "
          "output through a learned 1x1 lateral adapter")
class Progressive(Method):
    """The target column is the fresh target network; both columns need as many stages,
    with outputs of the same spatial sizes (true of any two built-in ResNets)."""

    def __init__(self, setup, **sgd):
        model = ProgressiveNetwork(setup.source_model, setup.target_model,
                                   setup.example_input)
        super().__init__(model, **sgd)

"""Intermediate features of any ``nn.Module`` by forward hooks.

Hooks (rather than a ``forward_with_features`` method as in the paper's code) let any
model serve as source or target: torchvision, timm or user code, unchanged. Hooks also
fire under ``torch.func.functional_call``, which is how the engine runs the lookahead.
"""
import difflib
from functools import partial

import torch

from l2t_fast.models.feature_maps import to_feature_map


class _EnoughFeatures(Exception):
    """Raised by the last needed hook to end a forward pass early (see ``FeatureHooks.run``)."""


class FeatureHooks:
    """Collect the outputs of the modules named ``layer_names`` while the model runs.

    ``hooks(x)`` returns ``(output, [feature of each name, in layer_names order])``. Use as a
    context manager, or call ``remove()``, to take the hooks off the model.

    A module that runs several times in one forward pass (a shared block) reports its last
    output, on every path: the real step, the L2T-ww lookahead, FM and AT all match that
    one. ``run(..., stop_early=True)`` keeps to the rule: it ends a pass only once every
    layer has run as many times as in the latest pass that ran to the end (so it runs the
    first pass to the end), which assumes that this count does not change from pass to pass.
    """

    def __init__(self, model, layer_names):
        if isinstance(layer_names, str):
            raise TypeError("layer_names must be a list of module names, got a single str")
        self.model = model
        self.layer_names = list(layer_names)
        if not self.layer_names:
            raise ValueError("layer_names is empty: name at least one module")
        modules = dict(model.named_modules())
        for name in self.layer_names:
            if name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
                raise ValueError(f"layer {name!r} is not a module of {type(model).__name__}; "
                                 f"close matches: {close}")
        self._features = {}
        self._calls = {}  # name -> times its module ran in this pass
        self._calls_in_full_pass = None  # the same, in the latest pass that ran to the end
        self._stop_early = False
        # partial of a bound method, not a closure: deepcopy of the model then copies the
        # hooks along with it instead of leaving them pointing at this object
        self._handles = [modules[name].register_forward_hook(partial(self._store, name))
                         for name in dict.fromkeys(self.layer_names)]

    def _store(self, name, module, inputs, output):
        self._features[name] = to_feature_map(self.model, name, output)
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._stop_early and self._calls == self._calls_in_full_pass:
            raise _EnoughFeatures

    def __call__(self, *args, **kwargs):
        return self.run(self.model, *args, **kwargs)

    def run(self, forward, *args, stop_early=False, **kwargs):
        """Call ``forward(*args, **kwargs)``, a function that runs the hooked model (the model
        itself, or e.g. a ``functional_call`` of it), and return ``(output, features)``.

        With ``stop_early`` the pass ends as soon as every feature is in, that is, once each
        layer has run as many times as in the latest pass that ran to the end, skipping the
        rest of the model (e.g. the classifier head when only features are matched); the
        output is then ``None``. Without such a pass yet, it runs to the end.
        """
        self._features, self._calls = {}, {}
        self._stop_early = stop_early and self._calls_in_full_pass is not None
        output = None
        ran_to_end = False
        try:
            output = forward(*args, **kwargs)
            ran_to_end = True
        except _EnoughFeatures:
            pass
        finally:
            self._stop_early = False
        missing = [n for n in self.layer_names if n not in self._features]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the forward pass of "
                               f"{type(self.model).__name__}")
        if ran_to_end:
            self._calls_in_full_pass = self._calls
        features = [self._features[n] for n in self.layer_names]
        self._features, self._calls = {}, {}
        return output, features

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def feature_channels(model, layers, example_input):
    """Channel count of each named layer's output, from one eval-mode pass of
    ``example_input`` (the model's train/eval flags are restored)."""
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        with FeatureHooks(model, layers) as hooks, torch.no_grad():
            _, feats = hooks(example_input)
    finally:
        for module, flag in zip(model.modules(), flags):
            module.training = flag
    return [f.shape[1] for f in feats]

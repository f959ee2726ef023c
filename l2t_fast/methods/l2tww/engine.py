"""L2T-ww training (docs/SPEC.md section 3): a real SGD step, then an exact meta step.

The meta step differentiates CE after ``inner_steps`` lookahead SGD steps on the weighted
feature-matching loss and one on CE. The paper's code snapshots the modules and optimizer
with ``copy.deepcopy``, steps them in place, then replays every step backwards, recomputing
each loss (and the source network) twice. Here the lookahead is a pure function of plain
tensors instead: the target runs under ``torch.func.functional_call`` with the lookahead
parameters and every SGD step is written out on tensors. Reverse mode keeps one checkpoint
per step (parameters and momentum buffers), so at most one step's double-backward graph is
alive, like the paper's code; but nothing is deep-copied or restored, the source network
and meta-networks run once per iteration, matching steps stop after the last hooked layer,
the CE step is not recomputed, and the first step, which needs no adjoint of its start,
costs one forward-mode pass instead of a backward and a double backward: T Hessian-vector
products in all, where the replay does T + 1. A matching step's gradient comes from the
loss's backward alone (its value is never needed), and BatchNorm's double backward runs as
one fused kernel (``l2t_fast.methods.l2tww.batchnorm``).

Lookahead forwards run the target in train mode, with batch statistics in BatchNorm, as
the paper's code does; they get copies of the target's buffers, so running statistics of
the model never move during a lookahead. A hooked layer that runs several times in one
forward (a shared block) is matched by its last output in the real step and in every
lookahead step alike: a matching step stops after that last call, not the first
(``FeatureHooks``).
"""
import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from l2t_fast.methods.base import Diverged
from l2t_fast.methods.l2tww.batchnorm import fused_batch_norm
from l2t_fast.methods.l2tww.max_pool import lean_max_pool
from l2t_fast.models.hooks import FeatureHooks, feature_channels
from l2t_fast.matching.loss import (WeightedFeatureMatching, weighted_feature_matching_grads,
                           weighted_feature_matching_jvp)
from l2t_fast.methods.l2tww.meta import WhatNetwork, WhereNetwork


def _feature_channels(model, layer_names, example_input, which):
    """Channel count of each named layer's output.

    With ``example_input`` the model runs once (eval mode, no grad) and the outputs say it;
    otherwise it is read off the last module with ``out_channels``/``num_features`` (conv or
    norm) in registration order up to the end of the layer, which covers Sequential-built
    nets such as ResNets and VGGs.
    """
    if example_input is not None:
        return feature_channels(model, layer_names, example_input)
    FeatureHooks(model, layer_names).remove()  # rejects unknown names, with close matches
    named = list(model.named_modules())
    order = {name: i for i, (name, _) in enumerate(named)}
    channels = []
    for layer in layer_names:
        end = max(i for i, (name, _) in enumerate(named)
                  if name == layer or name.startswith(layer + "."))
        for _, module in reversed(named[:end + 1]):
            count = getattr(module, "out_channels", None) or getattr(module, "num_features", None)
            if isinstance(count, int):
                channels.append(count)
                break
        else:
            raise ValueError(f"cannot tell the channels of {which} layer {layer!r} "
                             f"(index {order[layer]} in named_modules); pass example_input")
    return channels


@contextmanager
def _train_mode(model):
    """Train mode for the duration, then every submodule's own flag back."""
    flags = [m.training for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, flag in zip(model.modules(), flags):
            module.training = flag


def _sgd_lookahead(params, buffers, grads, lr, momentum, weight_decay):
    """One torch.optim.SGD step (no dampening, no Nesterov) on plain tensors.

    A ``None`` gradient (the loss does not reach that parameter) counts as zero, so the
    parameter still moves by momentum and weight decay. A ``None`` buffer is a first step.
    Multi-tensor (``_foreach``) ops, as torch.optim uses: a step touches every parameter
    tensor, and one op per tensor would cost more in dispatch than in arithmetic. It runs
    without autograd: the reverse sweep differentiates a step by ``_step_adjoints``. The
    moved buffers are summed in place, as torch.optim does (the same roundings): two
    parameter-sized temporaries at a time, not three, where the CE step peaks.
    """
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    steps = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads
    new_buffers = list(buffers)
    if momentum:
        steps = list(steps)
        old = [i for i, buf in enumerate(buffers) if buf is not None]
        if old:
            moved = torch._foreach_mul([buffers[i] for i in old], momentum)
            torch._foreach_add_(moved, [steps[i] for i in old])
            for i, buf in zip(old, moved):
                steps[i] = buf
        new_buffers = steps
    return list(torch._foreach_add(params, steps, alpha=-lr)), new_buffers


def _step_direction(adjoint_param, adjoint_buffer, lr, momentum):
    """The adjoint that one SGD step hands to its gradient g, from the adjoints ``a`` of the
    new parameter and ``b`` of the new momentum buffer: ``b - lr a`` (``-lr a`` without
    momentum, where the buffer is not updated); None stands for zero."""
    if momentum and adjoint_buffer is not None:
        return adjoint_buffer if adjoint_param is None else adjoint_buffer - lr * adjoint_param
    return None if adjoint_param is None else -lr * adjoint_param


def _step_adjoints(has_buffer, adjoint_theta, adjoint_buffers, directions, pulled, lr,
                   momentum, weight_decay):
    """Adjoints of a step's start (parameters, momentum buffers) from those of its end.

    The step is theta' = theta - lr b', b' = momentum b + g + weight_decay theta (b' = g +
    weight_decay theta on a first step; without momentum theta' = theta - lr (g +
    weight_decay theta) and b' = b). With ``directions`` v, the adjoint it hands to g
    (``_step_direction``), and ``pulled`` the derivative of <g, v> in theta (None for
    zero): theta gets a + weight_decay v + pulled, b gets momentum v (the adjoint of b'
    itself without momentum). Written out instead of differentiated through a graph of
    the step, which would keep two parameter-sized outputs and their intermediates alive.
    The step is linear in b, so only which buffers exist (``has_buffer``) matters here,
    not their values: the reverse sweep keeps no momentum buffer.
    """
    new_theta = [_add(_add(a, None if v is None or not weight_decay else weight_decay * v), h)
                 for a, v, h in zip(adjoint_theta, directions, pulled)]
    if not momentum:  # ``adjoint_buffers`` is read only here (None: not needed)
        return new_theta, [c if b else None for b, c in zip(has_buffer, adjoint_buffers)]
    return new_theta, [momentum * v if b and v is not None else None
                       for b, v in zip(has_buffer, directions)]


def _existing(buffers):
    """Which momentum buffers exist: all that the reverse sweep needs of them."""
    return [b is not None for b in buffers]


def _leaves(tensors):
    """Fresh autograd leaves for a checkpointed step (``None`` stays ``None``)."""
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


def _listing(what, names, shown=5):
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"non-finite {what}: {', '.join(names[:shown])}{more}"


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _grad(outputs, adjoints, inputs, create_graph=False):
    """Vector-Jacobian product; a ``None`` adjoint, output or input stands for zero, and
    inputs that the outputs do not reach get ``None``. Outputs may be tensors or their
    ``_gradient_edges``."""
    live = [(o, a) for o, a in zip(outputs, adjoints) if o is not None and a is not None
            and (isinstance(o, GradientEdge) or o.requires_grad)]
    present = [i for i, t in enumerate(inputs) if t is not None]
    result = [None] * len(inputs)
    if not live or not present:
        return result
    grads = torch.autograd.grad([o for o, _ in live], [inputs[i] for i in present],
                                [a for _, a in live], create_graph=create_graph,
                                allow_unused=True)
    for i, g in zip(present, grads):
        result[i] = g
    return result


def _gradient_edges(grads):
    """Where each step gradient g sits in its graph, for the double backward to start from
    once the values of g are spent (by the SGD step) and freed: a parameter-sized set
    less at the meta step's peak. None stays None, and so does a g without a graph."""
    return [None if g is None or not g.requires_grad else get_gradient_edge(g) for g in grads]


class L2TWW:
    """Learning What and Where to Transfer: target training with learned feature matching.

    ``step(x, y)`` does one iteration: the real SGD step on CE + matching, then (every
    ``meta_period`` iterations) the meta step on the updated parameters, as the paper's
    code orders them. ``learn_where=False`` gives L2T-w: no Where network, every pair
    weighs 1.
    """

    def __init__(self, source_model, target_model, source_layers, target_layers, pairs="all",
                 beta=0.5, inner_steps=2, lr=0.1, momentum=0.9, weight_decay=1e-4,
                 meta_lr=1e-4, meta_weight_decay=1e-4, meta_period=1,
                 where_activation="relu6", where_init=1.0, learn_where=True, backend="auto",
                 example_input=None):
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r}")
        if isinstance(meta_period, bool) or not isinstance(meta_period, int) or meta_period < 1:
            raise ValueError(f"meta_period must be an int >= 1, got {meta_period!r}")
        self.source_model = source_model.eval().requires_grad_(False)
        self.target_model = target_model
        self.inner_steps = inner_steps
        self.meta_period = meta_period
        self.backend = backend
        self.iteration = 0

        source_channels = _feature_channels(source_model, source_layers, example_input, "source")
        target_channels = _feature_channels(target_model, target_layers, example_input, "target")
        if pairs == "all":
            pairs = [(m, n) for m in range(len(source_channels))
                     for n in range(len(target_channels))]
        self.pairs = [tuple(p) for p in pairs]
        first = next(target_model.parameters())
        to_model = dict(device=first.device, dtype=first.dtype)
        self.matching = WeightedFeatureMatching(source_channels, target_channels, self.pairs,
                                                beta=beta, bias=True, backend=backend).to(**to_model)
        self.what = WhatNetwork(source_channels, self.pairs).to(**to_model)
        self.where = (WhereNetwork(source_channels, self.pairs, where_activation, where_init)
                      .to(**to_model) if learn_where else None)
        self._source_hooks = FeatureHooks(source_model, source_layers)
        self._target_hooks = FeatureHooks(target_model, target_layers)

        # theta: trainable target parameters, then the regressors (frozen ones stay constants)
        self._target_names = [n for n, p in target_model.named_parameters() if p.requires_grad]
        self._theta = ([p for p in target_model.parameters() if p.requires_grad]
                       + list(self.matching.weight) + list(self.matching.bias))
        self._theta_names = (self._target_names
                             + [f"matching.weight.{i}" for i in range(len(self.pairs))]
                             + [f"matching.bias.{i}" for i in range(len(self.pairs))])
        self.optimizer = torch.optim.SGD(self._theta, lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self._meta_named = [("what." + n, p) for n, p in self.what.named_parameters()]
        if self.where is not None:
            self._meta_named += [("where." + n, p) for n, p in self.where.named_parameters()]
        self._forward_mode = True  # False once the target turned out to lack a jvp rule
        self.meta_optimizer = torch.optim.Adam([p for _, p in self._meta_named], lr=meta_lr,
                                               weight_decay=meta_weight_decay)

    # ---- pieces of one iteration -------------------------------------------------------

    def _source_features(self, x):
        self.source_model.eval()
        with torch.no_grad():
            return self._source_hooks(x)[1]

    def _meta_weights(self, source_feats):
        channel_weights = self.what(source_feats)
        pair_weights = self.where(source_feats) if self.where is not None else None
        return channel_weights, pair_weights

    def _run_target(self, theta, x, stop_early=False):
        """Target forward with lookahead parameters ``theta``; BatchNorm gets buffer copies
        and, where it can, the fused double backward (``l2t_fast.methods.l2tww.batchnorm``),
        max pooling keeps no indices (``l2t_fast.methods.l2tww.max_pool``). Attention runs
        as plain math: the fused kernels have no double backward or jvp."""
        tensors = dict(zip(self._target_names, theta))
        tensors.update((n, b.clone()) for n, b in self.target_model.named_buffers())
        with fused_batch_norm(), lean_max_pool(), sdpa_kernel(SDPBackend.MATH):
            return self._target_hooks.run(functional_call, self.target_model, tensors, (x,),
                                          stop_early=stop_early)

    def _feature_tangents(self, theta, directions, x):
        """Target features at ``theta`` and their derivatives along ``directions`` (None
        for zero), by forward-mode AD; a feature that no direction moves gets None."""
        with forward_ad.dual_level():
            duals = [t if d is None else forward_ad.make_dual(t, d)
                     for t, d in zip(theta, directions)]
            _, feats = self._run_target(duals, x, stop_early=True)
            unpacked = [forward_ad.unpack_dual(f) for f in feats]
        return [u.primal for u in unpacked], [u.tangent for u in unpacked]

    def _lookahead_matching_gradients(self, theta, x, source_feats, channel_weights,
                                      pair_weights, create_graph):
        """The matching loss's gradient at ``theta`` (None where it does not reach), by the
        loss's backward alone: its value is never needed in a lookahead step."""
        _, target_feats = self._run_target(theta, x, stop_early=True)
        count = len(self._target_names)
        num_pairs = len(self.pairs)
        weight, bias = theta[count:count + num_pairs], theta[count + num_pairs:]
        grad_feats, grad_weight, grad_bias = weighted_feature_matching_grads(
            source_feats, target_feats, self.pairs, weight, bias, channel_weights, pair_weights,
            self.matching.beta, create_graph=create_graph, backend=self.backend)
        return (_grad(target_feats, grad_feats, theta[:count], create_graph=create_graph)
                + grad_weight + grad_bias)

    def _lookahead_ce(self, theta, x, y):
        logits, _ = self._run_target(theta, x)
        return F.cross_entropy(logits, y)

    def _ce_step_adjoints(self, theta, buffers, x, y, hyper):
        """The lookahead CE step from (theta, buffers) of the target, then the final CE:
        its value and its gradient for that start (parameters, then buffers).

        The final parameters come from the step's gradient without a graph; the final
        CE's gradient a in them is taken and its graph freed before the step's own double
        backward pulls a back (``_step_adjoints``), so the two graphs are never alive
        together. That double backward is the iteration's peak of memory, so by then the
        final parameters and every momentum buffer are gone: ``buffers`` is emptied once
        the final parameters are made (the caller keeps no other reference to them)."""
        lr, momentum, weight_decay = hyper
        theta = _leaves(theta)
        grads = torch.autograd.grad(self._lookahead_ce(theta, x, y), theta, create_graph=True,
                                    allow_unused=True)
        with torch.no_grad():
            final = _sgd_lookahead([t.detach() for t in theta], buffers,
                                   [None if g is None else g.detach() for g in grads], *hyper)[0]
        has_buffer = _existing(buffers)
        buffers.clear()
        grads = _gradient_edges(grads)
        final = _leaves(final)
        outer = self._lookahead_ce(final, x, y)
        adjoint_final = _grad([outer], [torch.ones_like(outer)], final)
        outer = outer.detach()  # its graph would keep the final parameters alive
        del final
        nothing = [None] * len(theta)
        directions = [_step_direction(a, None, lr, momentum) for a in adjoint_final]
        pulled = _grad(grads, directions, theta)
        adjoint_theta, adjoint_buffers = _step_adjoints(
            has_buffer, adjoint_final, nothing, directions, pulled, *hyper)
        return outer, adjoint_theta + adjoint_buffers

    def _meta_gradients(self, x, y, source_feats):
        """CE after the T + 1 lookahead steps, and its gradient for each meta parameter.

        Reverse mode with one checkpoint per step: the forward pass keeps only each
        matching step's starting point (parameters and momentum buffers, plain tensors);
        the final CE's gradient is pulled back through the CE step's gradient graph; then
        every matching step but the first is rebuilt with ``create_graph=True``, newest
        first, and the adjoints of parameters, momentum buffers and meta-network outputs
        are pulled through its gradient (the SGD update itself is differentiated by hand,
        ``_step_adjoints``), so one step's double-backward graph is alive at a time. The
        first step only passes adjoints to the meta outputs (``pull_back_to_meta``).
        """
        channel_weights, pair_weights = self._meta_weights(source_feats)
        meta_outputs = channel_weights + ([] if pair_weights is None else pair_weights)
        meta_leaves = [w.detach().requires_grad_() for w in meta_outputs]
        num_pairs = len(self.pairs)
        leaf_channel_weights = meta_leaves[:num_pairs]
        leaf_pair_weights = meta_leaves[num_pairs:] if pair_weights is not None else None
        group = self.optimizer.param_groups[0]
        hyper = group["lr"], group["momentum"], group["weight_decay"]
        count = len(self._target_names)

        def matching_gradients(theta, create_graph):
            return self._lookahead_matching_gradients(theta, x, source_feats,
                                                      leaf_channel_weights, leaf_pair_weights,
                                                      create_graph)

        def step_directions(adjoint_theta, adjoint_buffers):
            lr, momentum, _ = hyper
            return [_step_direction(a, b, lr, momentum)
                    for a, b in zip(adjoint_theta, adjoint_buffers)]

        def pull_back(theta, has_buffer, adjoint_theta, adjoint_buffers, directions,
                      to_start=True):
            """Adjoints of the meta outputs and, ``to_start``, of the step's start
            (parameters, buffers) from those of its end: the step reaches both through its
            gradient g as <g, v>, v the ``directions`` (``_step_direction``); the graph of
            g dies on return."""
            theta = _leaves(theta)
            grads = _gradient_edges(matching_gradients(theta, create_graph=True))
            pulled = _grad(grads, directions, meta_leaves + (theta if to_start else []))
            adjoint_meta = pulled[:len(meta_leaves)]
            if not to_start:
                return adjoint_meta, None, None
            return (adjoint_meta, *_step_adjoints(has_buffer, adjoint_theta, adjoint_buffers,
                                                  directions, pulled[len(meta_leaves):],
                                                  *hyper))

        def pull_back_to_meta(theta, directions):
            """Adjoints of the meta outputs alone from the ``directions`` v of the step.

            The step reaches the meta outputs only through its gradient g, as
            <g, v> with v = b - lr a (the adjoint that the step hands to g); g is linear in
            the meta outputs, so d<g, v>/d(meta) is the loss's derivative along v,
            differentiated in the meta outputs: one forward-mode pass through the target
            instead of a backward and a double backward.
            """
            feats, feat_tangents = self._feature_tangents(theta[:count], directions[:count], x)
            directional = weighted_feature_matching_jvp(
                source_feats, feats, self.pairs, theta[count:count + num_pairs],
                theta[count + num_pairs:], leaf_channel_weights, leaf_pair_weights,
                self.matching.beta, feat_tangents, directions[count:count + num_pairs],
                directions[count + num_pairs:], backend=self.backend)
            return _grad([directional], [torch.ones_like(directional)], meta_leaves)

        theta = [p.detach() for p in self._theta]
        buffers = [self.optimizer.state[p].get("momentum_buffer") for p in self._theta]
        starts = []
        for _ in range(self.inner_steps):
            starts.append((theta, _existing(buffers)))
            grads = matching_gradients(_leaves(theta), create_graph=False)
            with torch.no_grad():
                theta, buffers = _sgd_lookahead(theta, buffers, grads, *hyper)

        # Peak memory: the CE step below is the iteration's peak; it empties ce_buffers.
        ce_theta, ce_buffers = theta[:count], buffers[:count]
        del grads, theta, buffers
        outer, adjoints = self._ce_step_adjoints(ce_theta, ce_buffers, x, y, hyper)
        del ce_theta  # keep only what the reverse sweep reads
        padding = [None] * (len(self._theta) - count)
        adjoint_theta, adjoint_buffers = adjoints[:count] + padding, adjoints[count:] + padding
        del adjoints

        # Each step below drops the adjoints that it no longer reads before its double
        # backward: with momentum, b's adjoint only goes into the directions.
        adjoint_meta = [None] * len(meta_leaves)
        for _ in range(1, self.inner_steps):
            theta, has_buffer = starts.pop()
            directions = step_directions(adjoint_theta, adjoint_buffers)
            if hyper[1]:
                adjoint_buffers = None
            grads, adjoint_theta, adjoint_buffers = pull_back(
                theta, has_buffer, adjoint_theta, adjoint_buffers, directions)
            adjoint_meta = [_add(a, g) for a, g in zip(adjoint_meta, grads)]
        directions = step_directions(adjoint_theta, adjoint_buffers)
        del adjoint_theta, adjoint_buffers
        if self._forward_mode:
            try:
                grads = pull_back_to_meta(starts[0][0], directions)
            except NotImplementedError as error:  # an op of the model has no forward-mode rule
                warnings.warn(f"the target model does not support forward-mode AD ({error}); "
                              f"the meta step's first step uses a double backward instead, "
                              f"which is exact but slower", stacklevel=4)
                self._forward_mode = False
        if not self._forward_mode:
            grads, _, _ = pull_back(*starts[0], None, None, directions, to_start=False)
        adjoint_meta = [_add(a, g) for a, g in zip(adjoint_meta, grads)]

        params = [p for _, p in self._meta_named]
        grads = _grad(meta_outputs, adjoint_meta, params)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return outer, grads

    # ---- public API --------------------------------------------------------------------

    def hypergradient(self, x, y):
        """d CE(theta'_{T+1}) / d phi at the current state, ``{"what.<param>": tensor, ...}``.

        Changes nothing: parameters, momentum buffers, BatchNorm statistics, optimizer
        states and ``.grad`` fields stay as they are.
        """
        with _train_mode(self.target_model):
            _, grads = self._meta_gradients(x, y, self._source_features(x))
        return {name: g for (name, _), g in zip(self._meta_named, grads)}

    def step(self, x, y):
        """One iteration; returns the real step's ``loss``, ``ce`` and ``matching`` (floats),
        plus ``meta_ce`` (CE after the lookahead) on iterations with a meta step.

        Raises ``Diverged`` (a ``FloatingPointError``) naming what turned non-finite: the
        loss, an updated parameter, ``meta_ce``, a hypergradient or an updated meta
        parameter, the first of these in that order. The check costs one fused reduction
        and the step's only host sync; the step has gone through by then, so the engine's
        state is not usable afterwards.

        The real step's gradients are dropped (``.grad`` set to None) once the optimizer
        has used them, and its features once the loss is taken: the meta step that follows
        is the iteration's peak of memory, and they would be two more sets alive there.
        """
        grads = []
        with _train_mode(self.target_model):
            source_feats = self._source_features(x)
            with torch.no_grad():
                channel_weights, pair_weights = self._meta_weights(source_feats)
            self.optimizer.zero_grad(set_to_none=True)
            logits, target_feats = self._target_hooks(x)
            ce = F.cross_entropy(logits, y)
            matching = self.matching(source_feats, target_feats, channel_weights, pair_weights)
            loss = ce + matching
            del logits, target_feats
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.iteration += 1
            scalars = {"loss": loss, "ce": ce, "matching": matching}
            if self.iteration % self.meta_period == 0:
                outer, grads = self._meta_gradients(x, y, source_feats)
                for (_, p), g in zip(self._meta_named, grads):
                    p.grad = g
                self.meta_optimizer.step()
                self.meta_optimizer.zero_grad(set_to_none=True)
                scalars["meta_ce"] = outer
        return self._finite_report(scalars, grads)

    def _finite_report(self, scalars, hypergradients):
        """``scalars`` as floats, after checking them, the parameters, the
        ``hypergradients`` and the meta parameters for non-finite values: one max-abs
        norm per tensor (one fused op) and one host sync for all."""
        meta_named = self._meta_named if hypergradients else []
        tensors = ([p.detach() for p in self._theta] + list(hypergradients)
                   + [p.detach() for _, p in meta_named])
        norms = torch._foreach_norm(tensors, ord=float("inf"))
        values = torch.stack([v.detach() for v in scalars.values()] + list(norms)).tolist()
        report = dict(zip(scalars, values))
        finite = iter([math.isfinite(v) for v in values[len(scalars):]])  # in tensors' order
        meta_names = [name for name, _ in meta_named]
        bad_params, bad_hypergradients, bad_meta = (
            [name for name in names if not next(finite)]
            for names in (self._theta_names, meta_names, meta_names))
        if not all(math.isfinite(report[k]) for k in ("loss", "ce", "matching")):
            problem = (f"non-finite loss (loss {report['loss']} = ce {report['ce']} "
                       f"+ matching {report['matching']})")
        elif bad_params:
            problem = _listing("updated parameters", bad_params)
        elif not math.isfinite(report.get("meta_ce", 0.0)):
            problem = f"non-finite meta_ce, the CE after the lookahead ({report['meta_ce']})"
        elif bad_hypergradients:
            problem = _listing("hypergradients", bad_hypergradients)
        elif bad_meta:
            problem = _listing("updated meta parameters", bad_meta)
        else:
            return report
        lr = self.optimizer.param_groups[0]["lr"]
        meta_lr = self.meta_optimizer.param_groups[0]["lr"]
        raise Diverged(f"L2TWW.step diverged at iteration {self.iteration}: {problem}; "
                       f"try a lower lr (now {lr:g}) or meta_lr (now {meta_lr:g})")

    @torch.no_grad()
    def pair_weights(self, x):
        """Batch-mean Where weight of each pair, ``[P]`` (all ones without a Where network)."""
        if self.where is None:
            first = next(self.target_model.parameters())
            return torch.ones(len(self.pairs), dtype=first.dtype, device=first.device)
        return torch.stack([w.mean() for w in self.where(self._source_features(x))])

    @torch.no_grad()
    def channel_weights(self, x):
        """Batch-mean What weights of each pair, a list of ``[Cs_m]`` tensors."""
        return [w.mean(0) for w in self.what(self._source_features(x))]

    def state_dict(self):
        """Everything a resumed run needs: target, regressors, meta-networks, optimizers."""
        return {
            "target": self.target_model.state_dict(),
            "matching": self.matching.state_dict(),
            "what": self.what.state_dict(),
            "where": None if self.where is None else self.where.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "iteration": self.iteration,
        }

    def load_state_dict(self, state):
        if (state["where"] is None) != (self.where is None):
            raise ValueError("state_dict and this engine disagree on learn_where")
        self.target_model.load_state_dict(state["target"])
        self.matching.load_state_dict(state["matching"])
        self.what.load_state_dict(state["what"])
        if self.where is not None:
            self.where.load_state_dict(state["where"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.iteration = state["iteration"]

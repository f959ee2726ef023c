"""The straightforward meta step that ``bench_meta_step.py`` measures L2TWW against.

It works the way the paper's public code does: snapshot the target, the regressors and the
SGD state with ``copy.deepcopy`` before each lookahead step, take the steps in place with
the real optimizer (each loss recomputing the source features and the meta-networks), then
replay the steps backwards: restore each snapshot, recompute that step's gradient with
``create_graph=True`` and backpropagate the adjoints of parameters and momentum buffers
through it. At the end the first snapshot is restored, so that no state changes.

Adjoints of one SGD step ``buf' = m buf + g(theta) + wd theta``, ``theta' = theta - lr buf'``,
given ``a`` for theta' and ``b`` for buf': with ``c = b - lr a``, theta gets
``a + wd c + H c`` and buf gets ``m c``; the meta parameters get ``d <g, c> / d phi``.
"""
import copy

import torch
import torch.nn.functional as F


def naive_hypergradient(engine, x, y):
    """``{name: tensor}`` like ``engine.hypergradient(x, y)``, computed by snapshot and replay.

    Only the models, meta-networks, regressors and optimizer of ``engine`` are used.
    """
    target, matching, optimizer = engine.target_model, engine.matching, engine.optimizer
    theta = [p for group in optimizer.param_groups for p in group["params"]]
    meta_params = [p for _, p in engine._meta_named]
    group = optimizer.param_groups[0]
    lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
    source_hooks, target_hooks = engine._source_hooks, engine._target_hooks

    def snapshot():
        return copy.deepcopy((target.state_dict(), matching.state_dict(), optimizer.state_dict()))

    def restore(state):
        target.load_state_dict(state[0])
        matching.load_state_dict(state[1])
        optimizer.load_state_dict(state[2])

    def matching_objective():
        with torch.no_grad():
            _, source_feats = source_hooks(x)
        channel_weights = engine.what(source_feats)
        pair_weights = engine.where(source_feats) if engine.where is not None else None
        _, target_feats = target_hooks(x)
        return matching(source_feats, target_feats, channel_weights, pair_weights)

    def ce_objective():
        logits, _ = target_hooks(x)
        return F.cross_entropy(logits, y)

    def zero_grads(params):
        for p in params:  # zeros, not None: every parameter takes every SGD step
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    objectives = [matching_objective] * engine.inner_steps + [ce_objective]
    was_training = target.training
    target.train()
    snapshots = []
    for objective in objectives:
        snapshots.append(snapshot())
        zero_grads(theta)
        objective().backward()
        optimizer.step()

    zero_grads(theta)
    ce_objective().backward()
    adjoint_params = [p.grad.clone() for p in theta]
    adjoint_buffers = [torch.zeros_like(p) for p in theta]
    zero_grads(meta_params)
    for state, objective in zip(reversed(snapshots), reversed(objectives)):
        restore(state)
        grads = torch.autograd.grad(objective(), theta, create_graph=True, allow_unused=True)
        directions = [b - lr * a for a, b in zip(adjoint_params, adjoint_buffers)]
        inner = sum((g * c).sum() for g, c in zip(grads, directions) if g is not None)
        zero_grads(theta)
        inner.backward()
        adjoint_params = [a + weight_decay * c + p.grad
                          for a, c, p in zip(adjoint_params, directions, theta)]
        adjoint_buffers = [momentum * c for c in directions]
    restore(snapshots[0])
    for p in theta:
        p.grad = None
    target.train(was_training)
    result = {name: p.grad.clone() for name, p in engine._meta_named}
    for p in meta_params:
        p.grad = None
    return result

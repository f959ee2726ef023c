"""The paper's CIFAR setting (alinlab/L2T-ww, its CIFAR-100 command), written in our code,
and a full L2T-ww iteration the way the paper's code takes it, to compare ours against.

Networks, as the paper's ``models/resnet_cifar.py`` and ``models/vgg_cifar.py`` build them:

- source ``CifarResNet32``: a 3x3 stem with bias, then three stages of five basic blocks
  (16, 32, 64 channels at 32, 16, 8 px; the first block of stages 2 and 3 strides by 2
  with a 1x1 projection), global average pool, linear head. The paper's code hands out
  the output of every block (15 maps); its CIFAR pairs use maps 4, 9 and 14, the last
  block of each stage: here ``stage1..stage3``.
- target ``VGG9BN``: conv-BN-ReLU blocks of 64 | 128 | 256, 256 | 512, 512 | 512, 512
  channels (3x3 convs with bias), each block followed by a 2x2 max pool, so blocks 1-5 run
  at 32, 16, 8, 4, 2 px; then the global average pool and a linear head. The paper's code
  matches each block's output before its pool: here ``block1..block5``.
- pairs: its ``4-0,...,14-4``, every (source stage, target block) pair, source-major: 15.

The paper's models also carry modules that their forward never uses (``alphas``,
``new_bn``, ``new_classifier``, ``w1..w3``); they are left out, and ReLUs are not in place.
Initialisation as the paper's: convolutions normal with std sqrt(2 / (k^2 out)), BatchNorm
1 and 0, VGG's linear layers normal(0, 0.01).

Optimiser settings as the paper's defaults (the CIFAR command changes none of these):
SGD lr 0.1, momentum 0.9, weight decay 1e-4 on target and regressors; Adam lr 1e-4,
weight decay 1e-4 on the meta-networks; beta 0.5; Where activation relu6, bias 1; T = 2.
Batch 64 of 32x32 images, CIFAR-100's 100 classes.

``PaperStyle.iteration`` is one iteration of the paper's ``train_l2t_ww.py`` loop with its
``MetaSGD`` optimiser, re-expressed on an ``L2TWW`` engine's modules (same parameters, same
optimisers): the real step on CE + matching; ``T`` matching steps and one CE step taken
in place by the SGD optimiser, each after a ``copy.deepcopy`` snapshot of the target's,
the regressors' and the optimiser's state dicts, and each loss recomputing the source
network and the meta-networks; the final CE's backward; then the replay, newest step
first: restore the snapshot, recompute that step's loss and its gradient with
``create_graph=True``, backpropagate ``<g, b - lr a>`` into everything, and update the
adjoints; last, the first snapshot stays restored (the paper's ``rollback=True``) and
Adam steps the meta-networks. The matching loss is the paper's formula: per pair, the
source map resized by ``F.interpolate(scale_factor=...)``, minus the 1x1 regressor of the
target map, squared, averaged over the map, weighted.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from l2t_fast.methods.l2tww.engine import L2TWW
from l2t_fast.models import BasicBlock

BATCH, SIZE, CLASSES, INNER_STEPS = 64, 32, 100, 2
SOURCE_LAYERS = ["stage1", "stage2", "stage3"]
TARGET_LAYERS = ["block1", "block2", "block3", "block4", "block5"]
VGG9_BLOCKS = ((64,), (128,), (256, 256), (512, 512), (512, 512))
PAPER_OPTIMIZATION = dict(beta=0.5, inner_steps=INNER_STEPS, lr=0.1, momentum=0.9,
                          weight_decay=1e-4, meta_lr=1e-4, meta_weight_decay=1e-4,
                          where_activation="relu6", where_init=1.0)


def _init_like_paper(model):
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CifarResNet32(nn.Module):
    """The paper's CIFAR ResNet32 source: stem, ``stage1..stage3`` of five blocks, head."""

    def __init__(self, num_classes=CLASSES, blocks_per_stage=5, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        channels = widths[0]
        for index, width in enumerate(widths):
            blocks = [BasicBlock(channels, width, 1 if index == 0 else 2)]
            blocks += [BasicBlock(width, width, 1) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"stage{index + 1}", nn.Sequential(*blocks))
            channels = width
        self.fc = nn.Linear(channels, num_classes)
        _init_like_paper(self)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class VGG9BN(nn.Module):
    """The paper's VGG9 with BatchNorm target: ``block1..block5``, each pooled, then a head."""

    def __init__(self, num_classes=CLASSES, blocks=VGG9_BLOCKS):
        super().__init__()
        channels = 3
        for index, widths in enumerate(blocks):
            layers = []
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width),
                           nn.ReLU()]
                channels = width
            self.add_module(f"block{index + 1}", nn.Sequential(*layers))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels, num_classes)
        _init_like_paper(self)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        for index in range(len(VGG9_BLOCKS)):
            x = self.pool(getattr(self, f"block{index + 1}")(x))
        return self.fc(x.mean((2, 3)))


def make_engine(seed=0, dtype=torch.float32, batch=BATCH, size=SIZE, warm_iterations=1):
    """An engine in the paper's setting, ``warm_iterations`` of ours into training (momentum
    buffers and Adam's state exist), and a batch ``(x, y)``: every implementation that
    starts from the same seed starts from the same state."""
    torch.manual_seed(seed)
    source = CifarResNet32().to(dtype)
    target = VGG9BN().to(dtype)
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    y = torch.randint(0, CLASSES, (batch,))
    engine = L2TWW(source, target, SOURCE_LAYERS, TARGET_LAYERS, example_input=x[:2],
                   **PAPER_OPTIMIZATION)
    for _ in range(warm_iterations):
        engine.step(x, y)
    return engine, x, y


class PaperStyle:
    """The paper's iteration on an engine's modules (see the module docstring)."""

    def __init__(self, engine):
        self.engine = engine
        self.theta = [p for group in engine.optimizer.param_groups for p in group["params"]]
        self.meta_params = [p for _, p in engine._meta_named]
        self.snapshots = []
        self._grads_as_in_torch_1_0()  # in its steady state, not allocated by an iteration

    def _grads_as_in_torch_1_0(self):
        """A .grad on every parameter, as the paper's torch-1.0 code has after its first
        backward (its zero_grad zeroes, never drops): SGD then moves the parameters that a
        matching step does not reach (the head) by momentum and weight decay, where a None
        .grad (which ``L2TWW.step`` leaves) would make it skip them."""
        for p in self.theta:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    # the paper's inner_objective / outer_objective, on the engine's modules
    def _source_features(self, x):
        with torch.no_grad():
            return self.engine._source_hooks(x)[1]

    def _matching(self, source_feats, target_feats):
        engine = self.engine
        weights = engine.what(source_feats)
        pair_weights = engine.where(source_feats) if engine.where is not None else None
        loss = 0.0
        for i, (m, n) in enumerate(engine.pairs):
            s, t = source_feats[m], target_feats[n]
            if s.size(3) != t.size(3):
                s = F.interpolate(s, scale_factor=t.size(3) / s.size(3), mode="bilinear",
                                  align_corners=False)
            regressor = engine.matching.weight[i]
            diff = s - F.conv2d(t, regressor[:, :, None, None], engine.matching.bias[i])
            diff = diff.pow(2).mean(3).mean(2)
            per_sample = diff.mul(weights[i]).sum(1)
            if pair_weights is not None:
                per_sample = per_sample * pair_weights[i]
            loss = loss + per_sample.mean(0).mul(engine.matching.beta)
        return loss

    def inner_objective(self, x, y, matching_only=False):
        logits, target_feats = self.engine._target_hooks(x)
        matching = self._matching(self._source_features(x), target_feats)
        if matching_only:
            return matching
        return F.cross_entropy(logits, y) + matching

    def outer_objective(self, x, y):
        logits, _ = self.engine._target_hooks(x)
        return F.cross_entropy(logits, y)

    # the paper's MetaSGD
    def _state(self):
        engine = self.engine
        return copy.deepcopy([engine.target_model.state_dict(), engine.matching.state_dict(),
                              engine.optimizer.state_dict()])

    def _set_state(self, state):
        engine = self.engine
        engine.target_model.load_state_dict(state[0])
        engine.matching.load_state_dict(state[1])
        engine.optimizer.load_state_dict(state[2])

    def _recorded_step(self, objective, *args):
        self.snapshots.append((self._state(), objective, args))
        objective(*args).backward()
        self.engine.optimizer.step()

    def _meta_backward(self):
        group = self.engine.optimizer.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        adjoints = [(p.grad.clone() if p.grad is not None else torch.zeros_like(p),
                     torch.zeros_like(p)) for p in self.theta]
        for state, objective, args in reversed(self.snapshots):
            self._set_state(state)
            grads = torch.autograd.grad(objective(*args), self.theta, create_graph=True,
                                        allow_unused=True)
            inner = 0.0
            for g, (a, b) in zip(grads, adjoints):
                if g is not None:
                    inner = inner + g.mul(b - lr * a).sum()
            self.engine.optimizer.zero_grad(set_to_none=False)
            inner.backward()
            for p, (a, b) in zip(self.theta, adjoints):
                direction = b - lr * a
                hessian_term = p.grad if p.grad is not None else torch.zeros_like(p)
                a.copy_(a + weight_decay * direction + hessian_term)
                b.copy_(momentum * direction)
        self.snapshots = []  # rollback: the first snapshot stays restored

    def _lookahead_and_replay(self, x, y):
        """The T matching steps and the CE step taken and recorded, the final CE's backward,
        then the replay: the meta-networks' ``.grad`` hold the hypergradient."""
        engine = self.engine
        optimizer = engine.optimizer
        self._grads_as_in_torch_1_0()
        for _ in range(engine.inner_steps):
            optimizer.zero_grad(set_to_none=False)
            self._recorded_step(self.inner_objective, x, y, True)
        optimizer.zero_grad(set_to_none=False)
        self._recorded_step(self.outer_objective, x, y)
        optimizer.zero_grad(set_to_none=False)
        engine.meta_optimizer.zero_grad(set_to_none=False)
        self.outer_objective(x, y).backward()
        self._meta_backward()

    def iteration(self, x, y):
        """One training iteration: the real step, the lookahead, the replay, Adam's step."""
        engine = self.engine
        optimizer, meta_optimizer = engine.optimizer, engine.meta_optimizer
        engine.target_model.train()
        optimizer.zero_grad(set_to_none=False)
        self.inner_objective(x, y).backward()
        optimizer.step()
        self._lookahead_and_replay(x, y)
        meta_optimizer.step()
        engine.iteration += 1

    def hypergradient(self, x, y):
        """The meta-networks' gradients of the paper's replay at the current state, which
        it leaves as it was (``{name: tensor}``, like ``L2TWW.hypergradient``)."""
        engine = self.engine
        optimizer = engine.optimizer
        was_training = engine.target_model.training
        engine.target_model.train()
        self._lookahead_and_replay(x, y)
        optimizer.zero_grad(set_to_none=True)
        engine.target_model.train(was_training)
        result = {name: p.grad.clone() for name, p in engine._meta_named}
        engine.meta_optimizer.zero_grad(set_to_none=True)
        return result

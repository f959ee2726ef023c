"""Where trained networks lie in parameter space: distances between them, the loss along the
straight line from one to another (is there a barrier, or do they share a basin?), and how
critical each module's training was (Chatterji, Neyshabur and Sedghi, "The intriguing role
of module criticality in the generalization of deep networks", ICLR 2020).

``data`` is everywhere either ``(images, labels)`` tensors or an iterable of ``(x, y)``
batches; networks are evaluated in eval mode, with their modes restored.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

EVAL_BATCH = 256


def _batches(data):
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        images, labels = data
        if len(images) != len(labels):
            raise ValueError(f"data has {len(images)} images but {len(labels)} labels")
        return [(images[i:i + EVAL_BATCH], labels[i:i + EVAL_BATCH])
                for i in range(0, len(images), EVAL_BATCH)]
    return data


@torch.no_grad()
def loss_and_accuracy(model, data):
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``data`` (eval mode)."""
    flags = [m.training for m in model.modules()]
    model.eval()
    loss = correct = total = 0.0
    try:
        for x, y in _batches(data):
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
    finally:
        for module, flag in zip(model.modules(), flags):
            module.training = flag
    if not total:
        raise ValueError("data holds no samples")
    return loss / total, correct / total


def _check_same_architecture(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    if state_a.keys() != state_b.keys():
        only = sorted(set(state_a) ^ set(state_b))[:5]
        raise ValueError(f"a and b are not one architecture: their states differ in "
                         f"{only}")
    for name, tensor in state_a.items():
        if tensor.shape != state_b[name].shape:
            raise ValueError(f"a and b are not one architecture: {name} is "
                             f"{tuple(tensor.shape)} in a but {tuple(state_b[name].shape)} "
                             f"in b")
    return state_a, state_b


def top_modules(model):
    """Names of the top-level children that hold parameters (stem, stages, head)."""
    return [name for name, child in model.named_children()
            if any(True for _ in child.parameters())]


def _module_of(parameter_name, modules):
    for module in modules:
        if parameter_name == module or parameter_name.startswith(module + "."):
            return module
    return None


@torch.no_grad()
def parameter_distance(a, b, modules=None):
    """The l2 distance between the parameters of two networks of one architecture:
    ``{"total": float, "modules": {name: float}}``, per module of ``modules`` (default: the
    top-level children with parameters); buffers (BatchNorm statistics) do not count."""
    _check_same_architecture(a, b)
    modules = top_modules(a) if modules is None else list(modules)
    known = dict(a.named_modules())
    for name in modules:
        if name not in known:
            raise ValueError(f"module {name!r} is not a module of {type(a).__name__}")
    squares = dict.fromkeys(modules, 0.0)
    total = 0.0
    parameters_b = dict(b.named_parameters())
    for name, parameter in a.named_parameters():
        square = (parameter.double() - parameters_b[name].double()).square().sum().item()
        total += square
        module = _module_of(name, modules)
        if module is not None:
            squares[module] += square
    return {"total": math.sqrt(total),
            "modules": {name: math.sqrt(value) for name, value in squares.items()}}


def _interpolated_state(state_a, state_b, t):
    """``(1 - t) a + t b`` of every floating-point tensor; others (BatchNorm's batch
    counters) are a's."""
    return {name: torch.lerp(value, state_b[name], t) if value.is_floating_point() else value
            for name, value in state_a.items()}


def barrier(values):
    """The largest rise of ``values`` (along evenly spaced points from one end to the other)
    above the straight chord between its ends; 0 when the curve stays below the chord."""
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"a barrier needs at least 2 points, got {len(values)}")
    last = len(values) - 1
    return max(0.0, max(v - ((1 - i / last) * values[0] + i / last * values[-1])
                        for i, v in enumerate(values)))


@torch.no_grad()
def interpolation(a, b, data, points=11, progress=False):
    """Loss and accuracy on ``data`` of the networks ``(1 - t) a + t b`` for ``points``
    values of t from 0 (``a``) to 1 (``b``); the whole state moves, BatchNorm statistics
    included. Returns ``{"t", "loss", "accuracy", "loss_barrier", "error_barrier"}``, the
    barriers being the largest rise of loss and of error (1 - accuracy) above the chord
    between the ends (near 0: the two networks share a basin)."""
    from tqdm.auto import tqdm

    if not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2, got {points!r}")
    state_a, state_b = _check_same_architecture(a, b)
    network = copy.deepcopy(a)
    data = _batches(data)
    ts = [i / (points - 1) for i in range(points)]
    losses, accuracies = [], []
    for t in tqdm(ts, desc="interpolation", unit="point", disable=not progress, leave=False):
        network.load_state_dict(_interpolated_state(state_a, state_b, t))
        loss, accuracy = loss_and_accuracy(network, data)
        losses.append(loss)
        accuracies.append(accuracy)
    return {"t": ts, "loss": losses, "accuracy": accuracies,
            "loss_barrier": barrier(losses),
            "error_barrier": barrier([1 - accuracy for accuracy in accuracies])}


@torch.no_grad()
def module_criticality(model, initial, data, modules=None, alphas=(0.0, 0.25, 0.5, 0.75, 1.0),
                       sigmas=(0.05, 0.1, 0.2, 0.4, 0.8), epsilon=0.05, draws=1, seed=0,
                       progress=False):
    """Module criticality (Chatterji et al. 2020) of each module of a trained ``model``
    against its ``initial`` weights (same architecture).

    For module i, its state is moved to ``theta_0 + alpha (theta_F - theta_0)`` (alpha = 1:
    trained, 0: rewound to the initial weights; BatchNorm statistics move with it) and
    Gaussian noise of standard deviation sigma is added to its parameters, the rest of the
    network staying trained. ``sigmas`` are relative to the root-mean-square of the module's
    trained parameters (one scale per module, so that one grid fits every module); the
    measure uses the absolute sigma:

        criticality_i = min over the grid of alpha^2 ||theta_F - theta_0||^2 / sigma^2
                        where the mean error over ``draws`` noise draws <= base + epsilon

    with ``base`` the trained network's own error on ``data`` (on training data where that
    is 0, the paper's threshold). Returns ``{"alphas", "sigmas", "epsilon",
    "base_error", "modules": {name: {"error": [sigma][alpha] grid, "criticality": float or
    None (no grid point stays within epsilon), "distance", "sigma_scale"}}}``.
    """
    from tqdm.auto import tqdm

    state_final, state_initial = _check_same_architecture(model, initial)
    alphas, sigmas = [float(a) for a in alphas], [float(s) for s in sigmas]
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"alphas must be numbers in [0, 1], got {alphas}")
    if not sigmas or any(not s > 0 for s in sigmas):
        raise ValueError(f"sigmas must be numbers > 0, got {sigmas}")
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    modules = top_modules(model) if modules is None else list(modules)
    data = _batches(data)
    _, base_accuracy = loss_and_accuracy(model, data)
    base_error = 1 - base_accuracy
    network = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    parameter_names = {name for name, _ in model.named_parameters()}
    results = {}
    steps = len(modules) * len(alphas) * len(sigmas) * draws
    with tqdm(total=steps, desc="criticality", unit="eval", disable=not progress,
              leave=False) as bar:
        for module in modules:
            names = [name for name in state_final
                     if _module_of(name, [module]) and state_final[name].is_floating_point()]
            parameters = [name for name in names if name in parameter_names]
            if not parameters:
                raise ValueError(f"module {module!r} has no parameters")
            squared = sum((state_final[n].double() - state_initial[n].double()).square().sum()
                          for n in parameters).item()
            count = sum(state_final[n].numel() for n in parameters)
            scale = math.sqrt(sum(state_final[n].double().square().sum()
                                  for n in parameters).item() / count)
            grid, best = [], None
            for sigma in sigmas:
                row = []
                for alpha in alphas:
                    errors = []
                    for _ in range(draws):
                        state = dict(state_final)
                        for name in names:
                            moved = torch.lerp(state_initial[name], state_final[name], alpha)
                            if name in parameters:
                                noise = torch.randn(moved.shape, generator=generator)
                                moved = moved + sigma * scale * noise.to(moved)
                            state[name] = moved
                        network.load_state_dict(state)
                        errors.append(1 - loss_and_accuracy(network, data)[1])
                        bar.update(1)
                    error = sum(errors) / draws
                    row.append(error)
                    if error <= base_error + epsilon:
                        measure = alpha ** 2 * squared / (sigma * scale) ** 2
                        best = measure if best is None else min(best, measure)
                grid.append(row)
            results[module] = {"error": grid, "criticality": best,
                               "distance": math.sqrt(squared), "sigma_scale": scale}
    return {"alphas": alphas, "sigmas": sigmas, "epsilon": epsilon, "base_error": base_error,
            "modules": results}

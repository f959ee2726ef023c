"""The reference backend: the per-channel errors of docs/SPEC.md section 1, written plainly.

It materialises every projection and resized source map, which is exactly what the
compiled backends avoid; autograd gives its gradients and double gradients.
"""
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad


def channel_errors(source, target, weight, bias, pair_source, pair_target):
    """E[b, c] = mean_hw (S~ - W T - b)^2 for every pair, packed as [B, sum_i Cs_i].

    Half-precision inputs are computed in float32, as the GPU backends accumulate.
    """
    columns = []
    for w, b, m, n in zip(weight, bias, pair_source, pair_target):
        s, t = source[m], target[n]
        if s.dtype in (torch.float16, torch.bfloat16):
            s, t, w, b = s.float(), t.float(), w.float(), b.float()
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        projection = torch.einsum("ck,bkhw->bchw", w, t) + b[:, None, None]
        columns.append((s - projection).pow(2).mean(dim=(2, 3)))
    return torch.cat(columns, dim=1)


def channel_errors_jvp(source, target, weight, bias, pair_source, pair_target, tangent_target,
                       tangent_weight, tangent_bias):
    """The errors' derivative along the tangents, by forward-mode AD of ``channel_errors``."""
    with forward_ad.dual_level():
        def dual(primals, tangents):
            return [p if v is None else forward_ad.make_dual(p, v)
                    for p, v in zip(primals, tangents)]
        errors = channel_errors(source, dual(target, tangent_target),
                                dual(weight, tangent_weight), dual(bias, tangent_bias),
                                pair_source, pair_target)
        tangent = forward_ad.unpack_dual(errors).tangent
    return torch.zeros_like(errors) if tangent is None else tangent


def channel_errors_vjp(grad_errors, source, target, weight, bias, pair_source, pair_target):
    """Gradients of ``<grad_errors, E>`` in target, weight and bias, by autograd through
    ``channel_errors``; differentiable when grad mode is on.

    Autograd differentiates in aliases of the inputs: target maps may be computed from one
    another (stages of one network), and differentiating in the maps themselves would run,
    and free, the network's graph between them.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
                  for t in (*target, *weight, *bias)]
        errors = channel_errors(source, inputs[:len(target)],
                                inputs[len(target):len(target) + len(weight)],
                                inputs[len(target) + len(weight):], pair_source, pair_target)
        grads = torch.autograd.grad(errors, inputs, grad_errors, create_graph=create_graph,
                                    allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return (grads[:len(target)], grads[len(target):len(target) + len(weight)],
            grads[len(target) + len(weight):])

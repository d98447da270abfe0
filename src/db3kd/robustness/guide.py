"""Student-guided directions: where a model that imitates the teacher crosses into class t, the teacher often
does too.

A guide is one of our own models (a student trained on the teacher's labels), never the teacher: its
gradients are ours to read. For each (x, t) it walks from x along the normalised gradient of its margin
z_t - max_{j != t} z_j until it labels the point t; the direction to that point is an adversarial direction
of the guide, which usually transfers to the teacher, and often crosses the teacher's boundary nearer to x
than any direction built from reference samples (benchmarks/guided_search.py, MNIST: BD's median distance at
20 queries per pair 3.57 with a guide, 3.93 without; MBD's at 250 queries 2.78 with one, as at 500 without).
BD searches that direction first (`Chunk.guide`); MBD starts from BD.
"""

from __future__ import annotations

import torch

from ..errors import InputError

STEPS = 40  # gradient steps per pair at most
STEP = 1 / 24  # each step's length, as a fraction of the distance to the nearest class-t reference


def check_guide(guide: torch.nn.Module, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """`guide` if it maps a batch of `input_shape` images to `num_classes` scores."""
    if not isinstance(guide, torch.nn.Module):
        raise InputError(f"expected the guide as a torch.nn.Module (a student of the teacher), got {type(guide).__name__}")
    device = next(guide.parameters()).device
    with torch.no_grad():
        out = guide.eval()(torch.zeros(1, *input_shape, device=device))
    if tuple(out.shape) != (1, num_classes):
        raise InputError(f"the guide maps a {tuple(input_shape)} image to {tuple(out.shape[1:])} scores; expected "
                         f"{num_classes}, one per teacher class")
    return guide


def guided_points(guide: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                  bounds: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(points, distances): for each x the first point of the guide's gradient walk that it labels `target`,
    and its L2 distance from x (inf where the walk never got there). `scale` (P,) sets each pair's step."""
    device = next(guide.parameters()).device
    lo, hi = bounds
    start = x.to(device)
    t = target.to(device)
    step = (scale.to(device).float() * STEP).clamp_min(1e-6)[:, None]
    walk = start.clone()
    points = start.clone()
    distance = torch.full((len(x),), float("inf"), dtype=torch.float64, device=device)
    active = torch.isfinite(step[:, 0]).nonzero().flatten()
    with torch.enable_grad():  # a caller's inference mode does not reach the guide's gradients
        for _ in range(STEPS):
            if not len(active):
                break
            xa = walk[active].detach().requires_grad_(True)
            scores = guide(xa)
            rows = torch.arange(len(active), device=device)
            others = scores.detach().clone()
            others[rows, t[active]] = -float("inf")
            margin = scores[rows, t[active]] - scores.gather(1, others.argmax(dim=1, keepdim=True))[:, 0]
            (grad,) = torch.autograd.grad(margin.sum(), xa)
            reached = margin.detach() > 0
            done = active[reached]
            points[done] = xa.detach()[reached]
            distance[done] = (xa.detach()[reached] - start[done]).flatten(1).norm(dim=1).double()
            keep = ~reached
            active, xa, grad = active[keep], xa.detach()[keep], grad[keep]
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))
            walk[active] = (xa + step[active].view(-1, *([1] * (grad.ndim - 1))) * grad / norm).clamp(lo, hi)
    return points.cpu(), distance.cpu()

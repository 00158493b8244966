"""TorchDEQ-compatible utilities: Jacobian regularisation, spectral radius, fixed-point correction,
mixed initialisation. Same names, arguments and results as ``torchdeq`` 0.1.0, with its failures
fixed (noted per function)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

__all__ = ["jac_reg", "power_method", "fp_correction", "mixed_init", "register_weight_func"]


def _as_list(x: Any, name: str) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (tuple, list)) and x and all(torch.is_tensor(t) for t in x):
        return list(x)
    raise ValueError(f"{name} must be a tensor or a non-empty tuple/list of tensors, "
                     f"got {type(x).__name__}")


def jac_reg(f0: Any, z0: Any, vecs: int = 1, create_graph: bool = True) -> torch.Tensor:
    """Hutchinson estimate of ``||J||_F^2 / numel(z0)`` with ``J = df0/dz0``.

    ``E_v ||v^T J||^2 = tr(J J^T) = ||J||_F^2`` for ``v ~ N(0, I)``. With ``create_graph=True``
    the result is differentiable (train on it). ``f0``/``z0`` may be tuples of tensors (MDEQ).

    Args:
        f0: ``f(z0)``, tensor ``(B, ...)`` computed from ``z0`` with autograd tracking.
        z0: tensor ``(B, ...)`` that requires grad (or a tuple/list of them).
        vecs: number of random probe vectors (>= 1).
        create_graph: keep the graph of the estimate (needed to back-propagate through it).

    Returns:
        Scalar tensor (0-dim).

    Example:
        >>> W = torch.randn(8, 8) / 8
        >>> z = torch.randn(4, 8, requires_grad=True); f = torch.tanh(z @ W)
        >>> loss = f.square().mean()
        >>> loss = loss + 0.1 * jac_reg(f, z)
        >>> loss.backward(); z.grad.shape
        torch.Size([4, 8])
    """
    fs, zs = _as_list(f0, "f0"), _as_list(z0, "z0")
    if not isinstance(vecs, int) or vecs < 1:
        raise ValueError(f"vecs must be a positive int, got {vecs!r}")
    if not all(z.requires_grad for z in zs):
        raise ValueError("z0 must require grad (f0 must be computed from it)")
    numel = sum(z.numel() for z in zs)
    result = 0
    for _ in range(vecs):
        v = [torch.randn_like(f) for f in fs]
        vj = torch.autograd.grad(fs, zs, v, retain_graph=True, create_graph=create_graph,
                                 allow_unused=True)
        result = result + sum((g * g).sum() for g in vj if g is not None)
    return result / (vecs * numel)


def power_method(f0: Any, z0: Any, n_iters: int = 100) -> tuple[Any, torch.Tensor]:
    """Per-sample spectral radius of ``J = df0/dz0`` by power iteration on ``v -> v^T J``.

    The estimate is the geometric mean of the growth ``||v_k^T J|| / ||v_k||`` over the second half
    of the iterations: it equals ``|lambda_max|`` once ``v`` is the dominant (left) eigenvector,
    and unlike TorchDEQ's Rayleigh quotient it also converges to the spectral radius when the
    dominant eigenvalues are a complex pair. A zero vector-Jacobian product gives 0, not NaN.

    Args:
        f0: ``f(z0)``, tensor ``(B, ...)`` (or tuple/list) computed from ``z0``.
        z0: tensor ``(B, ...)`` requiring grad (or tuple/list); samples are independent.
        n_iters: number of vector-Jacobian products (>= 1).

    Returns:
        ``(eigenvector, sradius)``: the last unit iterate (shaped like ``z0``) and a ``(B,)`` tensor.

    Example:
        >>> W = torch.diag(torch.tensor([0.5, -0.9, 0.1]))     # spectral radius 0.9
        >>> f = lambda z: z @ W
        >>> z_star = torch.zeros(2, 3)                          # the fixed point of f
        >>> z = z_star.detach().requires_grad_(); _, rho = power_method(f(z), z, n_iters=50)
        >>> rho.round(decimals=3)
        tensor([0.9000, 0.9000])
    """
    fs, zs = _as_list(f0, "f0"), _as_list(z0, "z0")
    if not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be a positive int, got {n_iters!r}")
    bsz = zs[0].shape[0] if zs[0].dim() >= 1 else 1

    def flat(ts):
        return torch.cat([t.reshape(bsz, -1) for t in ts], dim=1)

    def unflat(v, like):
        out, i = [], 0
        for t in like:
            n = t.numel() // bsz
            out.append(v[:, i:i + n].reshape(t.shape))
            i += n
        return out

    v = torch.randn_like(flat(fs))
    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    log_growth = torch.zeros(bsz, dtype=v.dtype, device=v.device)
    counted = 0
    first_counted = n_iters // 2
    with torch.no_grad():
        for i in range(n_iters):
            with torch.enable_grad():
                vj = torch.autograd.grad(fs, zs, unflat(v, fs), retain_graph=True,
                                         allow_unused=True)
            vj = flat([g if g is not None else torch.zeros_like(z) for g, z in zip(vj, zs)])
            norm = vj.norm(dim=1)
            if i >= first_counted:
                log_growth += torch.log(norm)
                counted += 1
            v = torch.where((norm > 0)[:, None], vj / norm.clamp_min(1e-300)[:, None], v)
    sradius = torch.exp(log_growth / counted)
    vec = unflat(v, zs)
    return (vec[0] if torch.is_tensor(z0) else type(z0)(vec)), sradius


def _linear(n, k, gamma=0.9, bias=0.0, **_):
    return 1 - (n - k - 1) / n * gamma + bias


def _exp(n, k, gamma=0.8, **_):
    return gamma ** (n - k - 1)


def _const(n, k, c=1.0, **_):
    return c


_WEIGHT_FUNCS: dict[str, Callable[..., float]] = {"exp": _exp, "linear": _linear, "const": _const}


def register_weight_func(name: str, func: Callable[..., float]) -> None:
    """Register ``func(n, k, **kwargs) -> float`` as a weight function for :func:`fp_correction`."""
    if not callable(func):
        raise ValueError(f"func must be callable, got {type(func).__name__}")
    _WEIGHT_FUNCS[name] = func


def fp_correction(crit: Callable, args: Sequence[Any], weight_func: str | Callable = "exp",
                  return_loss_values: bool = False, **kwargs: Any):
    """Fixed-point correction: weighted sum of ``crit`` over a sequence converging to ``z*``.

    ``loss = sum_k w(n, k) * crit(args_0[k], args_1[k], ...)`` where entries of ``args`` that are
    not lists (e.g. the target) are broadcast; weights ``'exp'``: ``gamma^(n-k-1)``
    (``gamma=0.8``), ``'linear'``: ``1 - (n-k-1)/n * gamma + bias`` (``gamma=0.9``), ``'const'``:
    ``c`` (TorchDEQ's ``'const'`` returns a CUDA tensor and fails on CPU; here a float).

    Args:
        crit: loss function.
        args: arguments of ``crit``; lists/tuples are indexed (cyclically), others broadcast.
        weight_func: a registered name or a callable ``(n, k, **kwargs) -> float``.
        return_loss_values: also return the list of per-term loss values (floats).
        **kwargs: passed to the weight function (``gamma``, ``bias``, ``c``).

    Returns:
        The loss tensor, and the list of term values when ``return_loss_values``.

    Example:
        >>> target = torch.zeros(3)
        >>> z_out = [torch.full((3,), 2.0), torch.full((3,), 1.0)]   # states of a solve, last ~ z*
        >>> loss = fp_correction(torch.nn.functional.mse_loss, (z_out, target), gamma=0.8)
        >>> loss                                                      # 0.8 * 4 + 1 * 1
        tensor(4.2000)
    """
    if callable(weight_func):
        wf = weight_func
    elif weight_func in _WEIGHT_FUNCS:
        wf = _WEIGHT_FUNCS[weight_func]
    else:
        raise ValueError(f"weight_func must be one of {sorted(_WEIGHT_FUNCS)} or callable, "
                         f"got {weight_func!r}")
    seqs = [a if isinstance(a, (list, tuple)) else [a] for a in args]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("args must not contain empty lists")
    n = max(len(s) for s in seqs)
    loss, values = 0.0, []
    for k in range(n):
        term = crit(*[s[k % len(s)] for s in seqs])
        loss = loss + wf(n, k, **kwargs) * term
        if return_loss_values:
            values.append(float(term))
    return (loss, values) if return_loss_values else loss


def mixed_init(z_shape: Sequence[int], device: Any = None, dtype: torch.dtype | None = None
               ) -> torch.Tensor:
    """Standard normal values with half of the entries zeroed (Bernoulli(0.5) mask).

    From "Path Independent Equilibrium Models Can Better Exploit Test-Time Computation".

    Args:
        z_shape: shape of the state, e.g. ``(B, C, H, W)``.
        device: device of the result (the mask is drawn there too).
        dtype: dtype of the result (default: torch's default dtype).

    Returns:
        Tensor of shape ``z_shape``.

    Example:
        >>> z0 = mixed_init((8, 64, 16, 16), device="cpu")    # or device="cuda"
        >>> z0.shape, 0.45 < (z0 == 0).float().mean().item() < 0.55
        (torch.Size([8, 64, 16, 16]), True)
    """
    z = torch.randn(*z_shape, device=device, dtype=dtype)
    return z * torch.empty_like(z).bernoulli_(0.5)

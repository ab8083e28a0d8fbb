"""Reading a norm's parameters off the live module by probing it, whatever its class.

Every norm here computes gamma * (x - [mean x]) * s + beta with s = 1/sqrt(var + eps); what differs
is how gamma is parametrised (w, 1 + w in Gemma, none in OLMo) and whether the mean is removed.
Probing a bare float64 copy finds all of it without knowing the class.
"""

from __future__ import annotations

import copy

import torch


def bare_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A leaf module's own forward, without hooks or an instance-level wrapper (nnsight's)."""
    return type(module).forward(module, x)


def norm_eps(norm: torch.nn.Module, probe: torch.nn.Module | None = None, d_model: int = 0) -> float:
    """The norm's epsilon: its attribute, or, for norms that hard-code it (OLMo), measured.

    With u of mean 0 and variance 1, N(c u) - beta = gamma u c / sqrt(c^2 + eps); the ratio r of the
    outputs at c = 1 and a small c gives eps = c^2 (1 - r^2) / (r^2 c^2 - 1), whatever gamma is.
    """
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, float):
            return value
    if probe is None:
        raise AttributeError(f"cannot find the epsilon of {type(norm).__name__}")
    u = torch.ones(d_model, dtype=torch.float64)
    u[1::2] = -1.0
    c = 1e-3
    with torch.no_grad():
        beta = probe(torch.zeros(1, d_model, dtype=torch.float64))[0].double()
        big = probe(u[None])[0].double() - beta
        small = probe(c * u[None])[0].double() - beta
    keep = small.abs() > 0
    r2 = float(((big[keep] / small[keep]) ** 2).median())
    return c * c * (1 - r2) / (r2 * c * c - 1)


def is_identity(probe: torch.nn.Module, d_model: int) -> bool:
    """Whether a bare float64 norm returns its input unchanged (ModernBERT's first attention norm is
    ``nn.Identity``): two inputs of different mean and size both come back as they went in. Such a
    norm has gamma 1, beta 0, no centring and scale 1, which no epsilon can express."""
    x = torch.linspace(-2.0, 3.0, d_model, dtype=torch.float64)[None]
    with torch.no_grad():
        return all(bool(torch.equal(probe(v).double(), v)) for v in (x, 5.0 * x + 1.0))


def probe_norm(norm: torch.nn.Module, d_model: int) -> dict:
    """gamma, beta, whether it centres and eps, read off the norm by probing a float64 copy; an
    identity comes back as ``identity: True`` (gamma 1, beta 0, no centring, scale 1, eps 0).

    N(0) = beta; a constant input vanishes under centring; an alternating +-1 input has mean 0 and
    variance 1 under either kind.
    """
    probe = copy.deepcopy(norm).double().eval()
    for module in probe.modules():  # the copy must run bare: no user hooks, no nnsight controller
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module.__dict__.pop("forward", None)
        module.__dict__.pop("__nnsight__", None)
    if is_identity(probe, d_model):
        return {"gamma": torch.ones(d_model), "beta": torch.zeros(d_model), "center": False, "eps": 0.0,
                "identity": True}
    eps = norm_eps(norm, probe, d_model)
    with torch.no_grad():
        beta = probe(torch.zeros(1, d_model, dtype=torch.float64))[0].double()
        const = probe(torch.ones(1, d_model, dtype=torch.float64))[0].double()
        u = torch.ones(d_model, dtype=torch.float64)
        u[1::2] = -1.0
        if d_model % 2:
            u[-1] = 0.0
        var = float((u ** 2).mean())
        y = probe(u[None])[0].double()
        center = bool(torch.allclose(const, beta, atol=1e-6))
        scale = 1.0 / (var + eps) ** 0.5
        gamma = torch.where(u != 0, (y - beta) / (u * scale), torch.ones_like(u))
    return {"gamma": gamma.float(), "beta": beta.float(), "center": center, "eps": eps}


__all__ = ["probe_norm", "norm_eps", "bare_forward", "is_identity"]

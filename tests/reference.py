"""Float64 reference for the fused ops, written for readability: full logits and log_softmax."""

import torch


def full_logits(hidden, weight, bias=None, *, temperature=1.0, softcap=None):
    """The logits the ops compute, in the operands' dtype: ``hidden @ weight.T + bias``, soft-capped to
    ``softcap * tanh(. / softcap)`` when ``softcap`` is given, then divided by ``temperature``."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def reference_token_kl(hidden, weight, targets, ref_hidden=None, ref_weight=None, *, bias=None, ref_bias=None,
                       temperature=1.0, ignore_index=-100, softcap=None):
    """Per-position (logp, ref_logp, kl_forward, kl_reverse) in float64; 0 at ignored positions.

    Differentiable w.r.t. the float64 leaves passed in; callers upcast before calling.
    """
    log_p = torch.log_softmax(full_logits(hidden, weight, bias, temperature=temperature, softcap=softcap), dim=-1)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)
    logp = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) * keep
    if ref_hidden is None:
        return logp
    log_q = torch.log_softmax(
        full_logits(ref_hidden, ref_weight, ref_bias, temperature=temperature, softcap=softcap), dim=-1
    )
    ref_logp = log_q.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) * keep
    kl_forward = (log_q.exp() * (log_q - log_p)).sum(-1) * keep  # KL(pi_ref || pi_theta)
    kl_reverse = (log_p.exp() * (log_p - log_q)).sum(-1) * keep  # KL(pi_theta || pi_ref)
    return logp, ref_logp, kl_forward, kl_reverse


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute when expected is all zeros)."""
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff

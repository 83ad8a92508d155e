"""Long rows: the loss and every metric against float64 for T in {2048, 8192}, each preset, with the live
reference and with a PrecomputedReference (docs/design.md section 5).

A dense row sums about T log V of log-probs. Each case checks three things:

1. The reductions are exact: the loss and each metric equal, within one fp32 ulp (their single final
   rounding is off by half of one at most), the same equations evaluated in float64 on the very per-token
   values the loss reduced (captured from it).
2. End to end, our error against the float64 full-logits reference is no larger than the eager fp32
   full-logits path's error on the same inputs, plus ``tolerance()``: two fp32 ulps of the value, and four
   standard deviations of the error that fp32 per-token values bring in. Both paths hand fp32 per-token
   log-probs to their sums, each rounded at its own magnitude, so both errors are random walks of the
   same size over the tokens, and which of the two lands closer on a given draw is chance; the floor is
   derived from arithmetic (unit roundoff times each token's magnitude, through the equations' own
   derivatives), not from the errors observed. The fp32 per-row sums this file was written against
   (sums of logp and of ref_logp, subtracted) missed check 1 by up to 5e4 ulps and check 2 by up to 230x.
3. The loss is finite, and the gradients w.r.t. hidden states and head agree with float64 (see GRAD_RTOL).

V and d are small (the error comes from the length, not the vocabulary), so the file runs in seconds.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import firempo_kernels.losses as losses_module
from firempo_kernels import LOSS_PRESETS, FiReMPOLoss, PrecomputedReference
from test_losses import DEFAULTS, IGNORE, reference_metrics, reference_terms

UNIT_ROUNDOFF = 2.0**-24  # fp32: a rounding is off by at most this, relative
ULP = 2.0**-23  # fp32: one ulp is at most this, relative
# Errors of a per-token fp32 value, in units of UNIT_ROUNDOFF * (|logp| + |ref_logp|) of that token: one
# rounding at the magnitude of the log-probs. (Measured on log-ratios: ~0.5 for the fused op, ~0.6 for eager
# fp32; the final rounding of each value alone is ~0.3.)
# FLOOR_SIGMAS standard deviations of the resulting random walk keep a chance draw from failing a case.
FLOOR_SIGMAS = 4.0
# The gradient's error, relative to its largest entry: dW sums up to 8 * 8192 token contributions in fp32,
# whose rounding errors grow like sqrt(K) * UNIT_ROUNDOFF (about 1.5e-5 at K = 65536); per-token gradients
# carry a few roundings more. Measured: at most 5e-6, eager fp32 6e-6; a wrong term is off by O(1).
GRAD_RTOL = 1e-4

SHAPES = {2048: (256, 32), 8192: (64, 16)}  # T -> (V, d)
PRESETS = tuple(LOSS_PRESETS)
NUM_EXAMPLES = 2


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------
def make_long_batch(seed, preset, seq_len):
    """B = 2 examples of long rows; a prompt of T/8 ignored positions, right padding, logits of standard
    deviation ~2, and a reference close to the policy (as early in training): per-token log-ratios of
    ~0.1, so that beta * (Delta(y+) - Delta(y-)) is O(1) and the loss responds to Delta. ``dpo`` weights
    every response token by 1; the others weight ~40% of them by U[0.5, 1.5]. ``firempo`` has the (v', .)
    rows, with c = (True, False)."""
    gen = torch.Generator().manual_seed(seed)
    vocab, d = SHAPES[seq_len]
    k = 4 if preset == "firempo" else 2
    rows = k * NUM_EXAMPLES
    scale = 2.0 / math.sqrt(d)
    weight = scale * torch.randn(vocab, d, generator=gen)
    ref_weight = weight + 0.02 * scale * torch.randn(vocab, d, generator=gen)
    hidden = torch.randn(rows, seq_len, d, generator=gen)
    ref_hidden = hidden + 0.05 * torch.randn(rows, seq_len, d, generator=gen)

    labels = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    lengths = torch.randint(3 * seq_len // 4, seq_len + 1, (rows, 1), generator=gen)
    position = torch.arange(seq_len)[None, :]
    labels[(position < seq_len // 8) | (position >= lengths)] = IGNORE
    response = labels != IGNORE
    if preset == "dpo":
        span_weights = response.float()
    else:
        span = response & (torch.rand(rows, seq_len, generator=gen) < 0.4)
        span_weights = torch.where(span, 0.5 + torch.rand(rows, seq_len, generator=gen), 0.0)
    return {
        "weight": weight.requires_grad_(), "ref_weight": ref_weight, "hidden": hidden.requires_grad_(),
        "ref_hidden": ref_hidden, "labels": labels, "span_weights": span_weights,
        "c": torch.tensor([True, False]) if k == 4 else None,
    }


# ------------------------------------------------------------------------------------------------------
# The equations on per-token values, in float64
# ------------------------------------------------------------------------------------------------------
def terms_from_tokens(logp, ref_logp, kl_forward, kl_reverse, tokens, c, *, pairing="reversed",
                      beta, alpha, gamma, lambda_, **_):
    """The ``reference_terms`` of a batch from its span tokens' values (each [S], gather order), float64."""
    b, k = tokens.num_examples, tokens.num_blocks
    w = tokens.weights.double()

    def row_sums(x):
        return torch.zeros(k * b, dtype=torch.float64).index_add(0, tokens.rows, x)

    delta = row_sums(w * (logp - ref_logp))
    d = delta.reshape(k, b)
    rank = -F.logsigmoid(beta * (d[0] - d[1]))
    visual = torch.zeros_like(rank)
    if c is not None and gamma > 0:
        margin = {"reversed": d[3] - d[2], "same_response": d[0] - d[2], "cross": d[0] - d[3]}[pairing]
        visual = -gamma * c.double() * F.logsigmoid(beta * margin)
    first = torch.where(tokens.rows < b, w, 0.0)  # the KL is taken at the (v, y+) tokens only
    kl_f, kl_r = row_sums(first * kl_forward)[:b], row_sums(first * kl_reverse)[:b]
    kl = lambda_ * kl_f + (1 - lambda_) * kl_r
    return {
        "delta": delta, "logps": row_sums(w * logp), "rank": rank, "visual": visual,
        "kl_forward": kl_f, "kl_reverse": kl_r, "kl": kl, "loss": (rank + visual + alpha * kl).mean(),
    }


def quantities(terms, span_weights, c, hp):
    """The loss and the metrics, by name."""
    return {"loss": terms["loss"], **reference_metrics(terms, span_weights, c, **hp)}


def tolerance(values, tokens, batch, hp):
    """name -> what fp32 per-token values allow: ``FLOOR_SIGMAS`` standard deviations of the random walk of
    their independent errors, each of standard deviation UNIT_ROUNDOFF * (|logp| + |ref_logp|), pushed
    through the derivatives of the equations; plus 2 ulps of the value for the final roundings."""
    leaves = [x.detach().double().requires_grad_() for x in values]
    terms = terms_from_tokens(*leaves, tokens, batch["c"], **hp)
    per_token_error = UNIT_ROUNDOFF * (leaves[0].detach().abs() + leaves[1].detach().abs())
    out = {}
    for name, value in quantities(terms, batch["span_weights"], batch["c"], hp).items():
        sigma = 0.0
        if value.requires_grad:
            for g in torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True):
                if g is not None:
                    sigma += float(((g * per_token_error) ** 2).sum())
        out[name] = FLOOR_SIGMAS * math.sqrt(sigma) + 2 * ULP * abs(float(value.detach()))
    return out


# ------------------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference", ["live", "precomputed"])
@pytest.mark.parametrize("seq_len", sorted(SHAPES))
@pytest.mark.parametrize("preset", PRESETS)
def test_long_rows_as_accurate_as_eager_fp32(monkeypatch, one_thread, preset, seq_len, reference):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    where = f"seed={seed} preset={preset} T={seq_len} reference={reference}"
    batch = make_long_batch(seed, preset, seq_len)
    hp = {**DEFAULTS, **LOSS_PRESETS[preset]}
    loss_fn = FiReMPOLoss.from_preset(preset)

    captured = []  # what the reductions read: the span tokens and their per-token values
    real_evaluate_head = losses_module._evaluate_head

    def evaluate_head(fn, hp_, tokens, *args):
        values = real_evaluate_head(fn, hp_, tokens, *args)
        captured.append((tokens, values))
        return values

    monkeypatch.setattr(losses_module, "_evaluate_head", evaluate_head)
    ref = batch["ref_hidden"]
    if reference == "precomputed":
        ref = PrecomputedReference.from_reference_forward(
            batch["ref_weight"], batch["ref_hidden"], batch["labels"], batch["span_weights"], batch["c"],
            keep_hidden=loss_fn.needs_reference_hidden,
        )
    out = loss_fn(batch["weight"], batch["hidden"], ref, batch["labels"], batch["span_weights"], batch["c"],
                  ref_weight=batch["ref_weight"])
    ours = {"loss": out.loss.detach(), **out.metrics}
    assert torch.isfinite(out.loss), where

    # 1. The reductions: float64 equations on the captured per-token values, rounded once.
    (tokens, v), = captured
    zeros = torch.zeros_like(v.logp)
    values = (v.logp, v.ref_logp, zeros if v.kl_forward is None else v.kl_forward,
              zeros if v.kl_reverse is None else v.kl_reverse)
    exact = quantities(terms_from_tokens(*(x.detach().double() for x in values), tokens, batch["c"], **hp),
                       batch["span_weights"], batch["c"], hp)
    for name, value in ours.items():
        err = abs(float(value) - float(exact[name]))
        assert err <= ULP * abs(float(exact[name])), f"{where}: {name} = {float(value)!r} is {err:.2e} off " \
            f"the float64 reduction of its own per-token values ({float(exact[name])!r})"

    # 2. End to end, against float64 and eager fp32 full logits.
    hidden64 = batch["hidden"].detach().double().requires_grad_()
    weight64 = batch["weight"].detach().double().requires_grad_()
    full = {name: batch[name] for name in ("ref_hidden", "labels", "span_weights", "c")}
    terms64 = reference_terms(weight64, hidden64, ref_weight=batch["ref_weight"], **full, **hp)
    with torch.no_grad():
        terms32 = reference_terms(batch["weight"], batch["hidden"], ref_weight=batch["ref_weight"], **full,
                                  **hp, dtype=torch.float32)
    truth = {name: value.detach() for name, value in quantities(terms64, batch["span_weights"], batch["c"], hp).items()}
    eager = quantities(terms32, batch["span_weights"], batch["c"], hp)
    tol = tolerance(values, tokens, batch, hp)
    expected_names = set(truth) - (set() if v.kl_forward is not None else {"kl/forward", "kl/reverse"})
    assert set(ours) == expected_names, where
    for name, value in ours.items():
        ours_err = abs(float(value) - float(truth[name]))
        eager_err = abs(float(eager[name]) - float(truth[name]))
        assert ours_err <= eager_err + tol[name], (
            f"{where}: {name} error {ours_err:.3e} > eager fp32's {eager_err:.3e} + {tol[name]:.3e} "
            f"(value {float(truth[name]):.6g})"
        )

    # 3. Gradients.
    dh, dw = torch.autograd.grad(out.loss, (batch["hidden"], batch["weight"]))
    ref_dh, ref_dw = torch.autograd.grad(terms64["loss"], (hidden64, weight64))
    for name, grad, expected in (("dh", dh, ref_dh), ("dW", dw, ref_dw)):
        err = float((grad.double() - expected).abs().max())
        scale = float(expected.abs().max())
        assert err <= GRAD_RTOL * scale, f"{where}: {name} max error {err:.3e} > {GRAD_RTOL} * {scale:.3e}"

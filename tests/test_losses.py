"""The FiRe-MPO loss family against a float64 reference written straight from docs/design.md section 1.

The reference builds the full [rows, T, V] logits of policy and reference, takes log_softmax, and evaluates
each term of the equations per example (in float64; in float32 it is the eager full-logits path that
tests/test_losses_long.py compares against). Tolerances: in fp32 the per-token log-probs carry ~1e-7 relative
error, the span sums a few 1e-6 absolute at these sizes; relative 1e-5 on the loss and 1e-4 on the gradients
(scaled by the gradient's largest entry, since entries near 0 have no meaningful relative error) leave a
margin of about 10x.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import firempo_kernels.losses as losses_module
from firempo_kernels import LOSS_PRESETS, FiReMPOLoss, FiReMPOOutput, PrecomputedReference, firempo_loss
from reference import full_logits

IGNORE = -100
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4
PAIRINGS = ("reversed", "same_response", "cross")
# The paper's presets, plus a configuration with every term large, so that an error in any one of them
# shows in the gradients well above the tolerance.
CONFIGS = {
    "firempo": {},
    "rrpo": dict(LOSS_PRESETS["rrpo"]),
    "mask_dpo": dict(LOSS_PRESETS["mask_dpo"]),
    "dpo": dict(LOSS_PRESETS["dpo"]),
    "strong": {"beta": 0.7, "alpha": 0.4, "gamma": 0.8, "lambda_": 0.3, "temperature": 1.3},
    # Soft-capped logits (Gemma 2's final_logit_softcapping): the batches' logits have a standard deviation
    # of about 2, so a cap of 1.5 bends most of them.
    "capped": {"beta": 0.7, "alpha": 0.4, "gamma": 0.8, "lambda_": 0.3, "temperature": 1.3, "softcap": 1.5},
}
DEFAULTS = {"beta": 0.1, "alpha": 0.01, "gamma": 0.1, "lambda_": 0.5, "temperature": 1.0}


# ------------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------------
def full_log_softmax(hidden, weight, bias, temperature, dtype=torch.float64, softcap=None):
    logits = full_logits(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                         temperature=temperature, softcap=softcap)
    return torch.log_softmax(logits, dim=-1)


def reference_terms(weight, hidden, ref_hidden, labels, span_weights, c, *, pairing="reversed",
                    ref_weight=None, bias=None, ref_bias=None, beta, alpha, gamma, lambda_, temperature,
                    softcap=None, dtype=torch.float64):
    """Per-example terms of the FiRe-MPO loss from full logits (docs/design.md section 1), computed in
    ``dtype``: float64 is the reference; float32 is the eager full-logits path."""
    if ref_weight is None:  # a shared head; the reference is a frozen copy of it
        ref_weight, ref_bias = weight.detach(), None if bias is None else bias.detach()
    logp_all = full_log_softmax(hidden, weight, bias, temperature, dtype, softcap)  # [k*B, T, V]
    ref_all = full_log_softmax(ref_hidden, ref_weight, ref_bias, temperature, dtype, softcap)
    target = labels.clamp(min=0)[..., None]  # ignored positions have weight 0
    token_logp = logp_all.gather(-1, target)[..., 0]
    token_ref = ref_all.gather(-1, target)[..., 0]
    w = span_weights.to(dtype)
    delta = (w * (token_logp - token_ref)).sum(dim=-1)  # Delta of every row

    num_examples = labels.shape[0] // (2 if c is None else 4)
    terms = {"rank": [], "visual": [], "kl_forward": [], "kl_reverse": [], "delta": delta,
             "logps": (w * token_logp).sum(dim=-1)}
    for i in range(num_examples):
        def d(block):
            return delta[block * num_examples + i]

        terms["rank"].append(-F.logsigmoid(beta * (d(0) - d(1))))
        if c is not None and bool(c[i]):
            margin = {"reversed": d(3) - d(2), "same_response": d(0) - d(2), "cross": d(0) - d(3)}[pairing]
            terms["visual"].append(-gamma * F.logsigmoid(beta * margin))
        else:
            terms["visual"].append(delta.new_zeros(()))
        p, q = logp_all[i].exp(), ref_all[i].exp()  # row i is (v, y+) of example i
        kl_forward = (q * (ref_all[i] - logp_all[i])).sum(dim=-1)
        kl_reverse = (p * (logp_all[i] - ref_all[i])).sum(dim=-1)
        terms["kl_forward"].append((w[i] * kl_forward).sum())
        terms["kl_reverse"].append((w[i] * kl_reverse).sum())
    for name in ("rank", "visual", "kl_forward", "kl_reverse"):
        terms[name] = torch.stack(terms[name])
    terms["kl"] = lambda_ * terms["kl_forward"] + (1 - lambda_) * terms["kl_reverse"]
    terms["loss"] = (terms["rank"] + terms["visual"] + alpha * terms["kl"]).mean()
    return terms


def reference_metrics(terms, span_weights, c, *, pairing="reversed", beta, alpha, gamma, **_):
    """The metrics of :class:`FiReMPOOutput` from ``reference_terms``, in their dtype. ``visual/margins``
    is there when the visual term is; the KL ones always (the loss leaves them out when it has no KL)."""
    k = 2 if c is None else 4
    b = span_weights.shape[0] // k
    delta, logps = terms["delta"].reshape(k, b), terms["logps"].reshape(k, b)
    w = span_weights.to(delta.dtype)
    kl_tokens_weight = w[:b].sum()
    visual = c is not None and gamma > 0
    span_tokens = (w[: 2 * b] > 0).sum() + ((w[2 * b :] > 0).reshape(2, b, -1)[:, c].sum() if visual else 0)
    metrics = {
        "rewards/chosen": beta * delta[0].mean(),
        "rewards/rejected": beta * delta[1].mean(),
        "rewards/margins": beta * (delta[0] - delta[1]).mean(),
        "rewards/accuracies": (delta[0] > delta[1]).to(delta.dtype).mean(),
        "logps/chosen": logps[0].mean(),
        "logps/rejected": logps[1].mean(),
        "loss/rank": terms["rank"].mean(),
        "loss/visual": terms["visual"].mean(),
        "loss/kl": alpha * terms["kl"].mean(),
        "kl/forward": terms["kl_forward"].sum() / kl_tokens_weight,
        "kl/reverse": terms["kl_reverse"].sum() / kl_tokens_weight,
        "span_tokens": span_tokens.to(delta.dtype),
    }
    if visual:
        margin = {"reversed": delta[3] - delta[2], "same_response": delta[0] - delta[2],
                  "cross": delta[0] - delta[3]}[pairing]
        metrics["visual/margins"] = beta * margin[c].mean()
    return metrics


def reference_loss_and_grads(batch, config, pairing="reversed"):
    """Float64 loss and its gradients w.r.t. hidden and weight."""
    hp = {**DEFAULTS, **config}
    hp.pop("visual_pairing", None)
    hidden = batch["hidden"].detach().double().requires_grad_()
    weight = batch["weight"].detach().double().requires_grad_()
    terms = reference_terms(
        weight, hidden, batch["ref_hidden"], batch["labels"], batch["span_weights"], batch["c"],
        pairing=pairing, ref_weight=batch.get("ref_weight"), bias=batch.get("bias"),
        ref_bias=batch.get("ref_bias"), **hp,
    )
    grad_hidden, grad_weight = torch.autograd.grad(terms["loss"], (hidden, weight))
    return terms, grad_hidden, grad_weight


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------
def make_batch(num_examples=3, seq_len=9, d=16, vocab=40, *, corrupted=True, dense=False, float_weights=True,
               separate_ref_head=True, with_bias=True, dtype=torch.float32):
    """A random preference batch: rows in blocks of B, right padding, spans on ~40% of response tokens.

    Example 1 has no corrupted image (c = 0) when ``corrupted``. ``dense`` weights every response token.
    """
    k = 4 if corrupted else 2
    rows = k * num_examples
    labels = torch.randint(0, vocab, (rows, seq_len))
    lengths = torch.randint(seq_len // 2, seq_len + 1, (rows,))
    labels[torch.arange(seq_len)[None, :] >= lengths[:, None]] = IGNORE
    response = labels != IGNORE
    span = response if dense else response & (torch.rand(rows, seq_len) < 0.4)
    values = torch.rand(rows, seq_len) + 0.5 if float_weights else torch.ones(rows, seq_len)
    batch = {
        "weight": (0.5 * torch.randn(vocab, d, dtype=dtype)).requires_grad_(),
        "hidden": torch.randn(rows, seq_len, d, dtype=dtype).requires_grad_(),
        "ref_hidden": torch.randn(rows, seq_len, d, dtype=dtype),
        "labels": labels,
        "span_weights": torch.where(span, values, 0.0),
        "c": torch.tensor([i != 1 for i in range(num_examples)]) if corrupted else None,
    }
    if separate_ref_head:
        batch["ref_weight"] = batch["weight"].detach() + 0.1 * torch.randn(vocab, d, dtype=dtype)
    if with_bias:
        batch["bias"] = (0.3 * torch.randn(vocab, dtype=dtype)).requires_grad_()
        if separate_ref_head:
            batch["ref_bias"] = 0.3 * torch.randn(vocab, dtype=dtype)
    return batch


def call(loss_fn, batch, ref=None, **kwargs) -> FiReMPOOutput:
    return loss_fn(
        batch["weight"], batch["hidden"], batch["ref_hidden"] if ref is None else ref, batch["labels"],
        batch["span_weights"], batch["c"], ref_weight=batch.get("ref_weight"), bias=batch.get("bias"),
        ref_bias=batch.get("ref_bias"), **kwargs,
    )


def grads(out, batch):
    return torch.autograd.grad(out.loss, (batch["hidden"], batch["weight"]))


def assert_rel_close(actual, expected, rtol, scale=None):
    """|actual - expected| <= rtol * max(max|expected|, scale), entrywise."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(float(expected.abs().max()), scale or 0.0, 1e-30)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol} * {scale:.3e}"


def metric_scale(metrics, config):
    """Magnitude of the span log-prob sums a metric is built from: margins and rewards are differences of
    such sums (times beta) and inherit their absolute rounding error, however small the difference."""
    beta = {**DEFAULTS, **CONFIGS[config]}["beta"]
    return beta * float(metrics["logps/chosen"].detach().abs() + metrics["logps/rejected"].detach().abs())


def loss_for(config, pairing="reversed"):
    return FiReMPOLoss(**{**config, "visual_pairing": pairing})


# ------------------------------------------------------------------------------------------------------
# Against the reference
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("corrupted", [True, False], ids=["with_v'", "without_v'"])
@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_loss_and_grads_match_reference(config, pairing, corrupted):
    batch = make_batch(corrupted=corrupted, dense=config == "dpo")
    out = call(loss_for(CONFIGS[config], pairing), batch)
    terms, ref_dh, ref_dw = reference_loss_and_grads(batch, CONFIGS[config], pairing)
    dh, dw = grads(out, batch)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert_rel_close(out.loss, terms["loss"], LOSS_RTOL)
    assert_rel_close(dh, ref_dh, GRAD_RTOL)
    assert_rel_close(dw, ref_dw, GRAD_RTOL)


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_float64_inputs_match_reference_to_rounding(pairing):
    batch = make_batch(num_examples=4, seq_len=7, vocab=33, dtype=torch.float64)
    config = CONFIGS["strong"]
    out = call(loss_for(config, pairing), batch)
    terms, ref_dh, ref_dw = reference_loss_and_grads(batch, config, pairing)
    dh, dw = grads(out, batch)
    assert out.loss.dtype == torch.float64
    assert_rel_close(out.loss, terms["loss"], 1e-12)
    assert_rel_close(dh, ref_dh, 1e-11)
    assert_rel_close(dw, ref_dw, 1e-11)


def test_bfloat16_inputs_match_reference():
    # The bf16 inputs are exact in float64 and the torch backend accumulates in fp32, so the loss keeps
    # fp32 accuracy; the gradients come back in bf16, one rounding (unit roundoff 2**-8) on top.
    batch = make_batch(num_examples=2, seq_len=6, vocab=64, dtype=torch.bfloat16)
    out = call(loss_for(CONFIGS["strong"]), batch)
    terms, ref_dh, ref_dw = reference_loss_and_grads(batch, CONFIGS["strong"])
    dh, dw = grads(out, batch)
    assert out.loss.dtype == torch.float32 and dh.dtype == dw.dtype == torch.bfloat16
    assert_rel_close(out.loss, terms["loss"], LOSS_RTOL)
    assert_rel_close(dh, ref_dh, 2**-8 + GRAD_RTOL)
    assert_rel_close(dw, ref_dw, 2**-8 + GRAD_RTOL)


@pytest.mark.parametrize("shared_head", [True, False], ids=["shared_head", "separate_heads"])
def test_bias_gradient_and_head_options(shared_head):
    batch = make_batch(num_examples=2, separate_ref_head=not shared_head)
    config = CONFIGS["strong"]
    out = call(loss_for(config), batch)
    (db,) = torch.autograd.grad(out.loss, batch["bias"])

    bias = batch["bias"].detach().double().requires_grad_()
    hp = {**DEFAULTS, **config}
    terms = reference_terms(
        batch["weight"], batch["hidden"], batch["ref_hidden"], batch["labels"], batch["span_weights"],
        batch["c"], ref_weight=batch.get("ref_weight"), bias=bias, ref_bias=batch.get("ref_bias"), **hp,
    )
    (ref_db,) = torch.autograd.grad(terms["loss"], bias)
    assert_rel_close(db, ref_db, GRAD_RTOL)


@pytest.mark.parametrize("config", ["firempo", "capped"])
def test_frozen_head_gets_no_gradient_and_hidden_grad_is_unchanged(config):
    batch = make_batch(num_examples=2)
    batch["weight"].requires_grad_(False)
    batch["bias"].requires_grad_(False)
    out = call(loss_for(CONFIGS[config]), batch)
    out.loss.backward()
    assert batch["weight"].grad is None and batch["bias"].grad is None
    _, ref_dh, _ = reference_loss_and_grads(batch, CONFIGS[config])
    assert_rel_close(batch["hidden"].grad, ref_dh, GRAD_RTOL)


def test_metrics_match_reference():
    batch = make_batch(num_examples=4)
    config = CONFIGS["strong"]
    out = call(loss_for(config), batch)
    hp = {**DEFAULTS, **config}
    terms = reference_terms(
        batch["weight"], batch["hidden"], batch["ref_hidden"], batch["labels"], batch["span_weights"],
        batch["c"], ref_weight=batch["ref_weight"], bias=batch["bias"], ref_bias=batch["ref_bias"], **hp,
    )
    expected = reference_metrics(terms, batch["span_weights"], batch["c"], **hp)
    assert set(out.metrics) == set(expected)
    for name, value in expected.items():
        assert not out.metrics[name].requires_grad, name
        assert_rel_close(out.metrics[name], value, LOSS_RTOL, metric_scale(expected, "strong"))
    parts = out.metrics["loss/rank"] + out.metrics["loss/visual"] + out.metrics["loss/kl"]
    assert_rel_close(parts, out.loss.detach(), 1e-6)


def test_metric_keys_follow_what_is_computed():
    batch = make_batch(num_examples=2, corrupted=False)
    assert "visual/margins" not in call(FiReMPOLoss(), batch).metrics
    batch = make_batch(num_examples=2, corrupted=True)
    assert "visual/margins" not in call(FiReMPOLoss.rrpo(), batch).metrics
    assert "visual/margins" in call(FiReMPOLoss(), batch).metrics
    batch["c"] = torch.zeros(2, dtype=torch.bool)
    assert math.isnan(call(FiReMPOLoss(), batch).metrics["visual/margins"].item())


# ------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------
def test_dpo_preset_equals_sigmoid_dpo_on_sequence_logps():
    batch = make_batch(num_examples=4, corrupted=False, dense=True, float_weights=False)
    beta = 0.25
    out = call(FiReMPOLoss.dpo(beta=beta), batch)

    hidden = batch["hidden"].detach().double().requires_grad_()
    weight = batch["weight"].detach().double().requires_grad_()

    def sequence_logps(h, w, b):
        logp = full_log_softmax(h, w, b, 1.0).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
        return torch.where(batch["labels"] != IGNORE, logp, 0.0).sum(-1)

    policy = sequence_logps(hidden, weight, batch["bias"])
    ref = sequence_logps(batch["ref_hidden"], batch["ref_weight"], batch["ref_bias"])
    chosen, rejected = (policy - ref).chunk(2)
    dpo = -F.logsigmoid(beta * (chosen - rejected)).mean()
    ref_dh, ref_dw = torch.autograd.grad(dpo, (hidden, weight))
    dh, dw = grads(out, batch)
    assert_rel_close(out.loss, dpo, LOSS_RTOL)
    assert_rel_close(dh, ref_dh, GRAD_RTOL)
    assert_rel_close(dw, ref_dw, GRAD_RTOL)


def test_presets_and_functional_twin():
    assert (FiReMPOLoss.rrpo().gamma, FiReMPOLoss.rrpo().lambda_, FiReMPOLoss.rrpo().alpha) == (0.0, 1.0, 0.01)
    assert (FiReMPOLoss.mask_dpo().gamma, FiReMPOLoss.mask_dpo().alpha) == (0.0, 0.0)
    assert (FiReMPOLoss.dpo().gamma, FiReMPOLoss.dpo().alpha) == (0.0, 0.0)
    assert FiReMPOLoss.rrpo(beta=0.3).beta == 0.3
    assert FiReMPOLoss.from_preset("firempo").gamma == 0.1
    with pytest.raises(AttributeError):
        FiReMPOLoss().beta = 1.0

    batch = make_batch(num_examples=2)
    module_out = call(FiReMPOLoss.rrpo(beta=0.3, visual_pairing="cross"), batch)
    functional_out = call(firempo_loss, batch, **LOSS_PRESETS["rrpo"], beta=0.3, visual_pairing="cross")
    assert torch.equal(module_out.loss, functional_out.loss)
    assert module_out.metrics.keys() == functional_out.metrics.keys()


@pytest.mark.parametrize("name, corrupted_pass, reference_hidden", [
    ("firempo", True, True), ("rrpo", False, True), ("mask_dpo", False, False), ("dpo", False, False),
])
def test_what_a_preset_needs_from_the_caller(name, corrupted_pass, reference_hidden):
    loss_fn = FiReMPOLoss.from_preset(name)
    assert loss_fn.needs_corrupted_pass is corrupted_pass
    assert loss_fn.needs_reference_hidden is reference_hidden
    with pytest.raises(AttributeError):
        loss_fn.needs_corrupted_pass = not corrupted_pass
    with pytest.raises(AttributeError):
        loss_fn.needs_reference_hidden = not reference_hidden


def test_needs_properties_follow_gamma_and_alpha():
    assert FiReMPOLoss(gamma=1e-6).needs_corrupted_pass and not FiReMPOLoss(gamma=0.0).needs_corrupted_pass
    assert FiReMPOLoss(alpha=1e-6).needs_reference_hidden and not FiReMPOLoss(alpha=0.0).needs_reference_hidden
    # Each depends on its own hyperparameter only.
    assert FiReMPOLoss(gamma=0.0, alpha=0.3).needs_reference_hidden
    assert FiReMPOLoss(alpha=0.0, gamma=0.3).needs_corrupted_pass


@pytest.mark.parametrize("gamma", [0.0, 0.8])
def test_needs_corrupted_pass_says_whether_the_v_prime_rows_are_read(monkeypatch, gamma):
    batch = make_batch(num_examples=3, corrupted=True)
    loss_fn = FiReMPOLoss(gamma=gamma)
    spy = HeadSpy(monkeypatch)
    call(loss_fn, batch)
    total, _ = span_token_counts(batch, visual=loss_fn.needs_corrupted_pass)
    assert spy.calls == [("token_kl", total)]
    if not loss_fn.needs_corrupted_pass:  # the (v', .) rows may as well be left out by the caller
        clean = with_(batch, c=None, **{name: batch[name][:6] for name in ("hidden", "ref_hidden", "labels",
                                                                           "span_weights")})
        assert torch.equal(call(loss_fn, clean).loss, call(loss_fn, batch).loss)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_needs_reference_hidden_says_whether_log_probs_suffice(alpha):
    batch = make_batch(num_examples=2)
    loss_fn = FiReMPOLoss(alpha=alpha)
    reference = build_reference(batch, keep_hidden=loss_fn.needs_reference_hidden)
    assert torch.isfinite(call(loss_fn, batch, ref=reference).loss)
    if loss_fn.needs_reference_hidden:
        with pytest.raises(ValueError, match="keep_hidden=True"):
            call(loss_fn, batch, ref=build_reference(batch, keep_hidden=False))


# ------------------------------------------------------------------------------------------------------
# Structure of the batch
# ------------------------------------------------------------------------------------------------------
def test_example_without_span_tokens_has_rank_log2_and_no_gradient():
    batch = make_batch(num_examples=3, corrupted=True)
    b = 3
    batch["span_weights"][[2, b + 2, 2 * b + 2, 3 * b + 2]] = 0.0  # example 2: no span token in any row
    out = call(loss_for(CONFIGS["strong"]), batch)
    terms, ref_dh, _ = reference_loss_and_grads(batch, CONFIGS["strong"])
    assert_rel_close(out.loss, terms["loss"], LOSS_RTOL)
    dh, _ = grads(out, batch)
    assert torch.count_nonzero(dh[[2, b + 2, 2 * b + 2, 3 * b + 2]]) == 0
    assert_rel_close(dh, ref_dh, GRAD_RTOL)
    # Its rank term is log 2 and its visual term gamma * log 2: it is counted in the mean.
    gamma = CONFIGS["strong"]["gamma"]
    assert math.isclose((terms["rank"][2] + terms["visual"][2]).item(), (1 + gamma) * math.log(2), rel_tol=1e-12)


def test_batch_without_any_span_token():
    batch = make_batch(num_examples=2, corrupted=True)
    batch["span_weights"].zero_()
    batch["c"] = torch.ones(2, dtype=torch.bool)
    out = call(FiReMPOLoss(), batch)
    out.loss.backward()
    assert torch.isclose(out.loss, torch.tensor((1 + 0.1) * math.log(2)))
    assert torch.count_nonzero(batch["hidden"].grad) == 0 and torch.count_nonzero(batch["weight"].grad) == 0
    assert out.metrics["span_tokens"] == 0 and out.metrics["rewards/accuracies"] == 0


def rows_of(batch, examples, num_examples):
    """The sub-batch of the given examples, blocks kept in order."""
    k = batch["labels"].shape[0] // num_examples
    rows = torch.tensor([j * num_examples + i for j in range(k) for i in examples])
    sub = {name: batch[name] for name in ("weight", "ref_weight", "bias", "ref_bias") if name in batch}
    for name in ("hidden", "ref_hidden", "labels", "span_weights"):
        sub[name] = batch[name][rows]
    sub["c"] = None if batch["c"] is None else batch["c"][examples]
    return sub


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_micro_batches_with_num_examples_sum_to_full_batch(as_tensor):
    batch = make_batch(num_examples=5)
    loss_fn = loss_for(CONFIGS["strong"])
    full = call(loss_fn, batch)
    full_dh, full_dw = grads(full, batch)

    total = torch.tensor(5) if as_tensor else 5
    loss_sum = 0.0
    dh = torch.zeros_like(batch["hidden"])
    dw = torch.zeros_like(batch["weight"])
    for examples in ([0, 3], [1], [2, 4]):  # uneven micro-batches, example order shuffled
        hidden = batch["hidden"].detach().requires_grad_()
        micro = rows_of({**batch, "hidden": hidden}, examples, 5)
        out = call(loss_fn, micro, num_examples_in_batch=total)
        loss_sum = loss_sum + out.loss.detach()
        g_hidden, g_weight = torch.autograd.grad(out.loss, (hidden, batch["weight"]))
        dh += g_hidden
        dw += g_weight
    assert_rel_close(loss_sum, full.loss.detach(), LOSS_RTOL)
    assert_rel_close(dh, full_dh, GRAD_RTOL)
    assert_rel_close(dw, full_dw, GRAD_RTOL)


# ------------------------------------------------------------------------------------------------------
# Precomputed reference
# ------------------------------------------------------------------------------------------------------
def build_reference(batch, keep_hidden=True, temperature=1.0, softcap=None):
    ref_weight = batch.get("ref_weight", batch["weight"]).detach()
    ref_bias = batch.get("ref_bias", batch.get("bias"))
    return PrecomputedReference.from_reference_forward(
        ref_weight, batch["ref_hidden"], batch["labels"], batch["span_weights"], batch["c"],
        ref_bias=None if ref_bias is None else ref_bias.detach(), temperature=temperature, keep_hidden=keep_hidden,
        softcap=softcap,
    )


@pytest.mark.parametrize(
    "config, corrupted, keep_hidden",
    [("strong", True, True), ("strong", False, True), ("mask_dpo", True, False), ("rrpo", True, True),
     ("capped", True, True)],
)
def test_precomputed_reference_equals_live(config, corrupted, keep_hidden):
    batch = make_batch(num_examples=3, corrupted=corrupted)
    loss_fn = loss_for(CONFIGS[config])
    live = call(loss_fn, batch)
    live_dh, live_dw = grads(live, batch)
    reference = build_reference(batch, keep_hidden, CONFIGS[config].get("temperature", 1.0),
                                CONFIGS[config].get("softcap"))
    assert reference.softcap == CONFIGS[config].get("softcap")
    assert reference.row_counts.shape == (4 if corrupted else 2, 3)
    assert (reference.hidden is not None) == keep_hidden
    stored = call(loss_fn, batch, ref=reference)
    dh, dw = grads(stored, batch)
    assert_rel_close(stored.loss, live.loss, LOSS_RTOL)
    assert_rel_close(dh, live_dh, GRAD_RTOL)
    assert_rel_close(dw, live_dw, GRAD_RTOL)
    expected_keys = set(live.metrics) - ({"kl/forward", "kl/reverse"} if not keep_hidden else set())
    assert set(stored.metrics) == expected_keys
    for name in expected_keys:
        assert_rel_close(stored.metrics[name], live.metrics[name], LOSS_RTOL, metric_scale(live.metrics, config))


def test_reference_with_corrupted_blocks_serves_a_batch_without_them():
    batch = make_batch(num_examples=3, corrupted=True)
    reference = build_reference(batch)
    first_two_blocks = {name: batch[name][:6] for name in ("hidden", "ref_hidden", "labels", "span_weights")}
    clean = with_(batch, c=None, **first_two_blocks)
    loss_fn = FiReMPOLoss.rrpo()
    live = call(loss_fn, clean)
    stored = call(loss_fn, clean, ref=reference)
    assert_rel_close(stored.loss, live.loss, LOSS_RTOL)
    assert_rel_close(grads(stored, clean)[0], grads(live, clean)[0], GRAD_RTOL)
    with pytest.raises(ValueError, match="k >= 4"):
        call(FiReMPOLoss(), batch, ref=build_reference(clean))


def test_precomputed_reference_stored_per_example_and_collated():
    batch = make_batch(num_examples=3, corrupted=True)
    whole = build_reference(batch)
    pieces = whole.unbind()
    assert [p.row_counts.shape for p in pieces] == [(4, 1)] * 3
    for joined in (PrecomputedReference.collate(pieces),
                   PrecomputedReference.collate([build_reference(rows_of(batch, [i], 3)) for i in range(3)])):
        assert torch.equal(joined.row_counts, whole.row_counts)
        # Per-token log-probs from a differently grouped head call: a few fp32 roundings of the ~10-sized lse.
        torch.testing.assert_close(joined.logps, whole.logps, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(joined.hidden, whole.hidden, rtol=0, atol=0)

    # An example stored from a batch without v' joins examples with v' (its c is False).
    two_block = make_batch(num_examples=3, corrupted=False)
    two_block["c"] = None
    mixed = PrecomputedReference.collate([pieces[0], build_reference(rows_of(two_block, [1], 3)), pieces[2]])
    assert mixed.row_counts[2:, 1].tolist() == [0, 0]
    assert mixed.num_blocks == 4 and mixed.num_examples == 3


def test_precomputed_reference_to_device():
    reference = build_reference(make_batch(num_examples=2)).to("cpu")
    assert isinstance(reference, PrecomputedReference) and reference.hidden is not None


# ------------------------------------------------------------------------------------------------------
# What the head runs on
# ------------------------------------------------------------------------------------------------------
class HeadSpy:
    """Records each fused-op call (which op, how many tokens) and the gradients reaching its KL outputs."""

    def __init__(self, monkeypatch):
        self.calls, self.kl_grads = [], {}
        real_logprobs = losses_module.fused_linear_logprobs

        def spy_token_kl(real):
            return lambda hidden, *args, **kwargs: token_kl(real, hidden, *args, **kwargs)

        def token_kl(real, hidden, *args, **kwargs):
            out = real(hidden, *args, **kwargs)
            self.calls.append(("token_kl", hidden.shape[0]))
            for name in ("kl_forward", "kl_reverse"):
                tensor = getattr(out, name)
                if tensor.requires_grad:
                    tensor.register_hook(lambda g, name=name: self.kl_grads.__setitem__(name, g))
            return out

        def logprobs(hidden, *args, **kwargs):
            self.calls.append(("logprobs", hidden.shape[0]))
            return real_logprobs(hidden, *args, **kwargs)

        for name in ("fused_linear_token_kl", "token_kl_with_kl_rows"):  # precomputed / live reference
            monkeypatch.setattr(losses_module, name, spy_token_kl(getattr(losses_module, name)))
        monkeypatch.setattr(losses_module, "fused_linear_logprobs", logprobs)


def span_token_counts(batch, visual=True):
    """(S, S0): span tokens the loss must read, and how many of them are (v, y+) tokens."""
    w, c = batch["span_weights"] > 0, batch["c"]
    b = w.shape[0] // (2 if c is None else 4)
    total = int(w[: 2 * b].sum())
    if c is not None and visual:
        total += int(w[2 * b :].reshape(2, b, -1)[:, c].sum())
    return total, int(w[:b].sum())


@pytest.mark.parametrize("config", ["strong", "rrpo", "mask_dpo"])
def test_live_path_runs_one_fused_call_on_span_tokens_kl_rows_first(monkeypatch, config):
    batch = make_batch(num_examples=3)
    spy = HeadSpy(monkeypatch)
    out = call(loss_for(CONFIGS[config]), batch)
    out.loss.backward()
    total, first = span_token_counts(batch, visual=CONFIGS[config].get("gamma", 0.1) > 0)
    assert spy.calls == [("token_kl", total)]
    assert out.metrics["span_tokens"] == total
    lambda_ = CONFIGS[config].get("lambda_", 0.5)
    with_grad = {"kl_forward": lambda_ > 0, "kl_reverse": lambda_ < 1}
    if CONFIGS[config].get("alpha", 0.01) == 0:
        with_grad = {"kl_forward": False, "kl_reverse": False}
    assert set(spy.kl_grads) == {name for name, on in with_grad.items() if on}
    for grad in spy.kl_grads.values():  # non-zero exactly on the leading (v, y+) tokens
        assert bool((grad[:first] != 0).all()) and torch.count_nonzero(grad[first:]) == 0


@pytest.mark.parametrize("alpha", [0.4, 0.0])
def test_precomputed_path_runs_kl_only_on_first_block(monkeypatch, alpha):
    batch = make_batch(num_examples=3)
    reference = build_reference(batch, keep_hidden=alpha > 0)
    spy = HeadSpy(monkeypatch)
    call(FiReMPOLoss(alpha=alpha), batch, ref=reference).loss.backward()
    total, first = span_token_counts(batch)
    expected = [("token_kl", first), ("logprobs", total - first)] if alpha > 0 else [("logprobs", total)]
    assert spy.calls == expected


# ------------------------------------------------------------------------------------------------------
# Triton backend (interpreter on CPU): tiny shapes
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["strong", "capped"])
def test_matches_reference_on_each_backend(backend, name):
    batch = make_batch(num_examples=2, seq_len=5, d=16, vocab=64)
    config = CONFIGS[name]
    out = call(loss_for(config), batch)
    terms, ref_dh, ref_dw = reference_loss_and_grads(batch, config)
    dh, dw = grads(out, batch)
    assert_rel_close(out.loss, terms["loss"], LOSS_RTOL)
    assert_rel_close(dh, ref_dh, GRAD_RTOL)
    assert_rel_close(dw, ref_dw, GRAD_RTOL)
    stored = call(loss_for(config), batch,
                  ref=build_reference(batch, temperature=config["temperature"], softcap=config.get("softcap")))
    assert_rel_close(stored.loss, out.loss.detach(), LOSS_RTOL)


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------
def with_(batch, **changes):
    return {**batch, **changes}


@pytest.mark.parametrize("change, error, match", [
    (lambda b: with_(b, c=None, labels=b["labels"][:3], span_weights=b["span_weights"][:3],
                     hidden=b["hidden"][:3], ref_hidden=b["ref_hidden"][:3]), ValueError, "2 blocks"),
    (lambda b: with_(b, c=b["c"][:1]), ValueError, "4 blocks of B = 1"),
    (lambda b: with_(b, c=b["c"].long()), TypeError, "has_corrupted_image"),
    (lambda b: with_(b, c=b["c"][None]), ValueError, "has_corrupted_image"),
    (lambda b: with_(b, span_weights=b["span_weights"].index_put((torch.tensor([0]), torch.tensor([0])),
                                                                 torch.tensor(-0.5))), ValueError, ">= 0"),
    (lambda b: with_(b, span_weights=b["span_weights"].index_put((torch.tensor([1]), torch.tensor([2])),
                                                                 torch.tensor(float("nan")))), ValueError, "finite"),
    (lambda b: with_(b, span_weights=b["span_weights"].index_put((torch.tensor([1]), torch.tensor([2])),
                                                                 torch.tensor(float("inf")))), ValueError, "finite"),
    (lambda b: with_(b, labels=b["labels"].index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(IGNORE))),
     ValueError, "must be 0 where `labels` == ignore_index"),
    (lambda b: with_(b, labels=b["labels"].index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(40))),
     ValueError, r"`labels` at span tokens must lie in \[0, 40\)"),
    (lambda b: with_(b, span_weights=b["span_weights"][:, :-1]), ValueError, "`span_weights` must be shaped"),
    (lambda b: with_(b, span_weights=(b["span_weights"] > 0).long()), TypeError, "span_weights"),
    (lambda b: with_(b, labels=b["labels"].float()), TypeError, "labels"),
    (lambda b: with_(b, hidden=b["hidden"][:, :-1]), ValueError, "`hidden` must be shaped"),
    (lambda b: with_(b, ref_hidden=b["ref_hidden"][:, :, :-1]), ValueError, "`ref_hidden` last dimension"),
    (lambda b: with_(b, ref_hidden=b["ref_hidden"].numpy()), TypeError, "`ref_hidden` must be a torch.Tensor"),
    (lambda b: with_(b, ref_weight=b["ref_weight"][:-1], ref_bias=b["ref_bias"][:-1]), ValueError, "vocabulary"),
    (lambda b: with_(b, bias=b["bias"][:-1]), ValueError, "`bias`"),
    (lambda b: with_(b, weight=torch.empty(0), bias=None), ValueError, "`weight` is empty"),
    (lambda b: with_(b, ref_weight=torch.empty(0), ref_bias=None), ValueError, "`ref_weight` is empty"),
])
def test_bad_batches_raise(change, error, match):
    batch = make_batch(num_examples=2, vocab=40)
    batch["span_weights"][:, 0] = 1.0  # position 0 is a span token in every row
    batch["labels"][:, 0] = 7
    with pytest.raises(error, match=match):
        call(FiReMPOLoss(), change(batch))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"beta": 0.0}, ValueError, "beta"),
    ({"beta": True}, TypeError, "beta"),
    ({"alpha": -0.1}, ValueError, "alpha"),
    ({"gamma": float("nan")}, ValueError, "gamma"),
    ({"lambda_": 1.5}, ValueError, "lambda_"),
    ({"lambda_": -0.5}, ValueError, "lambda_"),
    ({"visual_pairing": "v1"}, ValueError, "visual_pairing"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": 1e-38}, ValueError, "temperature"),  # would scale the logits to inf
    ({"beta": 1e308}, ValueError, r"`beta` must lie in \[0, 1e\+06\]"),  # would give inf - inf = NaN
    ({"alpha": 1e300}, ValueError, "alpha"),
    ({"ignore_index": -100.0}, TypeError, "ignore_index"),
    ({"softcap": 0.0}, ValueError, r"`softcap` must be None \(no cap\) or a finite float > 0"),
    ({"softcap": -30.0}, ValueError, "softcap"),
    ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"softcap": float("nan")}, ValueError, "softcap"),
    ({"softcap": True}, TypeError, "`softcap` must be None or a float; got bool"),
    ({"softcap": "30"}, TypeError, "softcap"),
])
def test_bad_hyperparameters_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        FiReMPOLoss(**kwargs)
    batch = make_batch(num_examples=1)
    with pytest.raises(error, match=match):
        call(firempo_loss, batch, **kwargs)


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (2.0, TypeError), (torch.ones(2), ValueError),
    (torch.tensor(0), ValueError), (torch.tensor(-3), ValueError),  # would give inf / a sign-flipped loss
])
def test_bad_num_examples_in_batch_raises(value, error):
    with pytest.raises(error, match="num_examples_in_batch"):
        call(FiReMPOLoss(), make_batch(num_examples=2), num_examples_in_batch=value)


def test_bad_preset_name_raises():
    with pytest.raises(ValueError, match="must be one of"):
        FiReMPOLoss.from_preset("ipo")


def test_mismatched_precomputed_reference_raises():
    batch = make_batch(num_examples=2)
    reference = build_reference(batch)
    loss_fn = FiReMPOLoss()

    other = with_(batch, span_weights=batch["span_weights"].clone())
    other["span_weights"][1, 0] = 1.0 if other["span_weights"][1, 0] == 0 else 0.0
    other["labels"] = other["labels"].clone()
    other["labels"][1, 0] = 3
    with pytest.raises(ValueError, match="built for other span tokens"):
        call(loss_fn, other, ref=reference)
    with pytest.raises(ValueError, match="B = 1"):
        call(loss_fn, rows_of(batch, [0], 2), ref=reference)
    with pytest.raises(ValueError, match="keep_hidden=True"):
        call(loss_fn, batch, ref=reference._replace(hidden=None))
    with pytest.raises(ValueError, match="one row per"):
        call(loss_fn, batch, ref=reference._replace(hidden=reference.hidden[1:]))
    with pytest.raises(ValueError, match="logps"):
        call(loss_fn, batch, ref=reference._replace(logps=reference.logps[1:]))
    with pytest.raises(ValueError, match="temperature 2.0"):
        call(loss_fn, batch, ref=reference._replace(temperature=2.0))
    with pytest.raises(ValueError, match="one temperature"):
        PrecomputedReference.collate([reference, reference._replace(temperature=2.0)])
    with pytest.raises(ValueError, match="computed with softcap 30.0; this loss uses no softcap"):
        call(loss_fn, batch, ref=reference._replace(softcap=30.0))
    with pytest.raises(ValueError, match="computed with no softcap; this loss uses softcap 30.0"):
        call(FiReMPOLoss(softcap=30.0), batch, ref=reference)
    with pytest.raises(ValueError, match="one softcap"):
        PrecomputedReference.collate([reference, reference._replace(softcap=30.0)])
    with pytest.raises(ValueError, match="at least one"):
        PrecomputedReference.collate([])
    with pytest.raises(ValueError, match="carry `hidden`"):
        PrecomputedReference.collate([reference, reference._replace(hidden=None)])


# ------------------------------------------------------------------------------------------------------
# Soft-capped logits
# ------------------------------------------------------------------------------------------------------
def test_softcap_changes_the_loss():
    """The batches' logits are of the cap's scale: the capped loss is far from the uncapped one (so the
    capped tests above do test the cap), and a huge cap is no cap to fp32 rounding."""
    batch = make_batch(num_examples=2)
    uncapped = call(FiReMPOLoss(beta=0.7, alpha=0.4, gamma=0.8), batch).loss.detach()
    capped = call(FiReMPOLoss(beta=0.7, alpha=0.4, gamma=0.8, softcap=1.5), batch).loss.detach()
    assert abs(capped - uncapped) > 0.1 * abs(uncapped)
    assert_rel_close(call(FiReMPOLoss(beta=0.7, alpha=0.4, gamma=0.8, softcap=1e6), batch).loss, uncapped, LOSS_RTOL)
    assert FiReMPOLoss(softcap=30).softcap == 30.0 and "softcap=30.0" in repr(FiReMPOLoss(softcap=30))


def test_precomputed_reference_keeps_its_softcap_and_old_stores_mean_none():
    batch = make_batch(num_examples=2)
    capped = build_reference(batch, softcap=1.5)
    assert all(piece.softcap == 1.5 for piece in capped.unbind())
    assert PrecomputedReference.collate(capped.unbind()).softcap == 1.5
    # A store written before the field existed builds its references from the first four fields only.
    plain = build_reference(batch)
    old = PrecomputedReference(plain.logps, plain.row_counts, plain.hidden, plain.temperature)
    assert old.softcap is None
    assert_rel_close(call(FiReMPOLoss(), batch, ref=old).loss, call(FiReMPOLoss(), batch).loss, LOSS_RTOL)
    with pytest.raises(ValueError, match="softcap"):
        call(FiReMPOLoss(softcap=1.5), batch, ref=old)
    with pytest.raises(ValueError, match="PrecomputedReference.from_reference_forward: `softcap`"):
        build_reference(batch, softcap=-1.0)

"""What one trainer step must do, computed independently of the fused path: the FiRe-MPO loss, its rewards and
its gradient from the models' full logits in float64 (docs/design.md section 1, written out term by term), and
one assertion that names the worst element of a comparison and its index.

The trainer tests hold each path (frozen reference, adapters disabled, precomputed store, each preset) to
these: the logged loss and reward margins of a step, the update the step made (plain SGD: minus the learning
rate times this gradient) and the sign of the margin's change on the same batch.
"""

import copy

import torch
import torch.nn.functional as F



def assert_close(actual, expected, *, rtol: float, atol: float, what: str) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise; a failure names the element that misses
    by most (its index, both values, the bound) and how many miss."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    bound = atol + rtol * expected.abs()
    excess = (actual - expected).abs() - bound
    excess = torch.where(torch.isnan(actual) != torch.isnan(expected), torch.inf, excess.nan_to_num(nan=-1.0))
    if excess.numel() and excess.max() > 0:
        flat = int(excess.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), expected.shape)) if expected.dim() else ()
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {excess.numel()} element(s) off; worst at index {index}: "
            f"{actual.reshape(-1)[flat].item():.9g}, expected {expected.reshape(-1)[flat].item():.9g} "
            f"(|diff| {abs(actual.reshape(-1)[flat] - expected.reshape(-1)[flat]).item():.3g} > "
            f"{bound.reshape(-1)[flat].item():.3g} = {atol:g} + {rtol:g} * |expected|)"
        )


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a Hugging Face model (possibly peft-wrapped), in eval mode (no dropout), whose every
    forward is its class's own: the patches that trainers set on the instance (ours, TRL's fused forward)
    close over the model they patched, so a copy would otherwise run the original's fp32 weights."""
    copied = copy.deepcopy(model).to(torch.float64).eval()
    for module in copied.modules():
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_firempo_original_forward", None)
    return copied


def full_logits(model, batch, images) -> torch.Tensor:
    """[2B, T - 1, V] float64 logits of the 2B rows with ``images`` (the B examples' vision inputs), position
    t predicting token t + 1: the model's own forward, nothing of the fused path."""
    both = {k: torch.cat((v, v)).to(torch.float64 if v.is_floating_point() else v.dtype) for k, v in images.items()}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **both)
    return out.logits[:, :-1].to(torch.float64)


def full_logits_loss(policy, reference, batch, *, beta, alpha, gamma, lambda_, visual_pairing="reversed",
                     corrupted=False):
    """The FiRe-MPO loss of ``batch`` (mean over its B examples) and its metrics, from full float64 logits.

    ``policy`` and ``reference`` are float64 models, or ``reference`` is a callable ``images -> logits`` (the
    policy with its adapters disabled). The loss keeps its graph to the policy's parameters.
    """
    b = batch.num_examples
    labels = batch.labels[:, 1:]
    weights = batch.span_weights[:, 1:].to(torch.float64)
    keep = labels != -100
    safe = torch.where(keep, labels, 0)

    def ref_logits(images):
        with torch.no_grad():
            return reference(images) if callable(reference) and not isinstance(reference, torch.nn.Module) \
                else full_logits(reference, batch, images)

    def side(images):
        """Delta per row [2B], and the per-position log-softmax of both models."""
        log_p = torch.log_softmax(full_logits(policy, batch, images), -1)
        log_q = torch.log_softmax(ref_logits(images), -1)
        token = lambda lp: lp.gather(-1, safe[..., None])[..., 0] * keep  # noqa: E731
        return (weights * (token(log_p) - token(log_q))).sum(-1), log_p, log_q

    delta_v, log_p, log_q = side(batch.images)
    chosen, rejected = delta_v[:b], delta_v[b:]
    rank = -F.logsigmoid(beta * (chosen - rejected))
    visual = torch.zeros_like(rank)
    if corrupted and gamma > 0:
        delta_c, _, _ = side(batch.corrupted_images)
        margin = {"reversed": delta_c[b:] - delta_c[:b], "same_response": chosen - delta_c[:b],
                  "cross": chosen - delta_c[b:]}[visual_pairing]
        visual = -gamma * batch.has_corrupted_image.to(torch.float64) * F.logsigmoid(beta * margin)
    # Both KL directions at the (v, y+) span tokens, over the whole vocabulary.
    forward_kl = (log_q.exp() * (log_q - log_p)).sum(-1)[:b]
    reverse_kl = (log_p.exp() * (log_p - log_q)).sum(-1)[:b]
    w = weights[:b]
    kl = alpha * (lambda_ * (w * forward_kl).sum(-1) + (1 - lambda_) * (w * reverse_kl).sum(-1))
    loss = (rank + visual + kl).mean()
    margin = beta * (chosen - rejected).mean()
    metrics = {
        "loss": loss, "rewards/chosen": beta * chosen.mean(), "rewards/rejected": beta * rejected.mean(),
        "rewards/margins": margin, "loss/rank": rank.mean(), "loss/visual": visual.mean(), "loss/kl": kl.mean(),
        "kl/forward": (w * forward_kl).sum() / w.sum(), "kl/reverse": (w * reverse_kl).sum() / w.sum(),
    }
    return loss, margin, {name: value.detach() for name, value in metrics.items()}


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters of ``model`` by name, as the trainer's optimizer sees them."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}

"""Model adapters on tiny random models built from configs: the hidden states they return are exactly the
head's input in the model's own forward, and the FiRe-MPO loss computed from them equals the loss (and its
gradients) computed in float64 from the model's full logits."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from firempo_kernels.integrations.batch import PreferenceCollator
from firempo_kernels.integrations.models import (
    CausalLMAdapter,
    LlavaAdapter,
    ModelAdapter,
    QwenVLAdapter,
    get_adapter,
    register_adapter,
    registered_adapters,
)
from firempo_kernels.integrations.smoke import TINY_FAMILIES, synthetic_examples, tiny_model
from firempo_kernels.integrations.forward import compute_firempo_loss
from firempo_kernels.losses import FiReMPOLoss

EXPECTED_ADAPTER = {
    "llama": CausalLMAdapter,
    "llava": LlavaAdapter,
    "qwen2_vl": QwenVLAdapter,
    "qwen2_5_vl": QwenVLAdapter,
    "qwen3_vl": QwenVLAdapter,
}
# The families served before the processor-driven tests of test_families.py (their token-level synthetic
# examples need no per-row token types).
FAMILIES = [f for f in ("llama", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
            if f != "qwen3_vl" or hasattr(transformers, "Qwen3VLForConditionalGeneration")]


pytestmark = pytest.mark.usefixtures("one_thread")


def processor_style_inputs(model, batch, images):
    """What a processor hands a model for the 2B rows: ids, mask, vision inputs and, for Qwen-VL,
    ``mm_token_type_ids`` (1 on image placeholders) -- built here independently of the adapter."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    inputs.update({k: torch.cat((v, v)) for k, v in images.items()})
    if "image_grid_thw" in images:
        inputs["mm_token_type_ids"] = (batch.input_ids == model.config.image_token_id).to(torch.int32)
    return inputs


def draw_seed() -> int:
    return int(torch.randint(0, 2**20, ()))


def batch_for(model, n=3):
    return PreferenceCollator(0)(synthetic_examples(model.config, n, seed=draw_seed(), corrupted_every=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_are_the_heads_input(family):
    model = tiny_model(family, seed=draw_seed())
    adapter = get_adapter(model)
    assert type(adapter) is EXPECTED_ADAPTER[family]
    batch = batch_for(model)
    inputs = processor_style_inputs(model, batch, batch.images)
    seen = {}
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.update(h=args[0], out=out))
    with torch.no_grad():
        logits = model(**inputs).logits
    hook.remove()
    with torch.no_grad():
        hidden = adapter.hidden_states(model, batch.input_ids, batch.attention_mask,
                                       {k: torch.cat((v, v)) for k, v in batch.images.items()})
        weight, bias = adapter.head(model)
    # The same modules run on the same inputs in the same order: bit-for-bit equal.
    assert torch.equal(hidden, seen["h"])
    assert torch.equal(F.linear(hidden, weight, bias), logits)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_vision_inputs_reach_the_hidden_states(family):
    model = tiny_model(family, seed=draw_seed())
    adapter = get_adapter(model)
    batch = batch_for(model, n=1)
    images = {k: torch.cat((v, v)) for k, v in batch.images.items()}
    noisy = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in images.items()}
    with torch.no_grad():
        a = adapter.hidden_states(model, batch.input_ids, batch.attention_mask, images)
        b = adapter.hidden_states(model, batch.input_ids, batch.attention_mask, noisy)
    last = batch.attention_mask[0].sum() - 1
    assert not torch.allclose(a[0, last], b[0, last])


def firempo_loss_from_logits(logits, ref_logits, labels, weights, has_v_prime, *, beta, alpha, gamma, lambda_):
    """FiRe-MPO from full logits, float64, straight from the equations of docs/design.md section 1.

    logits, ref_logits: [kB, T, V] for blocks (v, y+), (v, y-) and, when ``has_v_prime`` is given, (v', y+),
    (v', y-); labels/weights [kB, T] already aligned (logits[r, t] predicts labels[r, t]).
    """
    logp = torch.log_softmax(logits.double(), -1)
    logq = torch.log_softmax(ref_logits.double(), -1)
    target = labels.clamp(min=0).unsqueeze(-1)
    w = weights.double()
    delta = (w * (logp.gather(-1, target) - logq.gather(-1, target)).squeeze(-1)).sum(-1)
    b = labels.shape[0] // (2 if has_v_prime is None else 4)
    chosen, rejected = delta[:b], delta[b : 2 * b]
    rank = -F.logsigmoid(beta * (chosen - rejected))
    visual = 0.0
    if has_v_prime is not None:
        chosen_vp, rejected_vp = delta[2 * b : 3 * b], delta[3 * b :]
        visual = -gamma * has_v_prime.double() * F.logsigmoid(beta * (rejected_vp - chosen_vp))
    p, q = logp[:b].exp(), logq[:b].exp()
    kl_forward = (q * (logq[:b] - logp[:b])).sum(-1)  # KL(ref || policy)
    kl_reverse = (p * (logp[:b] - logq[:b])).sum(-1)  # KL(policy || ref)
    kl = (w[:b] * (lambda_ * kl_forward + (1 - lambda_) * kl_reverse)).sum(-1)
    return (rank + visual + alpha * kl).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_loss_equals_full_logits_loss(family):
    seed = draw_seed()
    policy, reference = tiny_model(family, seed=seed).train(), tiny_model(family, seed=seed + 1)
    batch = batch_for(policy, n=3)
    hp = dict(beta=0.5, alpha=0.3, gamma=0.7, lambda_=0.3)
    out = compute_firempo_loss(policy, reference, batch, FiReMPOLoss(**hp))
    out.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)

    passes = [batch.images] + ([batch.corrupted_images] if batch.corrupted_images is not None else [])

    def full_logits(model, grad):
        with torch.set_grad_enabled(grad):
            parts = [model(**processor_style_inputs(model, batch, imgs)).logits for imgs in passes]
        return torch.cat(parts)[:, :-1]

    labels = batch.labels[:, 1:].repeat(len(passes), 1)
    weights = batch.span_weights[:, 1:].repeat(len(passes), 1)
    expected = firempo_loss_from_logits(full_logits(policy, True), full_logits(reference, False), labels, weights,
                                        batch.has_corrupted_image, **hp)
    expected.backward()
    # Same fp32 model on both sides; the fused loss sums fp32 terms over a few dozen span tokens, the
    # reference sums float64: ~1e-7 relative, with margin. Gradients are compared per tensor in norm, plus
    # 1e-7 of the whole gradient's norm: fp32 rounding follows the size of the terms summed, which only
    # shows in tensors whose gradient nearly cancels (a key bias without RoPE has an exactly zero one).
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=0.0)
    assert fused_grads.keys() == {n for n, p in policy.named_parameters() if p.grad is not None}
    total = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).norm().item()
    for name, p in policy.named_parameters():
        if p.grad is not None:
            error, scale = (fused_grads[name] - p.grad).norm().item(), p.grad.norm().item()
            assert error <= 1e-5 * scale + 1e-7 * total, f"{name}: |diff| {error:.3e}, |grad| {scale:.3e}"


def test_unsupported_class_names_how_to_register():
    class Custom(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match=r"no adapter for Custom.*@register_adapter\('Custom'\)"):
        get_adapter(Custom())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        get_adapter("llava")


def test_registering_an_adapter_serves_that_class():
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_output_embeddings(self):
            return self.inner.lm_head

    @register_adapter("Wrapper")
    class WrapperAdapter(ModelAdapter):
        def backbone(self, model):
            return model.inner.model

    try:
        inner = tiny_model("llama")
        model = Wrapper(inner)
        adapter = get_adapter(model)
        assert isinstance(adapter, WrapperAdapter) and registered_adapters()["Wrapper"] == "WrapperAdapter"
        ids = torch.randint(1, 100, (2, 5))
        mask = torch.ones_like(ids)
        torch.testing.assert_close(adapter.hidden_states(model, ids, mask), inner.model(ids, mask).last_hidden_state)
    finally:
        from firempo_kernels.integrations import models

        models._REGISTRY.pop("Wrapper")


def test_text_adapter_refuses_images():
    model = tiny_model("llama")
    ids = torch.randint(1, 100, (2, 5))
    with pytest.raises(ValueError, match="text-only.*pixel_values"):
        get_adapter(model).hidden_states(model, ids, torch.ones_like(ids), {"pixel_values": torch.zeros(2, 3)})


def test_a_softcapped_text_model_is_served_with_its_cap():
    """Gemma 2 (``final_logit_softcapping``): the head's product, capped, is the model's logits, and the fused
    loss (the cap read from the model) equals the float64 loss of the capped logits, gradients included."""
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                       final_logit_softcapping=1.5, attn_implementation="eager")
    seed = draw_seed()
    torch.manual_seed(seed)
    policy, reference = transformers.Gemma2ForCausalLM(config).train(), transformers.Gemma2ForCausalLM(config).eval()
    adapter = get_adapter(policy)
    assert type(adapter) is CausalLMAdapter and adapter.logit_softcap(policy) == 1.5
    batch = PreferenceCollator(0)(synthetic_examples(config, 3, seed=seed, corrupted_every=0))
    with torch.no_grad():
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        hidden = adapter.hidden_states(policy, batch.input_ids, batch.attention_mask)
    capped = 1.5 * torch.tanh(F.linear(hidden, adapter.head(policy)[0]) / 1.5)
    real = batch.attention_mask.bool()
    assert (capped - logits)[real].abs().max() <= 1e-5 * logits[real].abs().max()

    hp = dict(beta=0.5, alpha=0.3, gamma=0.0, lambda_=0.3)
    out = compute_firempo_loss(policy, reference, batch, FiReMPOLoss(**hp))
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)

    def float64_logits(model, grad):  # capped in float64 from the head's input (fp32 tanh loses saturated grads)
        seen = []
        hook = model.lm_head.register_forward_hook(lambda m, args, o: seen.append(args[0]))
        with torch.set_grad_enabled(grad):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        hook.remove()
        return 1.5 * torch.tanh(F.linear(seen[0][:, :-1].double(), model.lm_head.weight.double()) / 1.5)

    expected = firempo_loss_from_logits(float64_logits(policy, True), float64_logits(reference, False),
                                        batch.labels[:, 1:], batch.span_weights[:, 1:], None, **hp)
    expected.backward()
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=0.0)
    total = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).norm().item()
    for name, p in policy.named_parameters():
        if p.grad is not None:
            assert (fused[name] - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-7 * total, name


def test_other_logit_transforms_are_refused():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale=0.5"):
        get_adapter(transformers.LlamaForCausalLM(config))


def test_peft_heads():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", seed=0)
    saved = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    adapter = get_adapter(saved)
    weight, _ = adapter.head(saved)
    with torch.no_grad():
        weight.add_(1.0)  # the trainable copy diverges from the original head
    with saved.disable_adapter():
        original, _ = adapter.head(saved)
    assert weight.requires_grad and not original.requires_grad and not torch.equal(weight, original)

    lora_head = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match="LoRA on lm_head"):
        get_adapter(lora_head)


def test_unwrap_model_sees_through_distributed_data_parallel(tmp_path):
    """accelerate wraps the policy in DDP for a plain multi-process launch; the adapter must find the model,
    and a LoRA policy's reference (its adapters off) the peft model."""
    import torch.distributed as dist

    from firempo_kernels.integrations.models import get_adapter, unwrap_model
    from firempo_kernels.integrations.reference import AdaptersDisabledReference, is_peft_model

    model = tiny_model("llava")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(wrapped) is model
        assert type(get_adapter(wrapped)) is type(get_adapter(model))
        import peft

        lora = peft.get_peft_model(tiny_model("llava"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
        wrapped_lora = torch.nn.parallel.DistributedDataParallel(lora)
        assert is_peft_model(wrapped_lora) and not is_peft_model(wrapped)
        assert AdaptersDisabledReference._check(wrapped_lora) is lora
    finally:
        dist.destroy_process_group()

"""Tiny random models built from configs and synthetic preference data, for smoke runs and tests.

Nothing here downloads anything: a model comes from a config with random weights, and the examples are
random tokens laid out like real ones (image placeholders, a prompt, two responses that differ in one
tagged span, a noisier copy of the image as v'). ``firempo-train`` accepts ``model.tiny: <family>`` and
``data.synthetic: {...}`` so a launch (DeepSpeed config, ranks, checkpointing) can be checked end to end on
any machine before a real model is involved.
"""

from __future__ import annotations

import torch
from torch import nn

from .batch import PreferenceExample

__all__ = ["TINY_FAMILIES", "tiny_config", "tiny_model", "synthetic_examples"]

TINY_FAMILIES = ("llama", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Special ids sit at the top of the vocabulary; ordinary text tokens are drawn below them.
_NUM_SPECIAL = 8


def _special_ids(vocab_size: int) -> dict[str, int]:
    return {
        "image_token_id": vocab_size - 1,
        "video_token_id": vocab_size - 2,
        "vision_start_token_id": vocab_size - 3,
        "vision_end_token_id": vocab_size - 4,
        "pad_token_id": 0,
    }


def tiny_config(family: str, *, vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2,
                tie_word_embeddings: bool = False):
    """A transformers config of ``family`` (one of :data:`TINY_FAMILIES`) small enough for CPU tests.

    Vision towers take 16 x 16 pixel images: 4 placeholder tokens for Llava (8-pixel patches), 4 for the
    Qwen-VL families (4-pixel patches merged 2 x 2). Special token ids sit at the top of the vocabulary.
    """
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny_config: `family` must be one of {TINY_FAMILIES}; got {family!r}")
    if hidden_size % 8:
        raise ValueError(f"tiny_config: `hidden_size` must be a multiple of 8 (4 heads of even size); got {hidden_size}")
    special = _special_ids(vocab_size)
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=special["pad_token_id"], bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    if family == "llama":
        return transformers.LlamaConfig(**text)
    if family == "llava":
        vision = dict(model_type="clip_vision_model", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, image_size=16, patch_size=8)
        return transformers.LlavaConfig(
            vision_config=vision, text_config=dict(model_type="llama", **text),
            image_token_id=special["image_token_id"], vision_feature_layer=-1,
            tie_word_embeddings=tie_word_embeddings,
        )
    # M-RoPE splits the rotary half of each head (head_dim / 2 = hidden / 8) into t, h, w sections.
    half = hidden_size // 8
    sections = [half // 4, half // 4, half - 2 * (half // 4)]
    rope = {"rope_type": "default", "mrope_section": sections, "rope_theta": 10000.0}
    ids = {k: special[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    vision = dict(depth=num_layers, hidden_size=hidden_size, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        return transformers.Qwen2VLConfig(
            text_config=dict(**text, rope_parameters=rope),
            vision_config=dict(**vision, embed_dim=hidden_size, mlp_ratio=2), **ids,
            tie_word_embeddings=tie_word_embeddings,
        )
    if family == "qwen2_5_vl":
        return transformers.Qwen2_5_VLConfig(
            text_config=dict(**text, rope_parameters=rope),
            vision_config=dict(**vision, out_hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                               window_size=16, fullatt_block_indexes=[num_layers - 1]),
            **ids, tie_word_embeddings=tie_word_embeddings,
        )
    if not hasattr(transformers, "Qwen3VLConfig"):
        raise ValueError("tiny_config: this transformers release has no Qwen3-VL")
    return transformers.Qwen3VLConfig(
        text_config=dict(**text, head_dim=hidden_size // 4, rope_parameters={**rope, "mrope_interleaved": True}),
        vision_config=dict(**vision, out_hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **ids, tie_word_embeddings=tie_word_embeddings,
    )


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **config_kwargs,
) -> nn.Module:
    """A randomly initialised model of ``family`` (reproducible from ``seed``), in eval mode; ``config_kwargs``
    go to :func:`tiny_config`."""
    import transformers

    config = tiny_config(family, **config_kwargs)
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "llava": transformers.LlavaForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": getattr(transformers, "Qwen3VLForConditionalGeneration", None),
    }[family]
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


def _image_layout(config) -> tuple[int, dict[str, tuple[int, ...] | torch.Tensor] | None]:
    """(placeholder tokens per image, one image's vision inputs: a shape to fill with noise, or a tensor)."""
    if not hasattr(config, "vision_config"):
        return 0, None
    v = config.vision_config
    if not hasattr(v, "spatial_merge_size"):  # Llava-style: one token per patch, CLS dropped
        return (v.image_size // v.patch_size) ** 2, {"pixel_values": (1, 3, v.image_size, v.image_size)}
    # Qwen-VL style: a (1, 2m, 2m) patch grid merged m x m gives 4 tokens whatever the patch size.
    side = 2 * v.spatial_merge_size
    patches = side * side
    return 4, {
        "pixel_values": (patches, v.in_channels * v.temporal_patch_size * v.patch_size**2),
        "image_grid_thw": torch.tensor([[1, side, side]]),
    }


def synthetic_examples(
    config,
    num_examples: int,
    *,
    seed: int = 0,
    prompt_len: int = 5,
    response_len: int = 6,
    span_len: int = 2,
    corrupted_every: int = 1,
    id_prefix: str = "ex",
) -> list[PreferenceExample]:
    """Random preference examples shaped for a model built from ``config``.

    Each example: image placeholders (vision models), a random prompt, then a chosen and a rejected response
    that agree except in one span of ``span_len`` tokens (weight 1 there, 0 elsewhere); every
    ``corrupted_every``-th example has a v' (0: none has). Lengths vary by example so rows need padding.
    """
    if num_examples < 1 or span_len < 1 or response_len < span_len + 1:
        raise ValueError(
            "synthetic_examples: need num_examples >= 1, span_len >= 1 and response_len > span_len; got "
            f"{num_examples}, {span_len}, {response_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    special = _special_ids(vocab)
    n_image_tokens, vision = _image_layout(config)

    def tokens(n):
        return torch.randint(1, vocab - _NUM_SPECIAL, (n,), generator=gen)

    examples = []
    for i in range(num_examples):
        prefix = []
        if n_image_tokens:
            is_qwen = "image_grid_thw" in vision
            prefix = ([special["vision_start_token_id"]] if is_qwen else []) + [special["image_token_id"]] * n_image_tokens
            prefix += [special["vision_end_token_id"]] if is_qwen else []
        prompt = torch.cat([torch.tensor(prefix, dtype=torch.int64), tokens(prompt_len + i % 3)])
        length = response_len + i % 2
        start = int(torch.randint(0, length - span_len + 1, (1,), generator=gen))
        chosen_resp = tokens(length)
        rejected_resp = chosen_resp.clone()
        rejected_resp[start : start + span_len] = tokens(span_len)

        def row(resp):
            ids = torch.cat([prompt, resp])
            labels = ids.clone()
            labels[: prompt.shape[0]] = -100
            weights = torch.zeros(ids.shape[0])
            weights[prompt.shape[0] + start : prompt.shape[0] + start + span_len] = 1.0
            return ids, labels, weights

        images, corrupted = {}, None
        if vision is not None:
            images = {
                k: (torch.randn(shape, generator=gen) if isinstance(shape, tuple) else shape.clone())
                for k, shape in vision.items()
            }
            if corrupted_every and i % corrupted_every == 0:
                corrupted = {
                    k: (x + 0.5 * torch.randn(x.shape, generator=gen) if x.is_floating_point() else x.clone())
                    for k, x in images.items()
                }
        examples.append(PreferenceExample(
            f"{id_prefix}{i:05d}", *row(chosen_resp), *row(rejected_resp), images=images, corrupted_images=corrupted,
        ))
    return examples

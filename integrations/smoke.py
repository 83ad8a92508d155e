"""Tiny random models built from configs and synthetic preference data, for smoke runs and tests.

Nothing here downloads anything: a model comes from a config with random weights, and the examples are
random tokens laid out like real ones (image placeholders, a prompt, two responses that differ in one
tagged span, a noisier copy of the image as v'). ``firempo-train`` accepts ``tiny_model: <family>`` and
``synthetic_examples: <n>`` so a launch (DeepSpeed config, ranks, checkpointing) can be checked end to end on
any machine before a real model is involved.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .batch import PreferenceExample
from .data.embedded import CHAT_WORDS, chat_template, llava_config, seeded_model, word_tokenizer

__all__ = [
    "TINY_FAMILIES", "TINY_WORDS", "tiny_config", "tiny_model", "tiny_processor", "synthetic_rows", "synthetic_examples",
]

TINY_FAMILIES = ("llama", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "paligemma2",
                 "llava_next", "llava_onevision", "idefics3", "qwen3_5", "internvl", "gemma4", "mistral3", "smolvlm")
"""Families :func:`tiny_model` and :func:`tiny_processor` build. ``paligemma2`` is PaliGemma on a Gemma 2
language model, whose config sets ``final_logit_softcapping`` (a soft-capped model)."""

# Special ids sit at the top of the vocabulary; ordinary text tokens are drawn below them.
_NUM_SPECIAL = 8


def _special_ids(vocab_size: int) -> dict[str, int]:
    return {
        "image_token_id": vocab_size - 1,
        "video_token_id": vocab_size - 2,
        "vision_start_token_id": vocab_size - 3,
        "vision_end_token_id": vocab_size - 4,
        **{f"reserved_{k}": vocab_size - k for k in range(5, _NUM_SPECIAL + 1)},
        "pad_token_id": 0,
    }


_TINY_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


def tiny_config(family: str, *, vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2,
                tie_word_embeddings: bool = False):
    """A transformers config of ``family`` (one of :data:`TINY_FAMILIES`) small enough for CPU tests.

    Vision towers take 16 x 16 pixel images: 4 placeholder tokens for Llava and PaliGemma (8-pixel patches),
    4 for the Qwen-VL families (4-pixel patches merged 2 x 2), 4 for Gemma 3 (4-pixel patches pooled 2 x 2), 4
    per 16 x 16 tile for Idefics3 and SmolVLM, 2 x 2 plus row ends for Mistral 3 (Pixtral, images up to 32 x 32).
    Special token ids sit at the top of the vocabulary.
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
    siglip = dict(model_type="siglip_vision_model", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, image_size=16)
    if family == "gemma3":
        # A window of 6 tokens, shorter than the rows, so that the sliding-window layers' mask matters.
        gemma = dict(text, head_dim=hidden_size // 4, sliding_window=6,
                     layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
                     + ["sliding_attention"] * (num_layers % 2))
        return transformers.Gemma3Config(
            text_config=dict(model_type="gemma3_text", **gemma), vision_config=dict(siglip, patch_size=4),
            mm_tokens_per_image=4, image_token_index=special["image_token_id"],
            boi_token_index=special["vision_start_token_id"], eoi_token_index=special["vision_end_token_id"],
            tie_word_embeddings=tie_word_embeddings,
        )
    if family in ("paligemma", "paligemma2"):
        gemma = dict(text, head_dim=hidden_size // 4)
        if family == "paligemma2":
            # PaliGemma takes one mask for all layers, so a packed row needs rows within the window (4096 in
            # the released models): 512 here, longer than any tiny row.
            gemma.update(model_type="gemma2", final_logit_softcapping=3.0, sliding_window=512,
                         layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
                         + ["sliding_attention"] * (num_layers % 2))
        else:
            gemma.update(model_type="gemma")
        return transformers.PaliGemmaConfig(
            text_config=gemma, vision_config=dict(siglip, patch_size=8), image_token_index=special["image_token_id"],
            vocab_size=vocab_size, projection_dim=hidden_size, hidden_size=hidden_size,
            tie_word_embeddings=tie_word_embeddings,
        )
    if family in ("llava_next", "llava_onevision"):
        # anyres: a 16 x 16 tile grid; a 16 x 32 image gets two tiles beside its base image.
        vision = dict(model_type="clip_vision_model", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, image_size=16, patch_size=8)
        if family == "llava_onevision":  # SigLIP (no CLS token), whose every patch the "full" strategy keeps
            vision = dict(siglip, patch_size=8)
        cls = transformers.LlavaNextConfig if family == "llava_next" else transformers.LlavaOnevisionConfig
        extra = {} if family == "llava_next" else {"video_token_index": special["video_token_id"]}
        return cls(
            vision_config=vision, text_config=dict(model_type="llama", **text),
            image_token_index=special["image_token_id"], vision_feature_layer=-1,
            image_grid_pinpoints=_TINY_PINPOINTS, tie_word_embeddings=tie_word_embeddings, **extra,
        )
    if family == "gemma4":
        # 4-pixel patches pooled 2 x 2, at most 70 image tokens (the smallest budget the processor takes);
        # per-layer token inputs of 8; bidirectional attention over each image, as the released models.
        gemma = dict(text, head_dim=hidden_size // 4, global_head_dim=hidden_size // 4, sliding_window=6,
                     layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
                     vocab_size_per_layer_input=vocab_size, hidden_size_per_layer_input=8,
                     use_bidirectional_attention="vision")
        vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=hidden_size // 4, patch_size=4,
                      pooling_kernel_size=2, position_embedding_size=64)
        return transformers.Gemma4Config(
            text_config=gemma, vision_config=vision, audio_config=None, image_token_id=special["image_token_id"],
            video_token_id=special["video_token_id"], boi_token_id=special["vision_start_token_id"],
            eoi_token_id=special["vision_end_token_id"], audio_token_id=None, boa_token_id=None,
            eoa_token_index=None, tie_word_embeddings=tie_word_embeddings,
        )
    if family == "internvl":
        # 16 x 16 tiles of 4-pixel patches, pixel-shuffled by 0.5: 4 tokens per tile
        vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=4, image_size=[16, 16], patch_size=[4, 4])
        return transformers.InternVLConfig(
            vision_config=vision, text_config=dict(model_type="qwen2", **text), image_token_id=special["image_token_id"],
            image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=tie_word_embeddings,
        )
    if family in ("idefics3", "smolvlm"):
        # 4-pixel patches, pixel-shuffled 2 x 2: 4 tokens per (sub-)image of 16 x 16
        vision = dict(model_type=f"{family}_vision", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, image_size=16, patch_size=4)
        cls = transformers.Idefics3Config if family == "idefics3" else transformers.SmolVLMConfig
        return cls(
            vision_config=vision, text_config=dict(model_type="llama", **text), scale_factor=2,
            image_token_id=special["image_token_id"], pad_token_id=special["pad_token_id"],
            tie_word_embeddings=tie_word_embeddings,
        )
    if family == "mistral3":
        # Pixtral: 4-pixel patches merged 2 x 2, images kept at their aspect ratio up to 32 pixels a side; a
        # 16 x 16 image is 2 rows of 2 tokens, each row closed by [IMG_BREAK], the last by [IMG_END].
        vision = dict(model_type="pixtral", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, head_dim=hidden_size // 4,
                      image_size=32, patch_size=4)
        return transformers.Mistral3Config(
            vision_config=vision, text_config=dict(model_type="mistral", head_dim=hidden_size // 4,
                                                   sliding_window=None, **text),
            image_token_index=special["image_token_id"], spatial_merge_size=2, vision_feature_layer=-1,
            tie_word_embeddings=tie_word_embeddings,
        )
    if family == "llava":
        return llava_config(
            vocab_size, image_token_id=special["image_token_id"], pad_token_id=special["pad_token_id"],
            hidden_size=hidden_size, num_layers=num_layers, vision_hidden_size=hidden_size, vision_heads=4,
            image_size=16, patch_size=8, max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings,
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
    if family == "qwen3_5":
        # Gated-delta-net (linear attention) layers between full-attention ones, as the real models have.
        linear = dict(linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                      linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"] * (num_layers // 2)
                      + ["full_attention"] * (num_layers % 2))
        return transformers.Qwen3_5Config(
            text_config=dict(**text, **linear, head_dim=hidden_size // 4,
                             rope_parameters={**rope, "mrope_interleaved": True, "partial_rotary_factor": 1.0}),
            vision_config=dict(**vision, out_hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                               num_position_embeddings=16),
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
    go to :func:`tiny_config`. ``paligemma2`` runs eager attention when ``sdpa`` is asked for (Gemma 2 has no
    sdpa path). Built whole even under a ZeRO-3 training config (:func:`.data.embedded.seeded_model`).
    """
    import transformers

    config = tiny_config(family, **config_kwargs)
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "llava": transformers.LlavaForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": getattr(transformers, "Qwen3VLForConditionalGeneration", None),
        "gemma3": transformers.Gemma3ForConditionalGeneration,
        "paligemma": transformers.PaliGemmaForConditionalGeneration,
        "paligemma2": transformers.PaliGemmaForConditionalGeneration,
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
        "idefics3": transformers.Idefics3ForConditionalGeneration,
        "qwen3_5": getattr(transformers, "Qwen3_5ForConditionalGeneration", None),
        "internvl": transformers.InternVLForConditionalGeneration,
        "gemma4": getattr(transformers, "Gemma4ForConditionalGeneration", None),
        "mistral3": transformers.Mistral3ForConditionalGeneration,
        "smolvlm": transformers.SmolVLMForConditionalGeneration,
    }[family]
    if family == "paligemma2" and attn_implementation == "sdpa":
        attn_implementation = "eager"  # Gemma 2 soft-caps its attention scores, which sdpa cannot
    config._attn_implementation = attn_implementation
    return seeded_model(model_cls, config, seed).to(dtype).eval()


def _image_layout(config) -> tuple[int, dict[str, tuple[int, ...] | torch.Tensor] | None]:
    """(placeholder tokens per image, one image's vision inputs: a shape to fill with noise, or a tensor)."""
    if not hasattr(config, "vision_config"):
        return 0, None
    v = config.vision_config
    if hasattr(config, "mm_tokens_per_image"):  # Gemma 3: patches pooled to a fixed count
        return config.mm_tokens_per_image, {"pixel_values": (1, 3, v.image_size, v.image_size)}
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


# ---------------------------------------------------------------------------------------------------------------
# Tiny processors: real transformers tokenizers/processors matched to the tiny models, built offline.

# The sentences whose words (runs of letters/digits, single punctuation marks) make the word-level vocabulary,
# in this order, after the chat words; then digits, lowercase letters and punctuation. The words of the
# synthetic medical set (:mod:`.data.synthetic`) are all among them.
_TINY_SENTENCES = (
    "Is the lesion in the left or the right lung?",
    "Is the lesion in the upper or the lower part of the lung?",
    "Is the lesion large or small?",
    "Is there a lesion in this scan?",
    "Where is the lesion?",
    "The lesion is in the upper left lung.",
    "There is no lesion, the scan is normal.",
    "What does the image show?",
    "The image shows a red square and a blue circle on a white background.",
    "Yes, there is a cat next to the green box.",
    "No, it is not a dog.",
    "What color is it? How many are there? Two.",
    "The answer is yes.",
    "The lesion is in the <mask>left</mask> lung.",  # tags kept as text tokenise too
)


def _tiny_words() -> tuple[str, ...]:
    import string

    words: dict[str, None] = dict.fromkeys(CHAT_WORDS)
    for sentence in _TINY_SENTENCES:
        words.update(dict.fromkeys(re.findall(r"\w+|[^\w\s]", sentence)))
    words.update(dict.fromkeys(string.digits + string.ascii_lowercase + ".,?!:;'\"-()/"))
    return tuple(words)


TINY_WORDS: tuple[str, ...] = _tiny_words()
"""The text vocabulary of :func:`tiny_processor`, in id order from id 3: the chat words ``USER : ASSISTANT``,
the words of ``_TINY_SENTENCES`` (every word of the synthetic medical set among them: ``Is the lesion in the
left or the right lung ?``, ..., plus ``What does the image show``, ``red square blue circle white background``,
``Yes cat next to green box No it not dog color How many are Two answer yes``, and ``< mask > /`` so that
``<mask>...</mask>`` tags kept as text tokenise too), the digits 0-9, the lowercase letters a-z and the marks
``. , ? ! : ; ' " - ( ) /``. Text is split into runs of letters/digits and single punctuation marks; any
other word (capitalised single letters included) is ``<unk>``."""

# Placeholder texts of the vision families (the real models' spellings) and the ids they get.
_QWEN_TOKENS = {
    "image_token": ("<|image_pad|>", "image_token_id"),
    "video_token": ("<|video_pad|>", "video_token_id"),
    "vision_start_token": ("<|vision_start|>", "vision_start_token_id"),
    "vision_end_token": ("<|vision_end|>", "vision_end_token_id"),
}
_LLAVA_TOKENS = {"image_token": ("<image>", "image_token_id")}
_GEMMA3_TOKENS = {
    "image_token": ("<image_soft_token>", "image_token_id"),
    "boi_token": ("<start_of_image>", "vision_start_token_id"),
    "eoi_token": ("<end_of_image>", "vision_end_token_id"),
}
_PALIGEMMA_TOKENS = {"image_token": ("<image>", "image_token_id")}
_QWEN_IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"
# family -> (placeholder tokens, the image text a chat template writes for one image)
_PLACEHOLDERS = {
    "llama": ({}, ""),
    "llava": (_LLAVA_TOKENS, "<image>"),
    "gemma3": (_GEMMA3_TOKENS, "<start_of_image>"),
    "paligemma": (_PALIGEMMA_TOKENS, "<image>"),
    "paligemma2": (_PALIGEMMA_TOKENS, "<image>"),
    "llava_next": (_LLAVA_TOKENS, "<image>"),
    "llava_onevision": ({**_LLAVA_TOKENS, "video_token": ("<video>", "video_token_id")}, "<image>"),
    "gemma4": ({"image_token": ("<|image|>", "image_token_id"), "boi_token": ("<|image>", "vision_start_token_id"),
                "eoi_token": ("<image|>", "vision_end_token_id")}, "<|image|>"),
    "internvl": ({"context_image_token": ("<IMG_CONTEXT>", "image_token_id"),
                  "start_image_token": ("<img>", "vision_start_token_id"),
                  "end_image_token": ("</img>", "vision_end_token_id"),
                  "video_token": ("<video>", "video_token_id")}, "<IMG_CONTEXT>"),
    "idefics3": ({"image_token": ("<image>", "image_token_id"),
                  "fake_image_token": ("<fake_token_around_image>", "vision_start_token_id"),
                  "global_image_token": ("<global-img>", "vision_end_token_id"),
                  "end_of_utterance_token": ("<end_of_utterance>", "video_token_id"),
                  # the tiles of a split image (at most 2 x 2 here)
                  **{f"row_{r}_col_{c}": (f"<row_{r}_col_{c}>", f"reserved_{2 * r + c + 2}")
                     for r in (1, 2) for c in (1, 2)}}, "<image>"),
    "mistral3": ({"image_token": ("[IMG]", "image_token_id"),
                  "image_break_token": ("[IMG_BREAK]", "vision_start_token_id"),
                  "image_end_token": ("[IMG_END]", "vision_end_token_id")}, "[IMG]"),
}
_PLACEHOLDERS["smolvlm"] = _PLACEHOLDERS["idefics3"]
_TINY_IMAGE_SIZE = 16  # pixels: what the tiny vision towers of tiny_config take (4 image tokens)


_PALIGEMMA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endif %}{% endfor %}"
)


def _tiny_tokenizer(family: str, vocab_size: int):
    """A word-level ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` tokens laid out like tiny_config."""
    special = _special_ids(vocab_size)
    placeholders, image_text = _PLACEHOLDERS.get(family, (_QWEN_TOKENS, _QWEN_IMAGE_TEXT))
    top = {special[id_key]: text for text, id_key in placeholders.values()}
    # PaliGemma's processor writes <bos> after the image tokens: the reserved id of vision_start (unused there)
    bos = {"bos_token": "<bos>"} if family.startswith("paligemma") else {}
    if bos:
        top[special["vision_start_token_id"]] = bos["bos_token"]
    base = ["<pad>", "<unk>", "</s>"]  # pad id 0 as in tiny_config
    tokens = base + list(TINY_WORDS[: vocab_size - _NUM_SPECIAL - len(base)])
    # unused ids (and the reserved top ones) get unreachable fillers
    tokens += [top.get(i, f"<|reserved_{i}|>") for i in range(len(tokens), vocab_size)]
    tok = word_tokenizer(
        tokens, pad="<pad>", unk="<unk>", eos="</s>", bos=bos.get("bos_token"),
        extra_special_tokens={name: text for name, (text, _) in placeholders.items()}, split_punctuation=True,
        # PaliGemma is no chat model: its prompt is the image, <bos> (added by its processor) and the question.
        template=_PALIGEMMA_TEMPLATE if bos else chat_template(image_text),
    )
    for name, (text, id_key) in placeholders.items():  # the layout the tiny models rely on
        assert tok.convert_tokens_to_ids(text) == special[id_key], (name, text)
    assert len(tok) == vocab_size and tok.pad_token_id == special["pad_token_id"]
    return tok


_TINY_CLASS_NAMES = ("TinyQwenVLImageProcessor", "TinyQwen2VLProcessor", "TinyQwen2_5_VLProcessor",
                     "TinyQwen3VLProcessor", "TinyLlavaOnevisionProcessor", "TinyInternVLProcessor",
                     "TinyGemma4Processor", "TinySmolVLMProcessor", "TinyPixtralProcessor")


def _build_tiny_classes() -> None:
    """Defines the Qwen-VL subclasses below (they need transformers, imported lazily) as module attributes,
    so that they pickle by reference like any module-level class."""
    import math

    import transformers
    from transformers.image_utils import SizeDict
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class TinyQwenVLImageProcessor(Qwen2VLImageProcessorPil):
        """``Qwen2VLImageProcessorPil`` that resizes every image to a fixed ``s x s`` square, where
        ``size = {"shortest_edge": s*s, "longest_edge": s*s}`` (min_pixels = max_pixels = s*s), instead of
        keeping the aspect ratio: any image gives the same ``(1, s/p, s/p)`` patch grid."""

        def _side(self, size: Any) -> int:
            longest = size["longest_edge"] if isinstance(size, dict) else size.longest_edge
            side = math.isqrt(int(longest))
            if side * side != longest:
                raise ValueError(f"TinyQwenVLImageProcessor: `size['longest_edge']` must be a square; got {longest}")
            return side

        def resize(self, image, size, resample, factor, **kwargs):  # noqa: D102 (see the class)
            side = self._side(size)
            return super(Qwen2VLImageProcessorPil, self).resize(
                image=image, size=SizeDict(height=side, width=side), resample=resample
            )

        def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
            patch = (images_kwargs or {}).get("patch_size", self.patch_size)
            return (self._side(self.size) // patch) ** 2

    def images_only(base: type) -> type:
        class Processor(base):
            __doc__ = (
                f"``{base.__name__}`` without a video processor (the stock video processors need torchvision; "
                "the tiny models take images only)."
            )

            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        return Processor

    from transformers.processing_utils import ProcessorMixin

    class TinyGemma4Processor(transformers.Gemma4Processor):
        """``Gemma4Processor`` for images only: without its audio feature extractor and its video processor
        (which needs torchvision). Its ``__init__`` sets what the stock one sets for images and hands
        ``ProcessorMixin`` the two parts it has (the stock one hands over all four by keyword)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length: int = 70,
                     **kwargs):
            self.image_seq_length = image_seq_length
            self.image_token_id = tokenizer.image_token_id
            self.boi_token, self.eoi_token = tokenizer.boi_token, tokenizer.eoi_token
            self.image_token = tokenizer.image_token
            self.video_token = self.video_token_id = self.audio_token_id = None
            self.audio_seq_length, self.audio_ms_per_token = 750, 40
            # the stock input check wants the audio markers named even without audio
            self.audio_token, self.boa_token, self.eoa_token = "<|audio|>", "<|audio>", "<audio|>"
            ProcessorMixin.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=chat_template, **kwargs)

    class TinySmolVLMProcessor(images_only(transformers.SmolVLMProcessor)):
        __doc__ = images_only(transformers.SmolVLMProcessor).__doc__

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            """The stock template rendering without the video defaults (frames, fps) the stock one reads
            from its video processor, which this processor lacks."""
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    class TinyPixtralProcessor(ProcessorMixin):
        """Mistral 3's image prompt as ``PixtralProcessor`` writes it, a class of its own because transformers'
        ``PixtralProcessor`` module imports torchvision. An image resized to ``h x w`` pixels (multiples of
        ``s`` = patch_size x spatial_merge_size) becomes ``h / s`` rows of ``w / s`` ``[IMG]`` tokens, each row
        closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``; the model gets ``pixel_values`` (zero-padded to the
        batch's largest image) and ``image_sizes``."""

        def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, spatial_merge_size: int = 1,
                     chat_template=None, **kwargs):
            self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
            self.image_token = tokenizer.image_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.image_break_token, self.image_end_token = tokenizer.image_break_token, tokenizer.image_end_token
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

        def _process_images(self, images, **kwargs):
            # the image processor rounds sizes to whole merged tokens, not to single patches
            kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
            return super()._process_images(images, **kwargs)

        def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
            step = self.patch_size * self.spatial_merge_size
            height, width = (int(x) for x in image_inputs["image_sizes"][image_idx])
            row = self.image_token * (width // step)
            return (row + self.image_break_token) * (height // step - 1) + row + self.image_end_token

    classes = {
        "TinyQwenVLImageProcessor": TinyQwenVLImageProcessor,
        "TinyGemma4Processor": TinyGemma4Processor,
        "TinySmolVLMProcessor": TinySmolVLMProcessor,
        "TinyPixtralProcessor": TinyPixtralProcessor,
        "TinyQwen2VLProcessor": images_only(transformers.Qwen2VLProcessor),
        "TinyQwen2_5_VLProcessor": images_only(transformers.Qwen2_5_VLProcessor),
        "TinyLlavaOnevisionProcessor": images_only(transformers.LlavaOnevisionProcessor),
        "TinyInternVLProcessor": images_only(transformers.InternVLProcessor),
    }
    if hasattr(transformers, "Qwen3VLProcessor"):
        classes["TinyQwen3VLProcessor"] = images_only(transformers.Qwen3VLProcessor)
    for name, cls in classes.items():
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
        globals()[name] = cls


def __getattr__(name: str) -> Any:
    """The Qwen-VL tiny classes are defined on first access (``import transformers`` is deferred)."""
    if name in _TINY_CLASS_NAMES:
        if "TinyQwenVLImageProcessor" not in globals():
            _build_tiny_classes()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_processor(family: str, *, vocab_size: int = 128):
    """A real transformers processor matched to :func:`tiny_model` of ``family``, built offline.

    * tokenizer: a word-level ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` tokens: ``<pad>`` (0, the
      tiny models' pad id), ``<unk>`` (1), ``</s>`` (2, eos; no bos), then :data:`TINY_WORDS` (as many as fit
      below the 8 reserved top ids), unreachable fillers, and the family's placeholders at the ids
      :func:`tiny_config` uses: Llava ``<image>`` = vocab-1; Qwen-VL ``<|image_pad|>`` = vocab-1,
      ``<|video_pad|>`` = vocab-2, ``<|vision_start|>`` = vocab-3, ``<|vision_end|>`` = vocab-4.
    * chat template: ``USER: <image text> {text} ASSISTANT:`` where the image text is ``<image>`` (Llava) or
      ``<|vision_start|><|image_pad|><|vision_end|>`` (Qwen-VL), one per ``{"type": "image"}`` item.
    * image processor: any RGB (or convertible) PIL image becomes exactly the tiny vision tower's input, a
      16 x 16 image: 4 image tokens for every image whatever its size or aspect ratio (squashed, not
      cropped). Llava: ``CLIPImageProcessorPil`` resizing to 16 x 16 (8-px patches, CLS dropped). Qwen-VL:
      :class:`TinyQwenVLImageProcessor` (``Qwen2VLImageProcessorPil`` with patch_size 4, merge_size 2,
      temporal_patch_size 2, min_pixels = max_pixels = 256, a fixed 16 x 16 resize): grid ``(1, 4, 4)``.
    * the other families (docs/families.md) get their own processor and image processor classes (the PIL
      ones), configured small, with their own placeholder spellings at the top ids: Gemma 3
      ``<start_of_image>`` expanded to ``<start_of_image><image_soft_token> x 4<end_of_image>``; Gemma 4
      ``<|image|>`` (up to 70 tokens an image); PaliGemma ``<image> x 4<bos>`` before the prompt (no chat
      words); LlavaNext and LlavaOnevision anyres over 16 x 16 tiles; Idefics3 split images with
      ``<row_r_col_c>`` tokens and a ``<global-img>``; InternVL ``<img><IMG_CONTEXT> x 4 per tile</img>``;
      Qwen3.5 as Qwen3-VL; SmolVLM as Idefics3; Mistral 3 ``[IMG]`` rows closed by ``[IMG_BREAK]`` /
      ``[IMG_END]``. Their images keep their shapes as the stock processors treat them.

    Returns:
        ``"llama"``: the tokenizer alone. ``"llava"``: a ``LlavaProcessor``. ``"qwen2_vl"``, ``"qwen2_5_vl"``,
        ``"qwen3_vl"``: a subclass of ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``
        without a video processor (videos are not supported; the stock video processors need torchvision).
        Qwen processors return ``mm_token_type_ids``. ``save_pretrained`` works, but a saved Qwen folder does
        not reload with ``AutoProcessor`` (the tiny classes are not registered): call this function again.
        ``"gemma3"``, ``"paligemma"``, ``"paligemma2"``, ``"llava_next"``, ``"idefics3"``: the stock class,
        whose saved folder reloads with ``AutoProcessor``. ``"llava_onevision"``, ``"internvl"``,
        ``"gemma4"``, ``"qwen3_5"``, ``"smolvlm"``: images-only subclasses of the stock class (its video
        processor needs torchvision; Gemma 4's audio feature extractor is left out too). ``"mistral3"``:
        ``TinyPixtralProcessor``, a ``ProcessorMixin`` of this module writing Pixtral's image prompt (the
        stock ``PixtralProcessor``'s module imports torchvision).

    Example::

        proc = tiny_processor("qwen2_vl")
        text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Where is the lesion?"}]}],
                                        add_generation_prompt=True)
        batch = proc(text=[text], images=[[pil_image]], return_tensors="pt")
        logits = tiny_model("qwen2_vl")(**batch).logits

    Raises:
        ValueError: unknown ``family``; ``vocab_size`` not an int >= 16.
    """
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny_processor: `family` must be one of {TINY_FAMILIES}; got {family!r}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 16:
        raise ValueError(f"tiny_processor: `vocab_size` must be an int >= 16; got {vocab_size!r}")
    tok = _tiny_tokenizer(family, vocab_size)
    if family == "llama":
        return tok
    config = tiny_config(family, vocab_size=vocab_size)
    v = config.vision_config
    half = [0.5, 0.5, 0.5]
    if family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        images = CLIPImageProcessorPil(
            size={"height": v.image_size, "width": v.image_size}, do_center_crop=False,
            image_mean=half, image_std=half,
        )
        return transformers.LlavaProcessor(
            image_processor=images, tokenizer=tok, patch_size=v.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
            chat_template=tok.chat_template,
        )
    if family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        images = Gemma3ImageProcessorPil(size={"height": v.image_size, "width": v.image_size},
                                         image_mean=half, image_std=half)
        return transformers.Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=tok.chat_template,
                                            image_seq_length=config.mm_tokens_per_image)
    if family in ("paligemma", "paligemma2"):
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        images = SiglipImageProcessorPil(size={"height": v.image_size, "width": v.image_size},
                                         image_mean=half, image_std=half)
        images.image_seq_length = (v.image_size // v.patch_size) ** 2
        return transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)
    if family == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        images = LlavaNextImageProcessorPil(
            size={"height": v.image_size, "width": v.image_size}, crop_size={"height": v.image_size, "width":
            v.image_size}, image_grid_pinpoints=_TINY_PINPOINTS, image_mean=half, image_std=half)
        return transformers.LlavaNextProcessor(
            image_processor=images, tokenizer=tok, patch_size=v.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
            chat_template=tok.chat_template)
    if family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        images = LlavaOnevisionImageProcessorPil(
            size={"height": v.image_size, "width": v.image_size}, image_grid_pinpoints=_TINY_PINPOINTS,
            image_mean=half, image_std=half)
        # transformers' video processors need torchvision, which a CPU install may lack: images only
        return __getattr__("TinyLlavaOnevisionProcessor")(
            image_processor=images, tokenizer=tok,
            num_image_tokens=(v.image_size // v.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=tok.chat_template)
    if family == "gemma4":
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        images = Gemma4ImageProcessorPil(patch_size=v.patch_size, pooling_kernel_size=v.pooling_kernel_size,
                                         max_soft_tokens=70)
        return __getattr__("TinyGemma4Processor")(image_processor=images, tokenizer=tok, image_seq_length=70,
                                                   chat_template=tok.chat_template)
    if family == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        # Tiles: a 16 x 32 image becomes two 16 x 16 tiles and a thumbnail.
        images = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True, max_patches=4,
                                          image_mean=half, image_std=half)
        return __getattr__("TinyInternVLProcessor")(image_processor=images, tokenizer=tok,
                                                     image_seq_length=config.image_seq_length,
                                                     chat_template=tok.chat_template)
    if family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        # Image splitting on: a 16 x 32 image becomes two 16 x 16 tiles (<row_1_col_1>, <row_1_col_2>, ...
        # tokens, words of this vocabulary's fillers) and a global image.
        images = Idefics3ImageProcessorPil(size={"longest_edge": 2 * v.image_size},
                                           max_image_size={"longest_edge": v.image_size}, image_mean=half,
                                           image_std=half)
        return transformers.Idefics3Processor(
            image_processor=images, tokenizer=tok, chat_template=tok.chat_template,
            image_seq_len=(v.image_size // v.patch_size) ** 2 // config.scale_factor**2)
    if family == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        # as Idefics3: a 16 x 32 image becomes two 16 x 16 tiles and a global image
        images = SmolVLMImageProcessorPil(size={"longest_edge": 2 * v.image_size},
                                          max_image_size={"longest_edge": v.image_size}, image_mean=half,
                                          image_std=half)
        return __getattr__("TinySmolVLMProcessor")(
            image_processor=images, tokenizer=tok, chat_template=tok.chat_template,
            image_seq_len=(v.image_size // v.patch_size) ** 2 // config.scale_factor**2)
    if family == "mistral3":
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        images = PixtralImageProcessorPil(size={"longest_edge": v.image_size}, patch_size=v.patch_size,
                                          image_mean=half, image_std=half)
        return __getattr__("TinyPixtralProcessor")(
            image_processor=images, tokenizer=tok, patch_size=v.patch_size,
            spatial_merge_size=config.spatial_merge_size, chat_template=tok.chat_template)
    if family == "qwen3_vl" and not hasattr(transformers, "Qwen3VLProcessor"):
        raise ValueError("tiny_processor: this transformers release has no Qwen3-VL")
    side = v.patch_size * v.spatial_merge_size * 2  # a (1, 2m, 2m) grid merged m x m: 4 tokens
    assert side == _TINY_IMAGE_SIZE
    images = __getattr__("TinyQwenVLImageProcessor")(  # (module attributes once defined)
        size={"shortest_edge": side * side, "longest_edge": side * side}, patch_size=v.patch_size,
        merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size, image_mean=half, image_std=half,
    )
    cls_name = {"qwen2_vl": "TinyQwen2VLProcessor", "qwen2_5_vl": "TinyQwen2_5_VLProcessor",
                "qwen3_vl": "TinyQwen3VLProcessor", "qwen3_5": "TinyQwen3VLProcessor"}[family]
    return __getattr__(cls_name)(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)


def synthetic_rows(
    family: str,
    num_examples: int,
    *,
    seed: int = 0,
    corrupted_every: int = 1,
    prompt_len: int = 5,
    response_len: int = 6,
):
    """Random preference rows in TRL's format for a tiny model of ``family`` and :func:`tiny_processor`.

    Each row: ``id``, a ``prompt`` of random words, ``chosen``/``rejected`` responses that agree except in one
    ``<mask>``-tagged word, a random 16 x 16 RGB image in ``images`` (vision families) and, for every
    ``corrupted_every``-th row (0: none), a noisier copy in ``corrupted_images`` (else ``[]``).

    Returns:
        a ``datasets.Dataset`` with those columns.
    """
    import datasets
    import numpy as np
    from PIL import Image

    if family not in TINY_FAMILIES:
        raise ValueError(f"synthetic_rows: `family` must be one of {TINY_FAMILIES}; got {family!r}")
    if num_examples < 1 or response_len < 2 or prompt_len < 1:
        raise ValueError(
            "synthetic_rows: need num_examples >= 1, prompt_len >= 1 and response_len >= 2; got "
            f"{num_examples}, {prompt_len}, {response_len}"
        )
    words = [w for w in TINY_WORDS if w.isalpha() and len(w) > 1 and w not in ("USER", "ASSISTANT", "mask")]
    rng = np.random.default_rng(seed)
    vision = family != "llama"
    rows = []
    for i in range(num_examples):
        prompt = " ".join(rng.choice(words, prompt_len + i % 3))
        response = list(rng.choice(words, response_len + i % 2))
        k = int(rng.integers(0, len(response)))
        other = response.copy()
        other[k] = str(rng.choice([w for w in words if w != response[k]]))
        chosen = " ".join(f"<mask>{w}</mask>" if j == k else w for j, w in enumerate(response))
        rejected = " ".join(f"<mask>{w}</mask>" if j == k else w for j, w in enumerate(other))
        row = {"id": f"ex{i:05d}", "prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
        if vision:
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            row["images"] = [Image.fromarray(pixels, "RGB")]
            noisy = np.clip(pixels + rng.normal(0, 45, pixels.shape), 0, 255).astype(np.uint8)
            row["corrupted_images"] = (
                [Image.fromarray(noisy, "RGB")] if corrupted_every and i % corrupted_every == 0 else []
            )
        rows.append(row)
    if not vision:
        return datasets.Dataset.from_list(rows)
    from .data.hf_dataset import preference_features

    return datasets.Dataset.from_list(rows, features=preference_features())

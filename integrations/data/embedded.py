"""The embedded default model side: a word-level tokenizer, a processor and a tiny random Llava, all built
offline from code (no download, no shipped weights).

The tokenizer knows every word of the synthetic set (:mod:`.synthetic`) plus the chat words; the chat
template renders ``USER: <image> {question} ASSISTANT:``; the processor turns a scan into 16 image tokens
(32 x 32 pixels, 8 x 8 patches). The model is ``LlavaForConditionalGeneration`` with a 2-layer CLIP vision
tower and a 2-layer Llama language model: about 0.1 M parameters, a forward in milliseconds on a CPU.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from .synthetic import vocabulary

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
CHAT_WORDS = ("USER", ":", "ASSISTANT")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_word_tokenizer(words: Iterable[str] | None = None):
    """A word-level ``PreTrainedTokenizerFast`` built offline with the ``tokenizers`` library.

    Args:
        words: the vocabulary (duplicates ignored); default: the synthetic set's words and the chat words.
            Text is split into runs of letters/digits and single punctuation marks; anything unknown is
            ``<unk>``.

    Returns:
        the tokenizer, with pad/unk/bos/eos/image special tokens (ids 0..4) and the chat template set.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(CHAT_WORDS) + vocabulary() if words is None else list(words)
    vocab: dict[str, int] = {}
    for w in list(SPECIAL_TOKENS.values()) + words:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w):
            raise ValueError(f"build_word_tokenizer: `words` must be non-empty strings without spaces; got {w!r}")
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer: Any = None, *, image_size: int = 32, patch_size: int = 8):
    """A ``LlavaProcessor`` for ``image_size`` square images cut in ``patch_size`` patches (no download)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if image_size % patch_size:
        raise ValueError(
            f"build_processor: `image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size})"
        )
    tokenizer = build_word_tokenizer() if tokenizer is None else tokenizer
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava(
    tokenizer: Any,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
):
    """A randomly initialised ``LlavaForConditionalGeneration`` sized for CPU demos and tests.

    Args:
        tokenizer: gives the vocabulary size and the pad/bos/eos/image ids.
        image_size, patch_size: the vision tower's input (must match :func:`build_processor`).
        hidden_size, num_layers: of the language model (the vision tower is half as wide).
        seed: weights are a pure function of the arguments.
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=hidden_size // 2,
        intermediate_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size // 2,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_embedded(out_dir: str | os.PathLike, *, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> str:
    """Builds tokenizer, processor and tiny model and saves them in Hugging Face format; returns the folder."""
    tok = build_word_tokenizer()
    proc = build_processor(tok, image_size=image_size, patch_size=patch_size)
    model = build_tiny_llava(tok, image_size=image_size, patch_size=patch_size, seed=seed)
    out_dir = os.fspath(out_dir)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return out_dir

"""The embedded default model side: a word-level tokenizer, a processor and a tiny random Llava, all built
offline from code (no download, no shipped weights).

The tokenizer knows every word of the synthetic set (:mod:`.synthetic`) plus the chat words; the chat
template renders ``USER: <image> {question} ASSISTANT:``; the processor turns a scan into 16 image tokens
(32 x 32 pixels, 8 x 8 patches). The model is ``LlavaForConditionalGeneration`` with a 2-layer CLIP vision
tower and a 2-layer Llama language model: about 0.1 M parameters, a forward in milliseconds on a CPU.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

from .synthetic import vocabulary

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
CHAT_WORDS = ("USER", ":", "ASSISTANT")


def chat_template(image_text: str = "<image>") -> str:
    """The chat template ``USER: <image text> {question} ASSISTANT:`` with ``image_text`` written for each
    ``{"type": "image"}`` item; a message's content may be a string or a list of ``{"type": "image"}`` /
    ``{"type": "text", "text": ...}`` items. ``image_text`` "" writes nothing for an image (text models)."""
    image = f"{image_text} " if image_text else ""
    return (
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'assistant' %}ASSISTANT: {% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


CHAT_TEMPLATE = chat_template()


def word_tokenizer(
    tokens: Sequence[str],
    *,
    pad: str,
    unk: str,
    eos: str,
    bos: str | None = None,
    extra_special_tokens: Mapping[str, str] | None = None,
    split_punctuation: bool = False,
    template: str = CHAT_TEMPLATE,
):
    """A word-level ``PreTrainedTokenizerFast`` built offline with the ``tokenizers`` library.

    Args:
        tokens: the vocabulary in id order (token ``i`` gets id ``i``); ``pad``, ``unk``, ``eos``, ``bos`` and
            the values of ``extra_special_tokens`` must be among them.
        pad, unk, eos, bos: the special tokens (no bos when None); anything unknown is ``unk``.
        extra_special_tokens: name -> token, e.g. ``{"image_token": "<image>"}`` (set as tokenizer attributes).
        split_punctuation: text is split into runs of letters/digits and every punctuation mark alone ("</" is
            two tokens); otherwise into runs of letters/digits and runs of punctuation.
        template: the chat template.

    Raises:
        ValueError: a token repeated, or a special token not in ``tokens``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"word_tokenizer: `tokens` must not repeat a token; got {len(tokens) - len(vocab)} repeats")
    extra = dict(extra_special_tokens or {})
    missing = [t for t in (pad, unk, eos, bos, *extra.values()) if t is not None and t not in vocab]
    if missing:
        raise ValueError(f"word_tokenizer: the special tokens {missing} must be in `tokens`")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
        if split_punctuation else pre_tokenizers.Whitespace()
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=pad, unk_token=unk, **({} if bos is None else {"bos_token": bos}),
        eos_token=eos, extra_special_tokens=extra,
    )
    tok.chat_template = template
    return tok


def build_word_tokenizer(words: Iterable[str] | None = None):
    """A word-level tokenizer (:func:`word_tokenizer`) of the given words after the special tokens.

    Args:
        words: the vocabulary (duplicates ignored); default: the synthetic set's words and the chat words.
            Text is split into runs of letters/digits and runs of punctuation marks; anything unknown is
            ``<unk>``.

    Returns:
        the tokenizer, with pad/unk/bos/eos/image special tokens (ids 0..4) and :data:`CHAT_TEMPLATE`.
    """
    words = list(CHAT_WORDS) + vocabulary() if words is None else list(words)
    vocab: dict[str, None] = {}
    for w in list(SPECIAL_TOKENS.values()) + words:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w):
            raise ValueError(f"build_word_tokenizer: `words` must be non-empty strings without spaces; got {w!r}")
        vocab.setdefault(w)
    return word_tokenizer(
        list(vocab), pad=SPECIAL_TOKENS["pad"], unk=SPECIAL_TOKENS["unk"], bos=SPECIAL_TOKENS["bos"],
        eos=SPECIAL_TOKENS["eos"], extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
    )


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


def llava_config(
    vocab_size: int,
    *,
    image_token_id: int,
    pad_token_id: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    max_position_embeddings: int = 256,
    projection_dim: int | None = None,
    tie_word_embeddings: bool = False,
):
    """A ``LlavaConfig`` of a CLIP vision tower (``vision_hidden_size`` wide, ``vision_heads`` heads, MLP twice
    as wide; one token per ``patch_size`` patch of an ``image_size`` square image, CLS dropped) and a Llama
    language model (``hidden_size`` wide, 4 query and 2 key/value heads, MLP twice as wide), ``num_layers``
    each. ``projection_dim`` (no weights of the Llava model depend on it) is recorded when given."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=tie_word_embeddings,
    )


def seeded_model(model_cls: type, config: Any, seed: int):
    """``model_cls(config)`` with weights drawn from ``seed`` (the global random state is left as it was).

    The model is built whole even under a ZeRO-3 training config (transformers would otherwise build its
    sub-models inside ``deepspeed.zero.Init`` and initialise them on rank 0 only, with another random stream):
    so every rank, and every launch of any size, starts from the same weights; DeepSpeed partitions them when
    its engine starts.
    """
    import contextlib

    import torch
    from transformers import modeling_utils

    # transformers' own marker for "zero.Init is already active": its sub-model builders then skip theirs.
    whole = getattr(modeling_utils, "set_zero3_state", contextlib.nullcontext)
    with torch.random.fork_rng(devices=[]), whole():
        torch.manual_seed(seed)
        return model_cls(config)


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
    from transformers import LlavaForConditionalGeneration

    config = llava_config(
        len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        hidden_size=hidden_size, num_layers=num_layers, vision_hidden_size=hidden_size // 2, image_size=image_size,
        patch_size=patch_size, projection_dim=hidden_size // 2,
    )
    model = seeded_model(LlavaForConditionalGeneration, config, seed)
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

"""The collated batch the FiRe-MPO trainer consumes, the per-example record it is built from, and the
collator between them.

One example is a preference pair on one image: the prompt q with the chosen response y+ and with the
rejected response y-, the clean image v and, optionally, its lesion-corrupted copy v'. A batch of B examples
holds 2B token rows, chosen rows first::

    rows 0 .. B-1    q + y+  of examples 0 .. B-1
    rows B .. 2B-1   q + y-  of examples 0 .. B-1

The model runs these 2B rows twice: once with the clean images (blocks (v, y+), (v, y-)) and, when some
example has v', once with the corrupted images (blocks (v', y+), (v', y-)). Both passes share the token
rows; only the vision inputs differ.

Token conventions follow Hugging Face: rows are right-padded, and ``labels[r, t]`` is the token AT position
t (equal to ``input_ids[r, t]``) on response tokens and ``ignore_index`` elsewhere; the trainer does the
shift (hidden state t-1 predicts label t). ``span_weights[r, t]`` weighs the log-prob of ``labels[r, t]``:
1 inside a ``<mask>`` span, 0 outside (any non-negative float is accepted), and 0 wherever the label is
ignored.

Vision inputs are whatever the model's processor returns for the images, minus the text keys, with the
first dimension running over images (or image patches) in example order, e.g. ``pixel_values``
[B, C, H, W] for Llava; ``pixel_values`` [patches, C*t*p*p] plus ``image_grid_thw`` [B, 3] for Qwen-VL.
Per-token vision specifics (``mm_token_type_ids``, M-RoPE position ids) are derived from ``input_ids`` by
the model adapter, so a batch never carries them. A text-only model has empty vision inputs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["PreferenceExample", "PreferenceBatch", "PreferenceCollator"]


def _fail_type(where: str, name: str, expected: str, got) -> TypeError:
    return TypeError(f"{where}: `{name}` must be {expected}; got {type(got).__name__}")


def _check_vision(where: str, name: str, images) -> None:
    if not isinstance(images, Mapping):
        raise _fail_type(where, name, "a dict of str -> torch.Tensor", images)
    for key, value in images.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{where}: `{name}` must map str to torch.Tensor; got {type(key).__name__} -> "
                f"{type(value).__name__} for key {key!r}"
            )
        if value.dim() == 0:
            raise ValueError(f"{where}: `{name}[{key!r}]` must have a leading image/patch dimension; got a scalar")


def _check_token_row(where: str, prefix: str, ids, labels, weights, ignore_index: int) -> None:
    for name, x in ((f"{prefix}_input_ids", ids), (f"{prefix}_labels", labels), (f"{prefix}_span_weights", weights)):
        if not isinstance(x, torch.Tensor):
            raise _fail_type(where, name, "a torch.Tensor", x)
        if x.dim() != 1:
            raise ValueError(f"{where}: `{name}` must be 1-D [T]; got shape {tuple(x.shape)}")
    if ids.dtype.is_floating_point or labels.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(
            f"{where}: `{prefix}_input_ids` and `{prefix}_labels` must be integer tensors; "
            f"got {ids.dtype} and {labels.dtype}"
        )
    if not weights.dtype.is_floating_point:
        raise TypeError(f"{where}: `{prefix}_span_weights` must be a float tensor; got {weights.dtype}")
    if not (ids.shape == labels.shape == weights.shape):
        raise ValueError(
            f"{where}: `{prefix}_input_ids`, `{prefix}_labels`, `{prefix}_span_weights` must have one length; "
            f"got {ids.shape[0]}, {labels.shape[0]}, {weights.shape[0]}"
        )
    _check_labels_and_weights(where, f"{prefix}_", ids, labels, weights, ignore_index)


def _check_labels_and_weights(where: str, prefix: str, ids, labels, weights, ignore_index: int) -> None:
    kept = labels != ignore_index
    if bool((labels[kept] != ids[kept]).any()):
        raise ValueError(
            f"{where}: `{prefix}labels` must equal `{prefix}input_ids` wherever they are not ignore_index="
            f"{ignore_index} (labels are NOT shifted: labels[t] is the token at position t)"
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"{where}: `{prefix}span_weights` must be finite and >= 0")
    if bool((weights[~kept] != 0).any()):
        raise ValueError(
            f"{where}: `{prefix}span_weights` must be 0 wherever `{prefix}labels` == ignore_index={ignore_index}"
        )


def update_digest(digest, tensor: torch.Tensor | None) -> None:
    """Feed ``tensor`` (its dtype, shape and bytes; or None) to a ``hashlib`` digest."""
    if tensor is None:
        digest.update(b"none")
        return
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


@dataclass
class PreferenceExample:
    """One preference pair, tokenised, before padding (what a dataset yields).

    Attributes:
        example_id: unique, stable id (it keys the precomputed reference and error messages).
        chosen_input_ids: [Tc] int64, prompt + chosen response (image placeholders included).
        chosen_labels: [Tc] int64, the token at each response position, ``ignore_index`` elsewhere.
        chosen_span_weights: [Tc] float32 >= 0, 0 where the label is ignored.
        rejected_input_ids, rejected_labels, rejected_span_weights: the same for the rejected response [Tr].
        images: vision inputs of this example's clean image(s), first dim over images/patches.
        corrupted_images: the same keys and shapes for v', or None when the example has no v'.
    """

    example_id: str
    chosen_input_ids: torch.Tensor
    chosen_labels: torch.Tensor
    chosen_span_weights: torch.Tensor
    rejected_input_ids: torch.Tensor
    rejected_labels: torch.Tensor
    rejected_span_weights: torch.Tensor
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    corrupted_images: dict[str, torch.Tensor] | None = None

    def content_hash(self) -> str:
        """A digest of the tokens, labels, span weights and vision inputs (not the id): equal digests, equal
        examples. It ties a precomputed reference to the content it was computed from."""
        digest = hashlib.blake2b(digest_size=16)
        tensors = [self.chosen_input_ids, self.chosen_labels, self.chosen_span_weights, self.rejected_input_ids,
                   self.rejected_labels, self.rejected_span_weights]
        for images in (self.images, self.corrupted_images or {}):
            tensors += [images[k] for k in sorted(images)]
            digest.update(repr(sorted(images)).encode())
        for t in tensors:
            update_digest(digest, t)
        return digest.hexdigest()

    def validate(self, ignore_index: int = -100) -> None:
        """Raise ``TypeError``/``ValueError`` naming the offending field if the example is malformed."""
        where = f"PreferenceExample({self.example_id!r})"
        if not isinstance(self.example_id, str) or not self.example_id:
            raise TypeError(f"PreferenceExample: `example_id` must be a non-empty str; got {self.example_id!r}")
        _check_token_row(
            where, "chosen", self.chosen_input_ids, self.chosen_labels, self.chosen_span_weights, ignore_index
        )
        _check_token_row(
            where, "rejected", self.rejected_input_ids, self.rejected_labels, self.rejected_span_weights, ignore_index
        )
        _check_vision(where, "images", self.images)
        if self.corrupted_images is not None:
            _check_vision(where, "corrupted_images", self.corrupted_images)
            _check_same_layout(where, "images", self.images, "corrupted_images", self.corrupted_images)


def _check_same_layout(where: str, name: str, images, other_name: str, other) -> None:
    if set(images) != set(other):
        raise ValueError(
            f"{where}: `{other_name}` must have the keys of `{name}` {sorted(images)}; got {sorted(other)}"
        )
    for key in images:
        if images[key].shape != other[key].shape:
            raise ValueError(
                f"{where}: `{other_name}[{key!r}]` must have the shape of `{name}[{key!r}]` "
                f"{tuple(images[key].shape)}; got {tuple(other[key].shape)}"
            )


@dataclass
class PreferenceBatch:
    """B collated preference examples: 2B right-padded token rows, chosen rows first.

    Attributes:
        input_ids: [2B, T] int64; rows 0..B-1 prompt + y+, rows B..2B-1 prompt + y-.
        attention_mask: [2B, T] int64, 1 on tokens, 0 on right padding.
        labels: [2B, T] int64, ``input_ids`` on response tokens, ``ignore_index`` elsewhere (not shifted).
        span_weights: [2B, T] float32 >= 0, 0 wherever ``labels`` is ignored.
        images: vision inputs of the B clean images, first dim over images/patches in example order.
        corrupted_images: the same keys and shapes for v' (rows without v' carry their clean image), or None
            when no example of the batch has v'.
        has_corrupted_image: [B] bool, or None exactly when ``corrupted_images`` is None.
        example_ids: B ids, in row order.
        content_hashes: B digests of what each example is (:meth:`PreferenceExample.content_hash`), or None;
            a precomputed reference checks them against the ones it was built from.
        prompt_lengths: [2B] int64, the prompt tokens of each row (the tokens before its first label), or
            None; families whose prompt attends itself both ways (PaliGemma) need it.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    span_weights: torch.Tensor
    images: dict[str, torch.Tensor]
    corrupted_images: dict[str, torch.Tensor] | None
    has_corrupted_image: torch.Tensor | None
    example_ids: tuple[str, ...]
    content_hashes: tuple[str, ...] | None = None
    prompt_lengths: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        """B, the number of preference pairs."""
        return len(self.example_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        """A copy with every tensor on ``device``; ids stay as they are."""

        def move(x):
            return None if x is None else x.to(device, non_blocking=non_blocking)

        def move_all(d):
            return None if d is None else {k: move(x) for k, x in d.items()}

        return PreferenceBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            labels=move(self.labels),
            span_weights=move(self.span_weights),
            images=move_all(self.images),
            corrupted_images=move_all(self.corrupted_images),
            has_corrupted_image=move(self.has_corrupted_image),
            example_ids=self.example_ids,
            content_hashes=self.content_hashes,
            prompt_lengths=move(self.prompt_lengths),
        )

    def pin_memory(self) -> PreferenceBatch:
        """Page-locked copy (called by ``DataLoader(pin_memory=True)``)."""
        pin = lambda x: None if x is None else x.pin_memory()  # noqa: E731
        return PreferenceBatch(
            input_ids=pin(self.input_ids),
            attention_mask=pin(self.attention_mask),
            labels=pin(self.labels),
            span_weights=pin(self.span_weights),
            images={k: pin(x) for k, x in self.images.items()},
            corrupted_images=None if self.corrupted_images is None else {
                k: pin(x) for k, x in self.corrupted_images.items()
            },
            has_corrupted_image=pin(self.has_corrupted_image),
            example_ids=self.example_ids,
            content_hashes=self.content_hashes,
            prompt_lengths=pin(self.prompt_lengths),
        )

    def validate(self, ignore_index: int = -100) -> None:
        """Raise ``TypeError``/``ValueError`` naming the offending field if the batch breaks the format."""
        where = "PreferenceBatch"
        if not isinstance(self.example_ids, tuple) or not all(isinstance(i, str) for i in self.example_ids):
            raise TypeError(f"{where}: `example_ids` must be a tuple of str; got {self.example_ids!r}")
        b = len(self.example_ids)
        if b == 0:
            raise ValueError(f"{where}: a batch needs at least one example; got none")
        for name in ("input_ids", "attention_mask", "labels", "span_weights"):
            x = getattr(self, name)
            if not isinstance(x, torch.Tensor):
                raise _fail_type(where, name, "a torch.Tensor", x)
            if x.dim() != 2 or x.shape[0] != 2 * b:
                raise ValueError(
                    f"{where}: `{name}` must be [2B, T] with B={b} examples; got shape {tuple(x.shape)}"
                )
            if x.shape != self.input_ids.shape:
                raise ValueError(
                    f"{where}: `{name}` must have the shape of `input_ids` {tuple(self.input_ids.shape)}; "
                    f"got {tuple(x.shape)}"
                )
        for name in ("input_ids", "attention_mask", "labels"):
            if getattr(self, name).dtype != torch.int64:
                raise TypeError(f"{where}: `{name}` must be int64; got {getattr(self, name).dtype}")
        if not self.span_weights.dtype.is_floating_point:
            raise TypeError(f"{where}: `span_weights` must be a float tensor; got {self.span_weights.dtype}")
        mask = self.attention_mask
        if bool(((mask != 0) & (mask != 1)).any()) or bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError(f"{where}: `attention_mask` must be 0/1 and right-padded (ones, then zeros)")
        if bool(((self.labels != ignore_index) & (mask == 0)).any()):
            raise ValueError(f"{where}: `labels` must be ignore_index={ignore_index} on padding")
        _check_labels_and_weights(where, "", self.input_ids, self.labels, self.span_weights, ignore_index)
        p = self.prompt_lengths
        if p is not None:
            if not isinstance(p, torch.Tensor) or p.dtype != torch.int64 or p.shape != (2 * b,):
                raise ValueError(
                    f"{where}: `prompt_lengths` must be an int64 tensor of shape [2B] = [{2 * b}] or None; got "
                    f"{getattr(p, 'dtype', type(p).__name__)} {tuple(getattr(p, 'shape', ()))}"
                )
            if bool((p < 0).any()) or bool((p > mask.sum(1)).any()):
                raise ValueError(f"{where}: `prompt_lengths` must lie between 0 and each row's token count")
        _check_vision(where, "images", self.images)
        if (self.corrupted_images is None) != (self.has_corrupted_image is None):
            raise ValueError(
                f"{where}: `corrupted_images` and `has_corrupted_image` must be both None or both given; got "
                f"{'None' if self.corrupted_images is None else 'a dict'} and "
                f"{'None' if self.has_corrupted_image is None else 'a tensor'}"
            )
        if self.corrupted_images is not None:
            _check_vision(where, "corrupted_images", self.corrupted_images)
            _check_same_layout(where, "images", self.images, "corrupted_images", self.corrupted_images)
            c = self.has_corrupted_image
            if not isinstance(c, torch.Tensor) or c.dtype != torch.bool or c.shape != (b,):
                raise ValueError(
                    f"{where}: `has_corrupted_image` must be a bool tensor of shape [B] = [{b}]; got "
                    f"{getattr(c, 'dtype', type(c).__name__)} {tuple(getattr(c, 'shape', ()))}"
                )


class PreferenceCollator:
    """Pads a list of :class:`PreferenceExample` into one :class:`PreferenceBatch` (``DataLoader`` collate_fn).

    Args:
        pad_token_id: token written on padding (never attended to, never a label).
        ignore_index: the label of positions that are not predicted.
        pad_to_multiple_of: round T up to a multiple of this (fewer distinct shapes, friendlier kernels).
        validate: check every example first (cheap next to a model pass; turn off only for speed tests).
        unique_ids: refuse a batch in which an example id repeats (ids key the precomputed reference; turn off
            only where equal ids mean equal content, e.g. ids that hash the example).
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        ignore_index: int = -100,
        pad_to_multiple_of: int | None = None,
        validate: bool = True,
        unique_ids: bool = True,
    ) -> None:
        for name, value in (("pad_token_id", pad_token_id), ("ignore_index", ignore_index)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"PreferenceCollator: `{name}` must be an int; got {type(value).__name__}")
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
        ):
            raise ValueError(
                f"PreferenceCollator: `pad_to_multiple_of` must be a positive int or None; got {pad_to_multiple_of!r}"
            )
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index
        self.pad_to_multiple_of = pad_to_multiple_of
        self.validate = validate
        self.unique_ids = unique_ids

    def __call__(self, examples: Sequence[PreferenceExample]) -> PreferenceBatch:
        if len(examples) == 0:
            raise ValueError("PreferenceCollator: `examples` must hold at least one example; got none")
        for ex in examples:
            if not isinstance(ex, PreferenceExample):
                raise TypeError(f"PreferenceCollator: examples must be PreferenceExample; got {type(ex).__name__}")
            if self.validate:
                ex.validate(self.ignore_index)
        ids = [ex.example_id for ex in examples]
        if self.unique_ids and len(set(ids)) != len(ids):
            raise ValueError(f"PreferenceCollator: example ids must be unique within a batch; got {ids}")
        rows = [(ex.chosen_input_ids, ex.chosen_labels, ex.chosen_span_weights) for ex in examples]
        rows += [(ex.rejected_input_ids, ex.rejected_labels, ex.rejected_span_weights) for ex in examples]
        length = max(r[0].shape[0] for r in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of

        n = len(rows)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((n, length), dtype=torch.int64)
        labels = torch.full((n, length), self.ignore_index, dtype=torch.int64)
        span_weights = torch.zeros((n, length), dtype=torch.float32)
        prompt_lengths = torch.zeros(n, dtype=torch.int64)
        for r, (row_ids, row_labels, row_weights) in enumerate(rows):
            t = row_ids.shape[0]
            input_ids[r, :t] = row_ids
            attention_mask[r, :t] = 1
            labels[r, :t] = row_labels
            span_weights[r, :t] = row_weights
            kept = (row_labels != self.ignore_index).nonzero()
            prompt_lengths[r] = int(kept[0]) if kept.numel() else t

        images = _concat_vision([ex.images for ex in examples], "images")
        corrupted_images = has_corrupted = None
        if any(ex.corrupted_images is not None for ex in examples):
            # Rows without v' reuse the clean image: the pass stays one batched call, and the loss gives
            # those rows weight c = 0.
            corrupted_images = _concat_vision(
                [ex.images if ex.corrupted_images is None else ex.corrupted_images for ex in examples],
                "corrupted_images",
            )
            has_corrupted = torch.tensor([ex.corrupted_images is not None for ex in examples], dtype=torch.bool)
        return PreferenceBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            span_weights=span_weights,
            images=images,
            corrupted_images=corrupted_images,
            has_corrupted_image=has_corrupted,
            example_ids=tuple(ids),
            content_hashes=tuple(e.content_hash() for e in examples),
            prompt_lengths=prompt_lengths,
        )


def _concat_vision(per_example: list[dict[str, torch.Tensor]], name: str) -> dict[str, torch.Tensor]:
    keys = set(per_example[0])
    for i, d in enumerate(per_example):
        if set(d) != keys:
            raise ValueError(
                f"PreferenceCollator: every example must carry the same `{name}` keys; example 0 has "
                f"{sorted(keys)}, example {i} has {sorted(d)}"
            )
    out = {}
    for key in sorted(keys):
        parts = [d[key] for d in per_example]
        ranks = {p.dim() for p in parts}
        if len(ranks) != 1:
            raise ValueError(
                f"PreferenceCollator: `{name}[{key!r}]` must have one number of dimensions across examples; got "
                f"shapes {[tuple(p.shape) for p in parts]}"
            )
        trailing = [max(sizes) for sizes in zip(*(p.shape[1:] for p in parts))]
        # Images of different sizes give stacks of different sizes (LlavaNext's anyres tiles, Pixtral's pixels,
        # Idefics3's sub-images and their pixel masks): zero-padded at the end of each dimension to the largest,
        # as the families' processors pad a batch; their models read the real extent from image_sizes, the pixel
        # mask, or an all-zero image meaning none.
        out[key] = torch.cat([_pad_to(p, trailing) for p in parts], dim=0)
    return out


def _pad_to(x: torch.Tensor, trailing: list[int]) -> torch.Tensor:
    if list(x.shape[1:]) == trailing:
        return x
    padded = x.new_zeros((x.shape[0], *trailing))
    padded[(slice(None), *(slice(0, n) for n in x.shape[1:]))] = x
    return padded

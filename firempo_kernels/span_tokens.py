"""The row layout of a preference batch and the gather of its span tokens (layer 3, shared by the losses).

A batch holds ``k * B`` rows in blocks of ``B``: (v, y+), (v, y-), and, when ``has_corrupted_image`` is
given, (v', y+), (v', y-). A *span token* is a position with span weight > 0 (its label is then never
``ignore_index``). Only span tokens enter any term of the loss, so they are located once, in row-major
order: block by block, example by example, position by position. That order puts the (v, y+) tokens first
(the only ones with a KL term) and the (v', .) tokens last.
"""

from typing import NamedTuple

import torch

from . import _validate as v

BLOCK_NAMES = ("(v, y+)", "(v, y-)", "(v', y+)", "(v', y-)")


class SpanTokens(NamedTuple):
    """Where the span tokens of a ``[k * B, T]`` batch are, in row-major order (S of them)."""

    num_examples: int  #: B
    num_blocks: int  #: k, 2 or 4
    seq_len: int  #: T
    index: torch.Tensor  #: [S] int64 flat positions into the ``[k * B * T]`` batch
    rows: torch.Tensor  #: [S] int64 row of each token, non-decreasing
    positions: torch.Tensor  #: [S] int64 position of each token in its row
    labels: torch.Tensor  #: [S] int64 target of each token
    weights: torch.Tensor  #: [S] span weight of each token, > 0, the dtype of ``span_weights``
    has_corrupted_image: torch.Tensor | None  #: [B] bool on the batch device, or None when k = 2

    def row_counts(self) -> torch.Tensor:
        """[k * B] int64: span tokens per row."""
        return torch.bincount(self.rows, minlength=self.num_blocks * self.num_examples)


def block_layout(fn: str, labels: torch.Tensor, has_corrupted_image) -> tuple[int, int]:
    """(B, k) of a batch whose ``labels`` are ``[k * B, T]``; raises when the rows don't tile into blocks."""
    rows = labels.shape[0]
    if has_corrupted_image is None:
        if rows == 0 or rows % 2:
            raise ValueError(
                f"{fn}: without `has_corrupted_image` the rows must form 2 blocks of B >= 1 examples, "
                f"(v, y+) then (v, y-); got {rows} rows"
            )
        return rows // 2, 2
    v.check_tensor(fn, "has_corrupted_image", has_corrupted_image, ndim=1)
    if has_corrupted_image.dtype != torch.bool:
        raise TypeError(f"{fn}: `has_corrupted_image` must be a bool tensor; got {has_corrupted_image.dtype}")
    num_examples = has_corrupted_image.shape[0]
    if num_examples == 0 or rows != 4 * num_examples:
        raise ValueError(
            f"{fn}: with `has_corrupted_image` of {num_examples} examples the rows must form 4 blocks of "
            f"B = {num_examples}, (v, y+), (v, y-), (v', y+), (v', y-), i.e. {4 * num_examples} rows; got {rows}"
        )
    return num_examples, 4


def gather_span_tokens(
    fn: str,
    labels: torch.Tensor,
    span_weights: torch.Tensor,
    has_corrupted_image: torch.Tensor | None,
    *,
    vocab: int,
    ignore_index: int,
    include_corrupted: bool = True,
) -> SpanTokens:
    """Validate ``labels`` / ``span_weights`` / ``has_corrupted_image`` and locate the span tokens.

    Args:
        labels: [k * B, T] integer.
        span_weights: [k * B, T] floating, finite, >= 0, and 0 wherever ``labels == ignore_index``.
        has_corrupted_image: [B] bool, or None (k = 2).
        vocab: V; the labels at span tokens must lie in [0, V).
        include_corrupted: False leaves out the (v', .) rows entirely (their loss term has weight 0).
            The rows of examples without v' are always left out.
    """
    v.check_tensor(fn, "labels", labels, ndim=2)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: `labels` must be an integer tensor; got {labels.dtype}")
    v.check_tensor(fn, "span_weights", span_weights)
    if not span_weights.dtype.is_floating_point:
        raise TypeError(f"{fn}: `span_weights` must be a floating tensor; got {span_weights.dtype}")
    if span_weights.shape != labels.shape:
        raise ValueError(
            f"{fn}: `span_weights` must be shaped like `labels` {tuple(labels.shape)}; got {tuple(span_weights.shape)}"
        )
    if span_weights.device != labels.device:
        raise ValueError(
            f"{fn}: `span_weights` must be on the device of `labels` ({labels.device}); got {span_weights.device}"
        )
    num_examples, num_blocks = block_layout(fn, labels, has_corrupted_image)
    if has_corrupted_image is not None:
        has_corrupted_image = has_corrupted_image.to(labels.device)

    # One host sync for all three checks; the diagnosis below runs only on failure.
    nonfinite = ~torch.isfinite(span_weights)
    negative = span_weights < 0
    ignored = (span_weights > 0) & (labels == ignore_index)
    if bool((nonfinite | negative | ignored).any()):
        for bad, what in (
            (nonfinite, "must be finite"),
            (negative, "must be >= 0"),
            (ignored, f"must be 0 where `labels` == ignore_index ({ignore_index})"),
        ):
            if bool(bad.any()):
                row, col = (int(i) for i in torch.nonzero(bad)[0])
                raise ValueError(
                    f"{fn}: `span_weights` {what}; got {span_weights[row, col].item()} at [{row}, {col}] "
                    f"(label {labels[row, col].item()}), {int(bad.sum())} such entries"
                )

    mask = span_weights > 0
    if num_blocks == 4:
        keep_corrupted = has_corrupted_image if include_corrupted else torch.zeros_like(has_corrupted_image)
        keep_rows = torch.cat((keep_corrupted.new_ones(2 * num_examples), keep_corrupted, keep_corrupted))
        mask &= keep_rows[:, None]
    seq_len = labels.shape[1]
    index = torch.nonzero(mask.reshape(-1))[:, 0]
    gathered = labels.reshape(-1).index_select(0, index).to(torch.int64)
    out_of_range = (gathered < 0) | (gathered >= vocab)
    if bool(out_of_range.any()):
        first = int(torch.nonzero(out_of_range)[0, 0])
        pos = int(index[first])
        raise ValueError(
            f"{fn}: `labels` at span tokens must lie in [0, {vocab}); got {gathered[first].item()} at "
            f"[{pos // seq_len}, {pos % seq_len}], {int(out_of_range.sum())} such span tokens"
        )
    return SpanTokens(
        num_examples=num_examples,
        num_blocks=num_blocks,
        seq_len=seq_len,
        index=index,
        rows=torch.div(index, seq_len, rounding_mode="floor"),
        positions=index % seq_len,
        labels=gathered,
        weights=span_weights.reshape(-1).index_select(0, index),
        has_corrupted_image=has_corrupted_image,
    )


def gather_rows(x: torch.Tensor, tokens: SpanTokens) -> torch.Tensor:
    """``x`` [k * B, T, d] -> [S, d], the span-token rows in row-major order."""
    # Indexing by (row, position) reads any strides; flattening a non-contiguous x would copy all of it.
    return x[tokens.rows, tokens.positions]

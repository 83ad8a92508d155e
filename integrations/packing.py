"""One prefix, two responses: the chosen and rejected rows of an example share their image-and-question
forward (docs/design.md section 6).

Per example, the two rows are the same prompt (image tokens and question, hundreds to thousands of tokens for
Qwen-VL at medical image sizes) followed by answers that differ in a phrase. The packed row is

    [ prompt (P) | chosen response (Rc) | rejected response (Rr) ]

under a mask where the prompt is causal, the chosen tokens see the prompt and the earlier chosen tokens, and
the rejected tokens see the prompt and the earlier rejected tokens (never the chosen ones). Positions are the
ones each token has in its own unpacked row, taken from the model itself (plain RoPE: 0, 1, ...; Qwen-VL's
M-RoPE: its ``get_rope_index``), so the rejected response continues from the prompt as it would alone. Every
token then sees exactly the keys, values and positions it sees unpacked, and its hidden state is the same
up to the rounding of another summation order, with the prompt (and the vision tower) run once, not twice.

The mask is 4-D (boolean for ``sdpa``, additive float for ``eager``), which transformers passes through
unchanged; other attention implementations (flash-attn, flex attention) run the unpacked forward
(:func:`can_pack`). Rows that share nothing still pack correctly (each response then sees
only itself).

Families whose attention is not causal everywhere say so through their adapter
(:meth:`~.models.ModelAdapter.attention_blocks`): Gemma 3's image tokens attend each other both ways,
PaliGemma's whole prompt does; those blocks lie inside the shared prefix and are added to the causal rule.
Sliding-window layers (Gemma 2 and 3) see only the keys within the window of their positions; where a row is
longer than the window the packed forward hands the model one mask per layer type, or, for a model that
takes only one mask, runs that batch unpacked (said once in the log).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch
from torch import nn

from .batch import PreferenceBatch

__all__ = ["PACKED_ATTENTION", "PackedLayout", "PackedRows", "pack_layout", "pack_rows",
           "attention_implementation", "can_pack", "packed_hidden_states"]

logger = logging.getLogger(__name__)

#: Attention implementations that take the packed 4-D mask. Flex attention could take the same rule as a
#: BlockMask, but on the CPU its compiled kernel gave NaN rows now and then for these masks: it runs unpacked
#: until that is understood on a GPU.
PACKED_ATTENTION = ("sdpa", "eager")
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.warning(message)


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation of the language model inside ``model``."""
    from .models import unwrap_model

    config = unwrap_model(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each token of the 2B unpacked rows sits in the B packed rows.

    Attributes:
        input_ids: [B, L] packed tokens (shared prefix, rest of the chosen row, rest of the rejected row, right
            padding).
        segment: [B, L] int64: 0 shared prefix, 1 chosen, 2 rejected, -1 padding.
        source: [B, L] int64: the column of the unpacked row each packed token comes from (its chosen row for
            the prefix and the chosen tokens, its rejected row for the rejected tokens).
        from_rejected: [B, L] bool: whether ``source`` indexes the rejected row.
        unpacked_index: [2B, T] int64: for each unpacked (row, column), the packed column holding it (prefix
            columns of a rejected row point at the shared prefix); padding points at column 0.
    """

    input_ids: torch.Tensor
    segment: torch.Tensor
    source: torch.Tensor
    from_rejected: torch.Tensor
    unpacked_index: torch.Tensor


def pack_layout(batch: PreferenceBatch) -> PackedLayout:
    """The packed layout of ``batch``. The shared part of an example's two rows is their longest common
    prefix: the prompt, and the first response tokens too where the answers begin alike (their hidden states
    are the same in both rows, as each sees the same tokens at the same positions)."""
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    b, t = batch.num_examples, ids.shape[1]
    lengths = mask.sum(1)
    differ = ~((ids[:b] == ids[b:]) & mask[:b] & mask[b:])
    prefix = torch.where(differ.any(1), differ.int().argmax(1), t)
    prefix = torch.minimum(prefix, torch.minimum(lengths[:b], lengths[b:]))
    chosen_len, rejected_len = lengths[:b] - prefix, lengths[b:] - prefix
    packed_len = prefix + chosen_len + rejected_len
    width = int(packed_len.max())
    pos = torch.arange(width, device=ids.device)[None, :].expand(b, width)
    p, rc = prefix[:, None], chosen_len[:, None]
    segment = torch.full((b, width), -1, dtype=torch.int64, device=ids.device)
    segment[pos < p] = 0
    segment[(pos >= p) & (pos < p + rc)] = 1
    segment[(pos >= p + rc) & (pos < packed_len[:, None])] = 2
    from_rejected = segment == 2
    source = torch.where(from_rejected, pos - rc, pos).clamp(0, t - 1)
    source = torch.where(segment < 0, 0, source)
    rows = torch.arange(b, device=ids.device)[:, None]
    packed_ids = torch.where(from_rejected, ids[b:][rows, source], ids[:b][rows, source])
    # Padding repeats each row's last token (its EOS): never an image placeholder, which the vision merge
    # would count against the image features.
    last = ids[:b].gather(1, (lengths[:b] - 1).clamp_min(0)[:, None])
    packed_ids = torch.where(segment < 0, last.expand(b, width), packed_ids)

    col = torch.arange(t, device=ids.device)[None, :]
    chosen_index = torch.where(col < lengths[:b, None], col, 0)
    rejected_index = torch.where(col < p, col, col + rc)
    rejected_index = torch.where(col < lengths[b:, None], rejected_index, 0)
    return PackedLayout(packed_ids, segment, source, from_rejected, torch.cat((chosen_index, rejected_index)))


def packed_mask(layout: PackedLayout, dtype: torch.dtype | None = None, *, blocks: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """[B, 1, L, L]: True where a query may attend a key (``dtype`` None, the form sdpa takes), or the additive
    form eager attention adds to its scores: 0 there, the dtype's lowest value elsewhere.

    ``blocks`` [B, L] int64: tokens with the same id >= 0 also attend each other forwards (bidirectional
    blocks, all inside the shared prefix). ``window`` with ``positions`` [B, L]: a sliding-window layer's mask,
    a key only where ``position(query) - position(key) < window``."""
    seg = layout.segment
    q, k = seg[:, :, None], seg[:, None, :]
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
    if blocks is not None:
        causal = causal | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    if window is not None:
        allowed &= positions[:, :, None] - positions[:, None, :] < window
    allowed |= torch.eye(width, dtype=torch.bool, device=seg.device) & (q < 0)  # padding sees itself: no empty row
    if dtype is None:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


def sliding_window(model: nn.Module) -> int | None:
    """The window of ``model``'s sliding-window layers, or None when every layer attends the whole row."""
    from .models import unwrap_model

    config = unwrap_model(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window is None or "sliding_attention" not in (getattr(text, "layer_types", None) or ()):
        return None
    return int(window)


def can_pack(model: nn.Module, adapter=None) -> bool:
    """Whether ``model``'s attention takes the packed mask and (``adapter`` given) its layers see the tokens
    only through it; if not, said once in the log."""
    if adapter is not None and not adapter.can_pack(model):
        _say_once(f"shared_prefix: {type(adapter).__name__} cannot pack {type(adapter.backbone(model)).__name__} "
                  "(a layer carries state along the row past the mask); running both rows in full")
        return False
    attn = attention_implementation(model)
    if attn not in PACKED_ATTENTION:
        _say_once(f"shared_prefix: attention implementation {attn!r} cannot take the packed mask (it needs one of "
                  f"{PACKED_ATTENTION}); running both rows in full")
        return False
    return True


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """What the packed forwards of one batch share, whichever image kind they run: the layout, each packed
    token's position and the attention mask."""

    layout: PackedLayout
    position_ids: torch.Tensor
    mask: torch.Tensor | dict[str, torch.Tensor]


def pack_rows(adapter, model: nn.Module, batch: PreferenceBatch,
              row_images: Mapping[str, torch.Tensor]) -> PackedRows | None:
    """The packed rows of ``batch`` for ``model``, or None where this batch cannot be packed for it (rows
    longer than a sliding window of a model that takes one mask for all its layers; said once in the log).
    ``row_images``: the vision inputs of the 2B unpacked rows, which place the image tokens for the model's
    positions (the same for v and v', which have one size)."""
    layout = pack_layout(batch)
    b = batch.num_examples
    unpacked = adapter.position_ids(model, batch.input_ids, batch.attention_mask, row_images)  # [..., 2B, T]
    rows = torch.arange(b, device=layout.source.device)[:, None]

    def packed(per_row: torch.Tensor) -> torch.Tensor:
        return torch.where(layout.from_rejected, per_row[..., b:, :][..., rows, layout.source],
                           per_row[..., :b, :][..., rows, layout.source])

    positions = packed(unpacked)
    blocks = adapter.attention_blocks(model, batch.input_ids, batch.attention_mask, batch.prompt_lengths)
    if blocks is not None:
        blocks = torch.where(layout.segment == 0, packed(blocks), -1)  # bidirectional only inside the prefix
    if attention_implementation(model) == "sdpa":
        dtype = None  # boolean, as transformers builds for sdpa: right whatever dtype autocast picks
    else:
        dtype = next(p.dtype for p in adapter.backbone(model).parameters() if p.is_floating_point())
    window = sliding_window(model)
    binding = window is not None and int(batch.attention_mask.sum(1).max()) > window
    if binding and not adapter.mask_per_layer_type:
        _say_once(f"shared_prefix: {type(adapter).__name__} takes one attention mask for all layers and a row is "
                  f"longer than the sliding window ({window}); running such batches unpacked")
        return None
    both_ways = adapter.bidirectional_layer_types

    def layer_mask(kind: str | None) -> torch.Tensor:
        own_blocks = blocks if both_ways is None or kind in both_ways else None
        own_window = window if binding and kind == "sliding_attention" else None
        return packed_mask(layout, dtype, blocks=own_blocks, positions=positions, window=own_window)

    if window is not None and adapter.mask_per_layer_type:
        mask = {kind: layer_mask(kind) for kind in ("full_attention", "sliding_attention")}
    else:
        mask = layer_mask(None)
    return PackedRows(layout, positions, mask)


def packed_hidden_states(adapter, model: nn.Module, images: Mapping[str, torch.Tensor],
                         packed: PackedRows) -> torch.Tensor:
    """[2B, T, d]: the hidden states of the unpacked rows (chosen rows, then rejected rows) from one packed
    forward of B rows with the vision inputs of the B examples once each."""
    layout = packed.layout
    hidden = adapter.hidden_states(model, layout.input_ids, packed.mask, images, position_ids=packed.position_ids)
    b = layout.input_ids.shape[0]
    packed_rows = torch.cat((torch.arange(b), torch.arange(b))).to(hidden.device)[:, None]
    return hidden[packed_rows, layout.unpacked_index]

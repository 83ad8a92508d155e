"""Reference-model values stored ahead of training, so that a preference step needs no reference forward.

The FiRe-MPO loss reads the reference model at the span tokens only: a target log-prob at each of them, and
the full next-token distribution at the (v, y+) span tokens (for the token KL). :class:`PrecomputedReference`
holds exactly that: the log-probs as one flat vector and the reference hidden states at the (v, y+) span
tokens (the KL rebuilds the reference logits from them, so nothing of size V is stored). A trainer builds it
from one reference forward, splits it per example, stores the pieces with the data and collates them back.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _validate as v
from .ops import fused_linear_logprobs
from .span_tokens import gather_rows, gather_span_tokens


class PrecomputedReference(NamedTuple):
    """What the FiRe-MPO loss needs from the reference model, for a batch of ``k`` blocks of ``B`` rows.

    Span tokens are ordered row-major over the ``[k * B, T]`` batch (block, then example, then position),
    the order in which the loss gathers them. Build it with :meth:`from_reference_forward`; pass it to the
    loss in place of ``ref_hidden``, with the same ``labels``, ``span_weights`` and ``has_corrupted_image``.
    One built with the (v', .) blocks also serves the same examples without them (a batch of the first two
    blocks only, or a loss with gamma = 0).
    """

    logps: torch.Tensor
    """[S] float: log pi_ref of the target at every span token of every row."""
    row_counts: torch.Tensor
    """[k, B] int64: span tokens in each row, ``row_counts[j, i]`` for block j of example i."""
    hidden: torch.Tensor | None
    """[S0, d'] reference hidden states at the (v, y+) span tokens (S0 = ``row_counts[0].sum()``), or None
    (enough when the loss has alpha = 0)."""
    temperature: float
    """The temperature the log-probs were computed at; the loss checks it equals its own."""
    softcap: float | None = None
    """The logit soft cap the log-probs were computed with (None: none, also for stores written before the
    field existed); the loss checks it equals its own."""

    @property
    def num_examples(self) -> int:
        """B."""
        return self.row_counts.shape[1]

    @property
    def num_blocks(self) -> int:
        """k: 4 with the (v', .) blocks, else 2."""
        return self.row_counts.shape[0]

    @classmethod
    def from_reference_forward(
        cls,
        ref_weight: torch.Tensor,
        ref_hidden: torch.Tensor,
        labels: torch.Tensor,
        span_weights: torch.Tensor,
        has_corrupted_image: torch.Tensor | None = None,
        *,
        ref_bias: torch.Tensor | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        keep_hidden: bool = True,
        softcap: float | None = None,
    ) -> "PrecomputedReference":
        """Evaluate the reference head at the span tokens of one batch; runs without autograd.

        Args:
            ref_weight: [V, d'] reference head.
            ref_hidden: [k * B, T, d'] reference hidden states, the dtype of ``ref_weight``; rows as for the
                loss: (v, y+), (v, y-) and, with ``has_corrupted_image``, (v', y+), (v', y-).
            labels: [k * B, T] integer, already shifted (``ref_hidden[r, t]`` predicts ``labels[r, t]``).
            span_weights: [k * B, T] floating, >= 0, 0 where ``labels == ignore_index``.
            has_corrupted_image: [B] bool, or None (k = 2).
            ref_bias: optional [V].
            temperature: must equal the loss's ``temperature``.
            ignore_index: must equal the loss's ``ignore_index``.
            keep_hidden: store the (v, y+) span-token hidden states (needed when the loss has alpha > 0).
            softcap: must equal the loss's ``softcap`` (None: no cap).

        Returns:
            The batch's :class:`PrecomputedReference`, detached, on the device of ``ref_hidden``; ``logps``
            float32 (float64 for float64 inputs).
        """
        fn = "PrecomputedReference.from_reference_forward"
        v.check_head(fn, "ref_weight", ref_weight, "ref_bias", ref_bias)
        softcap = v.check_softcap(fn, softcap)
        v.check_tensor(fn, "labels", labels, ndim=2)
        v.check_hidden(fn, "ref_hidden", ref_hidden, "ref_weight", ref_weight, labels)
        tokens = gather_span_tokens(
            fn, labels, span_weights, has_corrupted_image, vocab=ref_weight.shape[0], ignore_index=ignore_index
        )
        row_counts = tokens.row_counts().reshape(tokens.num_blocks, tokens.num_examples)
        with torch.no_grad():
            hidden = gather_rows(ref_hidden, tokens)
            logps = fused_linear_logprobs(
                hidden, ref_weight, tokens.labels, bias=ref_bias, temperature=temperature, ignore_index=ignore_index,
                softcap=softcap,
            )
        kept = hidden[: int(row_counts[0].sum())].clone() if keep_hidden else None
        return cls(logps, row_counts, kept, float(temperature), softcap)

    def unbind(self) -> list["PrecomputedReference"]:
        """Split into B single-example references (each with ``row_counts`` of shape [k, 1]), for storage."""
        counts = self.row_counts.cpu()
        rows = torch.split(self.logps, counts.reshape(-1).tolist())
        hidden_rows = torch.split(self.hidden, counts[0].tolist()) if self.hidden is not None else None
        k, b = counts.shape
        return [
            PrecomputedReference(
                torch.cat([rows[j * b + i] for j in range(k)]),
                self.row_counts[:, i : i + 1].clone(),
                hidden_rows[i].clone() if hidden_rows is not None else None,
                self.temperature,
                self.softcap,
            )
            for i in range(b)
        ]

    @staticmethod
    def collate(references: Sequence["PrecomputedReference"]) -> "PrecomputedReference":
        """Join references of consecutive examples into one batch (the inverse of :meth:`unbind`).

        References with 2 blocks may be joined with references with 4: their examples get empty (v', .)
        rows, as examples without a corrupted image have. Either all or none must carry ``hidden``.
        """
        fn = "PrecomputedReference.collate"
        if not references:
            raise ValueError(f"{fn}: `references` must hold at least one PrecomputedReference; got none")
        for n, ref in enumerate(references):
            if not isinstance(ref, PrecomputedReference):
                raise TypeError(f"{fn}: `references[{n}]` must be a PrecomputedReference; got {type(ref).__name__}")
        with_hidden = [ref.hidden is not None for ref in references]
        if any(with_hidden) and not all(with_hidden):
            raise ValueError(
                f"{fn}: either every reference or none must carry `hidden`; "
                f"references {[n for n, h in enumerate(with_hidden) if not h]} lack it"
            )
        temperatures = sorted({ref.temperature for ref in references})
        if len(temperatures) > 1:
            raise ValueError(f"{fn}: all references must share one temperature; got {temperatures}")
        caps = {ref.softcap for ref in references}
        if len(caps) > 1:
            raise ValueError(f"{fn}: all references must share one softcap; got {sorted(caps, key=str)}")
        k = max(ref.num_blocks for ref in references)
        counts = [ref.row_counts.cpu() for ref in references]
        per_ref_rows = [torch.split(ref.logps, c.reshape(-1).tolist()) for ref, c in zip(references, counts)]
        logps = []
        for j in range(k):
            for ref, rows in zip(references, per_ref_rows):
                if j < ref.num_blocks:
                    logps.extend(rows[j * ref.num_examples : (j + 1) * ref.num_examples])
        row_counts = torch.cat(
            [torch.nn.functional.pad(ref.row_counts, (0, 0, 0, k - ref.num_blocks)) for ref in references], dim=1
        )
        hidden = torch.cat([ref.hidden for ref in references]) if all(with_hidden) else None
        return PrecomputedReference(torch.cat(logps), row_counts, hidden, temperatures[0], caps.pop())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PrecomputedReference":
        """The same reference with every tensor on ``device``."""
        def move(x):
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return self._replace(logps=move(self.logps), row_counts=move(self.row_counts), hidden=move(self.hidden))

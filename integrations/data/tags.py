"""``<mask>...</mask>`` span tags: parsing, and span weights aligned with any Hugging Face tokenizer.

A response such as ``"The lesion is in the <mask>left</mask> lung."`` carries its edited phrases in tags.
The tags are removed at the character level first; the untagged text is tokenised once, with offsets, and
a token is weighted when its non-blank characters fall inside a tagged phrase. The tokenizer therefore
never sees a tag, whether it would have kept ``<mask>`` as one special token, split it into ``<``,
``mask``, ``>``, or glued it to a neighbouring word, and the token ids are exactly those of the untagged
response the model is trained to produce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

TAG_OPEN = "<mask>"
TAG_CLOSE = "</mask>"
_TAG_RE = re.compile(re.escape(TAG_OPEN) + "|" + re.escape(TAG_CLOSE))


class TagError(ValueError):
    """A response whose tags are unbalanced, nested or empty."""


class SpanAlignmentError(ValueError):
    """A tagged phrase that the tokenizer's tokens cannot represent exactly."""


@dataclass(frozen=True)
class TaggedText:
    """A response with its tags removed.

    ``text`` is the untagged response; ``spans`` are the ``(start, end)`` character ranges (end exclusive)
    in ``text`` of the tagged phrases, in order, trimmed of surrounding whitespace.
    """

    text: str
    spans: tuple[tuple[int, int], ...]

    @property
    def phrases(self) -> tuple[str, ...]:
        """The tagged phrases, in order."""
        return tuple(self.text[a:b] for a, b in self.spans)

    def tagged(self) -> str:
        """The response with its tags put back (whitespace inside tags normalised to the outside)."""
        return insert_tags(self.text, self.spans)


def insert_tags(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """``text`` with ``<mask>``/``</mask>`` around each ``(start, end)`` range of ``spans`` (sorted, disjoint)."""
    out, pos = [], 0
    for a, b in spans:
        if a < pos or b < a or b > len(text):
            raise ValueError(f"insert_tags: `spans` must be sorted, disjoint ranges within the text; got {list(spans)}")
        out += [text[pos:a], TAG_OPEN, text[a:b], TAG_CLOSE]
        pos = b
    out.append(text[pos:])
    return "".join(out)


def parse_tags(tagged: str, *, where: str = "response") -> TaggedText:
    """Removes the ``<mask>`` tags from ``tagged`` and returns the text and the tagged character ranges.

    Args:
        tagged: a response such as ``"in the <mask>left</mask> lung"``.
        where: how to name the response in error messages (e.g. ``"record 'x17', chosen"``).

    Raises:
        TypeError: ``tagged`` is not a string.
        TagError: a closing tag without an opening one, an opening tag never closed, a tag inside a tag,
            or a tag around nothing but whitespace.
    """
    if not isinstance(tagged, str):
        raise TypeError(f"parse_tags: `tagged` must be a str; got {type(tagged).__name__}")
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0  # characters of untagged text emitted so far
    open_at: int | None = None
    pos = 0
    for m in _TAG_RE.finditer(tagged):
        pieces.append(tagged[pos : m.start()])
        length += m.start() - pos
        pos = m.end()
        if m.group() == TAG_OPEN:
            if open_at is not None:
                raise TagError(f"{where}: nested {TAG_OPEN} at character {m.start()} of {tagged!r}")
            open_at = length
        else:
            if open_at is None:
                raise TagError(f"{where}: {TAG_CLOSE} without an opening tag at character {m.start()} of {tagged!r}")
            spans.append((open_at, length))
            open_at = None
    if open_at is not None:
        raise TagError(f"{where}: {TAG_OPEN} is never closed in {tagged!r}")
    pieces.append(tagged[pos:])
    text = "".join(pieces)
    trimmed = []
    for a, b in spans:
        phrase = text[a:b]
        if not phrase.strip():
            raise TagError(f"{where}: empty {TAG_OPEN}{TAG_CLOSE} span at character {a} of the untagged text {text!r}")
        a += len(phrase) - len(phrase.lstrip())
        b -= len(phrase) - len(phrase.rstrip())
        trimmed.append((a, b))
    return TaggedText(text=text, spans=tuple(trimmed))


def count_tags(tagged: str) -> int:
    """Number of opening tags in ``tagged`` (balance is checked by :func:`parse_tags`)."""
    return tagged.count(TAG_OPEN)


@dataclass(frozen=True)
class EncodedResponse:
    """One response tokenised for training.

    ``input_ids`` and ``span_weights`` have one entry per token, the EOS token last (weight 0);
    ``offsets`` are each token's ``(start, end)`` characters in ``text`` (``(len(text), len(text))`` for EOS).
    """

    text: str
    input_ids: tuple[int, ...]
    span_weights: tuple[float, ...]
    offsets: tuple[tuple[int, int], ...]

    def tagged(self) -> str:
        """The untagged text with tags put back around the weighted tokens: what the model is rewarded on."""
        spans: list[tuple[int, int]] = []
        for (a, b), w in zip(self.offsets, self.span_weights):
            if w == 0 or a == b:
                continue
            a, b = _trim(self.text, a, b)
            if spans and not self.text[spans[-1][1] : a].strip():
                spans[-1] = (spans[-1][0], b)  # contiguous weighted tokens form one phrase
            else:
                spans.append((a, b))
        return insert_tags(self.text, spans)


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    """Shrinks ``[a, b)`` to its non-blank characters (tokenizers differ on who owns a leading space)."""
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "encode_response: the tokenizer has no eos_token_id; set one (tokenizer.eos_token = '...') so that "
            "responses can end with EOS as in training"
        )
    return int(eos)


def encode_response(
    tokenizer: Any,
    tagged: str,
    *,
    where: str = "response",
    weight: float = 1.0,
    add_eos: bool = True,
    boundary: Literal["error", "expand"] = "error",
) -> EncodedResponse:
    """Tokenises a tagged response and returns per-token span weights aligned by character offsets.

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (``return_offsets_mapping`` must work).
        tagged: the response with ``<mask>...</mask>`` around the phrases to weight.
        where: how to name the response in errors, e.g. ``"record 'x17', chosen"``.
        weight: the weight of a token inside a span (the paper uses 1; any finite value >= 0).
        add_eos: append the tokenizer's EOS token (weight 0), as the paper does.
        boundary: a token that straddles a phrase boundary (non-blank characters both inside and outside
            the phrase, e.g. ``<mask>left</mask>ward`` tokenised as ``leftward``) raises
            :class:`SpanAlignmentError` with ``"error"``; with ``"expand"`` the whole token is weighted.

    Returns:
        :class:`EncodedResponse` with ``input_ids`` (int) and ``span_weights`` (float) of equal length.

    Raises:
        TagError: bad tags. SpanAlignmentError: a phrase no token covers, or a straddling token (see
        ``boundary``); both messages name ``where`` and the phrase. ValueError: no offsets or no EOS.
    """
    if boundary not in ("error", "expand"):
        raise ValueError(f"encode_response: `boundary` must be 'error' or 'expand'; got {boundary!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0.0 <= float(weight) < float("inf")):
        raise ValueError(f"encode_response: `weight` must be a finite number >= 0; got {weight!r}")
    parsed = parse_tags(tagged, where=where)
    text = parsed.text
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise ValueError(
            f"encode_response: the tokenizer {type(tokenizer).__name__} cannot return offsets; use a fast "
            f"tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
        ) from e
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    if len(ids) != len(offsets):
        raise ValueError(f"encode_response: {where}: tokenizer returned {len(ids)} ids but {len(offsets)} offsets")
    weights = [0.0] * len(ids)
    for a, b in parsed.spans:
        phrase = text[a:b]
        covered = []
        for i, (s, e) in enumerate(offsets):
            s, e = _trim(text, max(s, 0), min(e, len(text)))
            if s >= e or e <= a or s >= b:
                continue
            if s < a or e > b:
                if boundary == "error":
                    raise SpanAlignmentError(
                        f"{where}: phrase {phrase!r} does not start/end on a token boundary: token "
                        f"{text[s:e]!r} (characters {s}-{e}) crosses it; move the tag to a word boundary or "
                        f"pass boundary='expand'"
                    )
            covered.append(i)
        if not covered:
            raise SpanAlignmentError(
                f"{where}: phrase {phrase!r} (characters {a}-{b}) is covered by no token of the untagged text; "
                f"the tokenizer returned offsets {offsets}"
            )
        got = _covered_chars(text, [offsets[i] for i in covered])
        want = {c for c in range(a, b) if not text[c].isspace()}
        if not want <= got:
            missing = "".join(text[c] for c in sorted(want - got))
            raise SpanAlignmentError(
                f"{where}: phrase {phrase!r}: characters {missing!r} are covered by no token; the tokenizer's "
                f"offsets do not match its text"
            )
        for i in covered:
            weights[i] = float(weight)
    if add_eos:
        ids.append(_eos_id(tokenizer))
        weights.append(0.0)
        offsets.append((len(text), len(text)))
    return EncodedResponse(text=text, input_ids=tuple(ids), span_weights=tuple(weights), offsets=tuple(offsets))


def _covered_chars(text: str, offsets: Sequence[tuple[int, int]]) -> set[int]:
    chars: set[int] = set()
    for s, e in offsets:
        chars.update(c for c in range(max(s, 0), min(e, len(text))) if not text[c].isspace())
    return chars

"""Word-level diff of two answers that tags exactly the phrases where they differ, on both sides.

This is the second step of the paper's pair construction (an LLM call there): given an answer and its
minimally edited alternative, wrap each differing phrase of both sentences in ``<mask>...</mask>``.

Words are runs of letters/digits or single punctuation marks, so ``"lung."`` and ``"lungs."`` differ in
``lung``/``lungs`` only. The words are aligned at least edit distance (a substitution, insertion or
deletion costs one word; among equal costs the alignment keeping more words equal wins), and each maximal
run of differing words becomes one tagged phrase. A pure insertion (``"lesion"`` vs ``"no lesion"``)
leaves one side with nothing to tag; there the phrase is widened by one unchanged neighbouring word on both
sides (``"<mask>lesion</mask>"`` vs ``"<mask>no lesion</mask>"``), so
that every difference is a pair of tagged phrases and both responses carry a reward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .tags import insert_tags

_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclass(frozen=True)
class TaggedPair:
    """Both sides of a diff with their differing phrases tagged."""

    first: str
    second: str
    first_phrases: tuple[str, ...]
    second_phrases: tuple[str, ...]


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(), m.start(), m.end()) for m in _WORD_RE.finditer(text)]


def _changed_blocks(a: list[str], b: list[str]) -> list[list[int]]:
    """Word ranges ``[a0, a1, b0, b1]`` that differ, from a minimum edit-distance alignment.

    Substitutions, insertions and deletions cost 1 word each; among alignments of least cost the one
    keeping the most words equal wins. Unlike a longest-matching-block diff, this aligns ``lobe lobe the``
    with ``X lobe Y`` as two substitutions, so a minimal edit is tagged word for word even when words repeat.
    """
    n, m = len(a), len(b)
    # cost[i][j] = (edits, -matches) to align a[i:] with b[j:]; tuples compare lexicographically
    cost = [[(0, 0)] * (m + 1) for _ in range(n + 1)]
    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            if i == n and j == m:
                continue
            options = []
            if i < n and j < m:
                c = cost[i + 1][j + 1]
                options.append((c[0], c[1] - 1) if a[i] == b[j] else (c[0] + 1, c[1]))
            if i < n:
                options.append((cost[i + 1][j][0] + 1, cost[i + 1][j][1]))
            if j < m:
                options.append((cost[i][j + 1][0] + 1, cost[i][j + 1][1]))
            cost[i][j] = min(options)
    blocks: list[list[int]] = []
    i = j = 0
    while i < n or j < m:
        if i < n and j < m and a[i] == b[j] and cost[i][j] == (cost[i + 1][j + 1][0], cost[i + 1][j + 1][1] - 1):
            i, j = i + 1, j + 1
            continue
        if i < n and j < m and a[i] != b[j] and cost[i][j] == (cost[i + 1][j + 1][0] + 1, cost[i + 1][j + 1][1]):
            step = (1, 1)
        elif i < n and cost[i][j] == (cost[i + 1][j][0] + 1, cost[i + 1][j][1]):
            step = (1, 0)
        else:
            step = (0, 1)
        if blocks and blocks[-1][1] == i and blocks[-1][3] == j:
            blocks[-1][1] += step[0]
            blocks[-1][3] += step[1]
        else:
            blocks.append([i, i + step[0], j, j + step[1]])
        i, j = i + step[0], j + step[1]
    return blocks


def tag_differences(first: str, second: str) -> TaggedPair:
    """Tags the phrases where ``first`` and ``second`` differ, word by word.

    Args:
        first, second: two answers (untagged), e.g. the model's answer and its edit.

    Returns:
        :class:`TaggedPair` with the tagged texts (whitespace and punctuation kept exactly) and the phrases.

    Raises:
        TypeError: an argument is not a string. ValueError: an argument is blank, or the two have the same
        words (nothing to tag; whitespace-only differences do not count).
    """
    for name, value in (("first", first), ("second", second)):
        if not isinstance(value, str):
            raise TypeError(f"tag_differences: `{name}` must be a str; got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"tag_differences: `{name}` must contain at least one word; got {value!r}")
    wa, wb = _words(first), _words(second)
    blocks = _changed_blocks([w for w, _, _ in wa], [w for w, _, _ in wb])
    if not blocks:
        raise ValueError(f"tag_differences: the two texts have the same words; nothing to tag: {first!r}")
    for blk in blocks:
        a0, a1, b0, b1 = blk
        if a0 == a1 or b0 == b1:  # insertion or deletion: borrow the next unchanged word, else the previous
            if a1 < len(wa) and b1 < len(wb):
                blk[1], blk[3] = a1 + 1, b1 + 1
            else:
                blk[0], blk[2] = a0 - 1, b0 - 1
    merged: list[list[int]] = []
    for blk in blocks:  # a borrowed word can make two blocks touch: one phrase, not two adjacent tags
        if merged and (blk[0] <= merged[-1][1] or blk[2] <= merged[-1][3]):
            merged[-1][1], merged[-1][3] = max(merged[-1][1], blk[1]), max(merged[-1][3], blk[3])
        else:
            merged.append(blk)
    spans_a = [(wa[a0][1], wa[a1 - 1][2]) for a0, a1, _, _ in merged]
    spans_b = [(wb[b0][1], wb[b1 - 1][2]) for _, _, b0, b1 in merged]
    return TaggedPair(
        first=insert_tags(first, spans_a),
        second=insert_tags(second, spans_b),
        first_phrases=tuple(first[a:b] for a, b in spans_a),
        second_phrases=tuple(second[a:b] for a, b in spans_b),
    )

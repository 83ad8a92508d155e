"""Progress bars for the long steps: count, rate and time left, on stderr so stdout stays parseable."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it") -> Iterator[T]:
    """Wraps ``items`` in a tqdm bar (``12/100 [00:01<00:08, 10.5 record/s]``).

    ``FIREMPO_PROGRESS=0`` turns bars off (logs of batch jobs).
    """
    if os.environ.get("FIREMPO_PROGRESS", "1") == "0":
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

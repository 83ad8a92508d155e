"""The output folder of a ``firempo-train`` run: one consistent history per folder.

- A new run into a folder that already holds one is refused (its checkpoints would be rotated away by the
  new run's ``save_total_limit``, its ``trainer_state.json`` replaced): continue it with
  ``training.resume_from=latest``, or start over with ``training.overwrite_output_dir=true``.
- The run config is recorded in the folder (``firempo_run.json``), with a digest of the record file; a resume
  compares them key by key and refuses changes that would make the continued run another one (learning
  rate, batch size, loss, data, the records in the data file), naming them; the keys in
  :data:`SAFE_ON_RESUME` may change.
- ``resume_from=latest`` takes the newest *complete* checkpoint: a checkpoint cut short by a crash (no
  readable ``trainer_state.json``, no weights) is passed over, saying so. DeepSpeed's ``latest`` tag must name
  a folder inside the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli import atomic_write
from .run_config import RunConfig

__all__ = ["RUN_RECORD", "SAFE_ON_RESUME", "check_new_run", "record_run", "check_resume", "resume_checkpoint",
           "checkpoint_problem"]

RUN_RECORD = "firempo_run.json"
#: Keys a resumed run may change: where and how often it writes and logs, and how long it runs (the
#: schedule is then recomputed for the new length, which the log says).
SAFE_ON_RESUME = frozenset({
    "training.output_dir", "training.resume_from", "training.overwrite_output_dir", "training.max_steps",
    "training.epochs", "training.save_steps", "training.save_total_limit", "training.logging_steps",
    "training.progress_bar", "training.tensorboard", "training.num_workers", "training.save_final_model",
    "training.shared_prefix",  # the same hidden states, another summation order
})
_SCHEDULE = ("training.max_steps", "training.epochs")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def _checkpoints(out: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _previous_run(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    names = [p.name for p in _checkpoints(out)]
    names += [n for n in ("trainer_state.json", "final", RUN_RECORD) if (out / n).exists()]
    return names


def check_new_run(run: RunConfig, *, is_main: bool, log: Callable[[str], None]) -> None:
    """Refuse a fresh run into a folder holding another run, or clear that run's files when
    ``training.overwrite_output_dir`` is set (only the files a run writes: checkpoints, state, final, record)."""
    out = Path(run.training.output_dir)
    found = _previous_run(out)
    if not found or run.training.resume_from is not None:
        return
    if not run.training.overwrite_output_dir:
        shown = ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")
        raise ValueError(
            f"training.output_dir={out} already holds a run ({shown}). Continue it with training.resume_from=latest, "
            "start it over with training.overwrite_output_dir=true (its checkpoints are deleted), or choose "
            "another training.output_dir"
        )
    if is_main:
        log(f"training.overwrite_output_dir: removing the previous run's {', '.join(found)} from {out}")
        for name in found:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()


_DATA_CONTENTS = "data.path contents"


def _record(run: RunConfig) -> dict[str, Any]:
    """The run config, plus a digest of the record file when the data come from one: the same path with
    other records in it is other data."""
    record = run.to_dict()
    if run.data.source() == "path":
        path = Path(run.resolve_path(run.data.path))
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            record[_DATA_CONTENTS] = f"sha256:{digest.hexdigest()[:16]}"
    return record


def record_run(run: RunConfig) -> None:
    """Write the run config into the output folder (main process; replaced whole)."""
    with atomic_write(Path(run.training.output_dir) / RUN_RECORD) as f:
        json.dump(_record(run), f, indent=1, sort_keys=True)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_resume(run: RunConfig, checkpoint: Path, log: Callable[[str], None]) -> None:
    """Compare the run config with the one recorded for the run being resumed; refuse unsafe changes."""
    recorded = next((p / RUN_RECORD for p in (checkpoint.parent, Path(run.training.output_dir))
                     if (p / RUN_RECORD).is_file()), None)
    if recorded is None:
        log(f"resume: no {RUN_RECORD} beside {checkpoint}, so the run config cannot be compared with the original")
        return
    try:
        before = _flat(json.loads(recorded.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"resume: {recorded} is unreadable ({e}); restore it or remove it to resume unchecked"
        ) from None
    now = _flat(_record(run))
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
    unsafe = {k: v for k, v in changed.items() if k not in SAFE_ON_RESUME}
    if unsafe:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
        raise ValueError(
            f"resume from {checkpoint}: the run config differs from the one the run started with ({recorded}) in "
            f"{shown}. A resumed run continues the same run: put these back, or start a new run in another "
            "training.output_dir"
        )
    accepted = {k: v for k, v in changed.items() if k not in ("training.resume_from", "training.output_dir")}
    if accepted:
        recomputed = set(accepted) & set(_SCHEDULE)
        note = " (the learning-rate schedule is recomputed for the new length)" if recomputed else ""
        log("resume: accepted changes " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in accepted.items()) + note)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a crash while it was written, a planted tag), or None."""
    state = checkpoint / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "it has no trainer_state.json (written last, so the checkpoint was cut short)"
    except (OSError, ValueError) as e:
        return f"its trainer_state.json is unreadable ({e})"
    tag_file = checkpoint / "latest"
    if tag_file.is_file():  # DeepSpeed's pointer to the folder holding its partitioned states
        tag = tag_file.read_text(encoding="utf-8").strip()
        target = (checkpoint / tag).resolve()
        if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or target.parent != checkpoint.resolve():
            return f"its DeepSpeed `latest` names {tag!r}, which is not a folder inside the checkpoint"
        if not target.is_dir():
            return f"its DeepSpeed `latest` names {tag!r}, which does not exist"
        return None
    if not any((checkpoint / w).is_file() for w in _WEIGHTS):
        return "it holds no weights (model.safetensors / adapter_model.safetensors) and no DeepSpeed states"
    return None


def resume_checkpoint(run: RunConfig, log: Callable[[str], None]) -> str | None:
    """The checkpoint to resume from (``training.resume_from``), checked; None to start fresh."""
    where = run.training.resume_from
    if where is None:
        return None
    if where == "latest":
        out = Path(run.training.output_dir)
        for checkpoint in reversed(_checkpoints(out) if out.is_dir() else []):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                check_resume(run, checkpoint, log)
                return str(checkpoint)
            log(f"resume_from=latest: passing over {checkpoint.name}: {problem}")
        if _previous_run(out):
            raise ValueError(
                f"training.resume_from=latest: {out} holds a run but no complete checkpoint to continue it from; "
                "start it over with training.overwrite_output_dir=true, or choose another training.output_dir"
            )
        log(f"resume_from=latest: nothing to resume under {out}, starting fresh")
        return None
    checkpoint = Path(run.resolve_path(where))
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"training.resume_from={where!r} is not a checkpoint directory")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise ValueError(f"training.resume_from={where!r}: cannot resume from it: {problem}")
    check_resume(run, checkpoint, log)
    return str(checkpoint)

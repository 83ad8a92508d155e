"""The output folder of a ``firempo-train`` run: one consistent history per folder.

- A new run into a folder that already holds one is refused (its checkpoints would be rotated away by the
  new run's ``save_total_limit``, its ``trainer_state.json`` replaced): continue it with
  ``--resume_from_checkpoint latest``, or start over with ``--overwrite_output_dir``.
- The run's arguments (``TrainingArguments.to_dict()``, TRL's ``ModelConfig`` and the script arguments) are
  recorded in the folder (``firempo_run.json``), with a digest of the record file; a resume compares them key
  by key and refuses changes that would make the continued run another one (learning rate, batch size, loss,
  data, the records in the data file), naming them; the keys in :data:`SAFE_ON_RESUME` may change.
- ``resume_from_checkpoint latest`` takes the newest *complete* checkpoint: a checkpoint cut short by a crash
  (no readable ``trainer_state.json``, no weights) is passed over, saying so. DeepSpeed's ``latest`` tag must
  name a folder inside the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli import atomic_write

__all__ = ["RUN_RECORD", "SAFE_ON_RESUME", "run_record", "check_new_run", "record_run", "check_resume",
           "resume_checkpoint", "checkpoint_problem"]

RUN_RECORD = "firempo_run.json"
#: Keys a resumed run may change: where and how often it writes and logs, how long it runs (the schedule is
#: then recomputed for the new length, which the log says), and what differs from one rank to the next.
SAFE_ON_RESUME = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_steps", "num_train_epochs", "save_steps",
    "save_strategy", "save_total_limit", "save_only_model", "logging_steps", "logging_strategy", "logging_first_step",
    "disable_tqdm", "report_to", "run_name", "project", "dataloader_num_workers", "save_final_model", "traceback",
    "local_rank", "log_level", "log_level_replica", "precompute_reference", "overwrite_precomputed_reference",
    "shared_prefix",  # the same hidden states, another summation order
})
_SCHEDULE = ("max_steps", "num_train_epochs")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
_DATA_CONTENTS = "data_path contents"


def run_record(script: Any, args: Any, model_args: Any) -> dict[str, Any]:
    """What a run is, as JSON: ``args.to_dict()`` (``TrainingArguments`` and FiRe-MPO's keys), the model and
    script arguments, and a digest of the record file when the data come from one (the same path with other
    records in it is other data)."""
    record = {**json.loads(json.dumps(dataclasses.asdict(model_args), default=str)),
              **json.loads(json.dumps(dataclasses.asdict(script), default=str)),
              **json.loads(json.dumps(args.to_dict(), default=str))}
    if script.source() == "path" and Path(script.data_path).is_file():
        digest = hashlib.sha256()
        with open(script.data_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        record[_DATA_CONTENTS] = f"sha256:{digest.hexdigest()[:16]}"
    return record


def _checkpoints(out: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _previous_run(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    names = [p.name for p in _checkpoints(out)]
    names += [n for n in ("trainer_state.json", "final", RUN_RECORD) if (out / n).exists()]
    return names


def check_new_run(output_dir: str, *, resume: str | None, overwrite: bool, is_main: bool,
                  log: Callable[[str], None]) -> None:
    """Refuse a fresh run into a folder holding another run, or clear that run's files when ``overwrite``
    (only the files a run writes: checkpoints, state, final, record)."""
    out = Path(output_dir)
    found = _previous_run(out)
    if not found or resume is not None:
        return
    if not overwrite:
        shown = ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")
        raise ValueError(
            f"output_dir={out} already holds a run ({shown}). Continue it with --resume_from_checkpoint latest, "
            "start it over with --overwrite_output_dir true (its checkpoints are deleted), or choose another "
            "output_dir"
        )
    if is_main:
        log(f"overwrite_output_dir: removing the previous run's {', '.join(found)} from {out}")
        for name in found:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()


def record_run(output_dir: str, record: dict[str, Any]) -> None:
    """Write the run's record (:func:`run_record`) into the output folder (main process; replaced whole)."""
    with atomic_write(Path(output_dir) / RUN_RECORD) as f:
        json.dump(record, f, indent=1, sort_keys=True)


def check_resume(record: dict[str, Any], output_dir: str, checkpoint: Path, log: Callable[[str], None]) -> None:
    """Compare the run's record with the one of the run being resumed; refuse unsafe changes, by key."""
    recorded = next((p / RUN_RECORD for p in (checkpoint.parent, Path(output_dir)) if (p / RUN_RECORD).is_file()),
                    None)
    if recorded is None:
        log(f"resume: no {RUN_RECORD} beside {checkpoint}, so the run's arguments cannot be compared with the original")
        return
    try:
        before = json.loads(recorded.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"resume: {recorded} is unreadable ({e}); restore it or remove it to resume unchecked"
        ) from None
    changed = {k: (before.get(k), record.get(k)) for k in sorted(set(before) | set(record))
               if before.get(k) != record.get(k)}
    unsafe = {k: v for k, v in changed.items() if k not in SAFE_ON_RESUME}
    if unsafe:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
        raise ValueError(
            f"resume from {checkpoint}: the run's arguments differ from the ones it started with ({recorded}) in "
            f"{shown}. A resumed run continues the same run: put these back, or start a new run in another "
            "output_dir"
        )
    accepted = {k: v for k, v in changed.items() if k not in ("resume_from_checkpoint", "output_dir", "local_rank")}
    if accepted:
        note = " (the learning-rate schedule is recomputed for the new length)" if set(accepted) & set(_SCHEDULE) else ""
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


def resume_checkpoint(where: str | None, output_dir: str, record: dict[str, Any],
                      log: Callable[[str], None]) -> str | None:
    """The checkpoint to resume from (``resume_from_checkpoint``: ``latest`` or a checkpoint folder), checked
    against ``record``; None to start fresh."""
    if where is None:
        return None
    if where == "latest":
        out = Path(output_dir)
        for checkpoint in reversed(_checkpoints(out) if out.is_dir() else []):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                check_resume(record, output_dir, checkpoint, log)
                return str(checkpoint)
            log(f"resume_from_checkpoint latest: passing over {checkpoint.name}: {problem}")
        if _previous_run(out):
            raise ValueError(
                f"resume_from_checkpoint=latest: {out} holds a run but no complete checkpoint to continue it from; "
                "start it over with --overwrite_output_dir true, or choose another output_dir"
            )
        log(f"resume_from_checkpoint latest: nothing to resume under {out}, starting fresh")
        return None
    checkpoint = Path(where).expanduser()
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={where!r} is not a checkpoint directory")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise ValueError(f"resume_from_checkpoint={where!r}: cannot resume from it: {problem}")
    check_resume(record, output_dir, checkpoint, log)
    return str(checkpoint)

"""Probe every public entry point with faults, mistakes and bad input, and count what happens.

    python tests/probe_reliability.py            # prints the table
    python tests/probe_reliability.py --write    # also rewrites the table in docs/reliability.md

Each probe is one bad (or awkward but legal) input to one entry point, and the outcome is one of:

- **clear**: refused with a ``ValueError``/``TypeError``/``FileNotFoundError`` naming the argument, or a
  command line that ends in one ``prog: error: ...`` message, exit code 2 and no traceback;
- **handled**: a legal but awkward input (a byte-order mark, a damaged newest checkpoint, a truncated image with
  ``--on-error skip``) that gives the right result;
- **silent**: no error and a wrong result (NaN, inf, a negative KL, a run accepted that should not be);
- **crash**: any other exception, a traceback, or another exit code;
- **data lost**: a file the project had written is gone, shorter or changed when it should not be.

The script exits 1 if any probe is silent, crashes or loses data (tests/test_reliability.py runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("FIREMPO_PROGRESS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

OUTCOMES = ("clear", "handled", "silent", "crash", "data lost")
CLEAR_ERRORS = (ValueError, TypeError, FileNotFoundError)
ROOT = Path(__file__).resolve().parents[1]


class DataLost(Exception):
    pass


class Silent(Exception):
    pass


PROBES: list[tuple[str, str, Callable[[Path], str]]] = []


def probe(entry: str, what: str):
    def register(fn: Callable[[Path], str]):
        PROBES.append((entry, what, fn))
        return fn
    return register


def expect_error(call: Callable[[], object], *names: str) -> str:
    """A refused call whose message names every one of ``names``: clear; no error: silent."""
    try:
        result = call()
    except CLEAR_ERRORS as e:
        missing = [n for n in names if n not in str(e)]
        if missing:
            raise AssertionError(f"the message does not name {missing}: {e}") from None
        return "clear"
    raise Silent(f"accepted, returned {type(result).__name__}")


def cli(main: Callable[[list[str]], int], argv: list[str], expect: int = 2, *names: str) -> str:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage errors exit 2 with one message
            code = e.code
    text = re.sub(r"--- Logging error ---.*?Arguments: [^\n]*\n", "", err.getvalue(), flags=re.S)
    if "Traceback" in text:
        raise AssertionError("traceback:\n" + text[-2000:])
    if code != expect:
        if expect == 2 and code == 0:
            raise Silent("exit 0")
        raise AssertionError(f"exit {code} (expected {expect}):\n{text[-2000:]}")
    missing = [n for n in names if n not in text]
    if missing:
        raise AssertionError(f"the message does not name {missing}:\n{text[-2000:]}")
    return "clear" if expect == 2 else "handled"


# ---------------------------------------------------------------------------------------------------
# Core ops and the loss
# ---------------------------------------------------------------------------------------------------

def _op_inputs(n=6, v=50, d=8):
    return dict(hidden=torch.randn(n, d), weight=torch.randn(v, d), ref_hidden=torch.randn(n, d),
                ref_weight=torch.randn(v, d), targets=torch.randint(0, v, (n,)))


def _token_kl(**changes):
    import firempo_kernels as fk

    a = {**_op_inputs(), **changes}
    kwargs = {k: a.pop(k) for k in list(a) if k not in ("hidden", "weight", "ref_hidden", "ref_weight", "targets")}
    return fk.fused_linear_token_kl(a["hidden"], a["weight"], a["ref_hidden"], a["ref_weight"], a["targets"], **kwargs)


_OP_CASES = {
    "3-d weight": (dict(weight=torch.randn(50, 8, 1)), "weight"),
    "hidden width differs from the head": (dict(hidden=torch.randn(6, 5)), "hidden"),
    "fewer reference rows": (dict(ref_hidden=torch.randn(3, 8)), "ref_hidden"),
    "reference vocabulary differs": (dict(ref_weight=torch.randn(49, 8)), "ref_weight"),
    "float64 hidden with float32 head": (dict(hidden=torch.randn(6, 8).double()), "hidden"),
    "float targets": (dict(targets=torch.rand(6)), "targets"),
    "target = V": (dict(targets=torch.tensor([0, 1, 50, 2, 3, 4])), "targets"),
    "negative target": (dict(targets=torch.tensor([0, -1, 3, 2, 3, 4])), "targets"),
    "temperature 0": (dict(temperature=0.0), "temperature"),
    "temperature 1e-38": (dict(temperature=1e-38), "temperature"),
    "temperature nan": (dict(temperature=math.nan), "temperature"),
    "temperature as a string": (dict(temperature="1"), "temperature"),
    "bias of the wrong length": (dict(bias=torch.randn(49)), "bias"),
    "infinite bias": (dict(bias=torch.tensor([0.0] * 49 + [-math.inf])), "bias"),
    "numpy reference head": (dict(ref_weight=np.zeros((50, 8), np.float32)), "ref_weight"),
    "float ignore_index": (dict(ignore_index=1.5), "ignore_index"),
}
for _name, (_changes, _arg) in _OP_CASES.items():
    probe("fused_linear_token_kl", _name)(lambda tmp, c=_changes, a=_arg: expect_error(lambda: _token_kl(**c), a))


@probe("fused_linear_token_kl", "models equal to rounding: KL never negative")
def _(tmp):
    import firempo_kernels as fk

    h, w = torch.randn(64, 32), torch.randn(3000, 32) * 5
    out = fk.fused_linear_token_kl(h, w, h * (1 + 2e-7 * torch.randn_like(h)), w, torch.randint(0, 3000, (64,)))
    if (out.kl_forward < 0).any() or (out.kl_reverse < 0).any():
        raise Silent("negative KL")
    return "handled"


@probe("fused_linear_logprobs", "huge logits stay finite")
def _(tmp):
    import firempo_kernels as fk

    out = fk.fused_linear_logprobs(torch.randn(4, 8) * 1e4, torch.randn(50, 8) * 1e4, torch.randint(0, 50, (4,)))
    if not torch.isfinite(out).all():
        raise Silent("non-finite log-probs")
    return "handled"


@probe("fused_linear_logprobs", "empty input")
def _(tmp):
    import firempo_kernels as fk

    out = fk.fused_linear_logprobs(torch.randn(0, 8), torch.randn(50, 8), torch.zeros(0, dtype=torch.long))
    if out.shape != (0,):
        raise Silent(f"shape {tuple(out.shape)}")
    return "handled"


def _loss_batch(b=2, t=5, v=40, d=8):
    torch.manual_seed(0)
    labels = torch.randint(0, v, (4 * b, t))
    weights = (torch.rand(4 * b, t) < 0.5).float()
    return dict(weight=torch.randn(v, d), hidden=torch.randn(4 * b, t, d), ref_hidden=torch.randn(4 * b, t, d),
                labels=labels, span_weights=weights, has_corrupted_image=torch.tensor([True, False]))


def _loss(loss_kwargs=None, **changes):
    from firempo_kernels import FiReMPOLoss

    batch = {**_loss_batch(), **changes}
    extra = {k: batch.pop(k) for k in ("num_examples_in_batch",) if k in batch}
    out = FiReMPOLoss(**(loss_kwargs or {}))(**batch, **extra)
    if not torch.isfinite(out.loss):
        raise Silent(f"loss {out.loss}")
    return out


_LOSS_CASES = {
    "beta 0": (dict(beta=0.0), {}, "beta"),
    "beta 1e308": (dict(beta=1e308), {}, "beta"),
    "alpha negative": (dict(alpha=-0.1), {}, "alpha"),
    "gamma nan": (dict(gamma=math.nan), {}, "gamma"),
    "lambda_ 1.5": (dict(lambda_=1.5), {}, "lambda_"),
    "visual_pairing unknown": (dict(visual_pairing="v1"), {}, "visual_pairing"),
    "temperature 1e-38": (dict(temperature=1e-38), {}, "temperature"),
    "num_examples_in_batch tensor 0": ({}, dict(num_examples_in_batch=torch.tensor(0)), "num_examples_in_batch"),
    "num_examples_in_batch tensor -3": ({}, dict(num_examples_in_batch=torch.tensor(-3)), "num_examples_in_batch"),
    "num_examples_in_batch 0": ({}, dict(num_examples_in_batch=0), "num_examples_in_batch"),
    "negative span weight": ({}, dict(span_weights=-_loss_batch()["span_weights"]), "span_weights"),
    "nan span weight": ({}, dict(span_weights=_loss_batch()["span_weights"] * math.nan), "span_weights"),
    "3 blocks of rows": ({}, dict(hidden=torch.randn(6, 5, 8)), "hidden"),
    "long has_corrupted_image": ({}, dict(has_corrupted_image=torch.tensor([1, 0])), "has_corrupted_image"),
    "float labels": ({}, dict(labels=torch.zeros(8, 5)), "labels"),
}
for _name, (_kw, _changes, _arg) in _LOSS_CASES.items():
    probe("FiReMPOLoss", _name)(lambda tmp, k=_kw, c=_changes, a=_arg: expect_error(lambda: _loss(k, **c), a))


@probe("FiReMPOLoss", "no span token anywhere")
def _(tmp):
    out = _loss(span_weights=torch.zeros(8, 5))
    # every margin is 0: log 2 per rank term, and gamma (0.1) x log 2 for the one example of two with v'
    if abs(out.loss.item() - math.log(2) * (1 + 0.1 * 0.5)) > 1e-6:
        raise Silent(f"loss {out.loss.item()}")
    return "handled"


# ---------------------------------------------------------------------------------------------------
# Records, firempo-corrupt, firempo-build-pairs
# ---------------------------------------------------------------------------------------------------

def scan_records(tmp: Path, n=3, truncated: int | None = None, extra: dict | None = None) -> Path:
    """``qa.jsonl`` in ``tmp``: n question records on random 32 x 32 scans; record ``truncated`` (if any) has
    an image cut short after its header. ``extra``: more fields for every record."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        path = tmp / f"scan{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        if i == truncated:
            path.write_bytes(path.read_bytes()[:200])  # a valid header, pixels cut off
        lines.append(json.dumps({"id": f"r{i}", "image": path.name, "question": "Is there a lesion?", **(extra or {})}))
    data = tmp / "qa.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def _load(path):
    from firempo_kernels.integrations.data import load_qa_records

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_qa_records(path)


def _record_file_probe(name: str, mutate: Callable[[Path], None], *names: str):
    def run(tmp):
        data = scan_records(tmp)
        mutate(data)
        return expect_error(lambda: _load(data), *names)
    probe("load_qa_records", name)(run)


_record_file_probe("truncated image", lambda d: (d.parent / "scan1.png").write_bytes(
    (d.parent / "scan1.png").read_bytes()[:200]), "line 2", "r1", "not a readable image")
_record_file_probe("missing image", lambda d: (d.parent / "scan2.png").unlink(), "line 3", "not found")
_record_file_probe("non-UTF-8 byte", lambda d: d.write_bytes(d.read_bytes().replace(b"lesion", b"l\xe9sion", 1)),
                   "line 1", "not UTF-8")
_record_file_probe("broken JSON line", lambda d: d.write_text(d.read_text() + "{oops\n"), "line 4", "not valid JSON")
_record_file_probe("duplicate id", lambda d: d.write_text(d.read_text() + d.read_text().splitlines()[0] + "\n"),
                   "line 4", "duplicate id")
_record_file_probe("empty file", lambda d: d.write_text("\n"), "holds no record")
_record_file_probe("closed question with one candidate", lambda d: d.write_text(
    d.read_text().replace('"question"', '"answer_type": "closed", "candidates": ["yes"], "question"', 1)),
    "line 1", "candidates")
_record_file_probe("bbox outside the image", lambda d: d.write_text(
    d.read_text().replace('"question"', '"lesion_bbox": [0, 0, 99, 99], "question"', 1)), "line 1", "lesion_bbox")


@probe("load_qa_records", "byte-order mark")
def _(tmp):
    data = scan_records(tmp)
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    if [r.id for r in _load(data)] != ["r0", "r1", "r2"]:
        raise Silent("records lost")
    return "handled"


def _corrupt(argv, *a, **k):
    from firempo_kernels.integrations.data import corrupt

    return cli(corrupt.main, argv, *a, **k)


@probe("firempo-corrupt", "truncated image with --on-error skip")
def _(tmp):
    data = scan_records(tmp, truncated=1)
    out = tmp / "out.jsonl"
    result = _corrupt(["--data", str(data), "--out", str(out), "--image-dir", str(tmp / "v"), "--on-error", "skip"], 0)
    if [r.id for r in _load(out)] != ["r0", "r2"]:
        raise Silent("wrong records written")
    return result


@probe("firempo-corrupt", "truncated image")
def _(tmp):
    data = scan_records(tmp, truncated=1)
    return _corrupt(["--data", str(data), "--out", str(tmp / "o.jsonl"), "--image-dir", str(tmp / "v")], 2, "r1")


@probe("firempo-corrupt", "unwritable --out")
def _(tmp):
    (tmp / "file").write_text("x")
    return _corrupt(["--data", str(scan_records(tmp)), "--out", str(tmp / "file" / "o.jsonl"), "--image-dir",
                     str(tmp / "v")], 2, "--out")


@probe("firempo-corrupt", "--image-dir is a file")
def _(tmp):
    (tmp / "file").write_text("x")
    return _corrupt(["--data", str(scan_records(tmp)), "--out", str(tmp / "o.jsonl"), "--image-dir", str(tmp / "file")],
                    2, "--image-dir")


@probe("firempo-corrupt", "missing --data")
def _(tmp):
    return _corrupt(["--data", str(tmp / "none.jsonl"), "--out", str(tmp / "o.jsonl"), "--image-dir", str(tmp)], 2,
                    "--data")


@probe("firempo-corrupt", "rerun over its own output")
def _(tmp):
    data, out = scan_records(tmp), tmp / "o.jsonl"
    argv = ["--data", str(data), "--out", str(out), "--image-dir", str(tmp / "v")]
    _corrupt(argv, 0)
    before = out.read_bytes()
    _corrupt(argv, 0)
    if out.read_bytes() != before:
        raise DataLost("the second run wrote other records")
    return "handled"


@probe("firempo-corrupt", "unknown option")
def _(tmp):
    return _corrupt(["--data", "x", "--out", "y", "--image-dir", "z", "--sigma", "3"], 2)


def _pairs(argv, *a, **k):
    from firempo_kernels.integrations.data import build_pairs

    return cli(build_pairs.main, argv, *a, **k)


def _answers(tmp: Path, text: str) -> Path:
    path = tmp / "answers.jsonl"
    path.write_text(text)
    return path


_QA = {"ground_truth": "No.", "answer_type": "closed", "candidates": ["Yes.", "No."]}


@probe("firempo-build-pairs", "--model folder missing")
def _(tmp):
    return _pairs(["--data", str(scan_records(tmp, extra=_QA)), "--model", "/nonexistent", "--out", str(tmp / "p.jsonl")],
                  2, "--model")


@probe("firempo-build-pairs", "answers file with bad lines")
def _(tmp):
    answers = _answers(tmp, '{"id": "r0", "answer": "No."}\n{"id": "r1"}\n{"id": "r2", "answer": "Yes.\n')
    return _pairs(["--data", str(scan_records(tmp, extra=_QA)), "--answers", str(answers), "--out", str(tmp / "p.jsonl")],
                  2, "line 2", "line 3")


@probe("firempo-build-pairs", "answers file missing a record")
def _(tmp):
    answers = _answers(tmp, '{"id": "r0", "answer": "No."}\n{"id": "r1", "answer": "No."}\n')
    return _pairs(["--data", str(scan_records(tmp, extra=_QA)), "--answers", str(answers), "--out", str(tmp / "p.jsonl")],
                  2, "no answer for 1 record")


@probe("firempo-build-pairs", "unwritable --out (before any answer)")
def _(tmp):
    (tmp / "file").write_text("x")
    answers = _answers(tmp, "".join(json.dumps({"id": f"r{i}", "answer": "Yes."}) + "\n" for i in range(3)))
    return _pairs(["--data", str(scan_records(tmp, extra=_QA)), "--answers", str(answers), "--out",
                   str(tmp / "file" / "p.jsonl")], 2, "--out")


@probe("firempo-build-pairs", "unknown editor")
def _(tmp):
    answers = _answers(tmp, "".join(json.dumps({"id": f"r{i}", "answer": "Yes."}) + "\n" for i in range(3)))
    return _pairs(["--data", str(scan_records(tmp, extra=_QA)), "--answers", str(answers), "--out", str(tmp / "p.jsonl"),
                   "--editor", "no_such_module:editor"], 2, "no_such_module")


# ---------------------------------------------------------------------------------------------------
# firempo-train and its recipe
# ---------------------------------------------------------------------------------------------------

SMOKE = ROOT / "integrations" / "configs" / "smoke.yaml"


def _train(tmp: Path, out: str, *extra: str, expect: int = 0, names: tuple[str, ...] = (), seed: int = 0) -> str:
    from firempo_kernels.integrations import train

    argv = ["--config", str(SMOKE), "--tiny_seed", str(seed), "--synthetic_examples", "4",
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--gradient_accumulation_steps", "1",
            "--save_steps", "1", "--disable_tqdm", "true", "--gradient_checkpointing", "false",
            "--output_dir", str(tmp / out), *extra]
    return cli(train.main, argv, expect, *names)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _config_probe(name: str, recipe: str, *names: str):
    def run(tmp: Path) -> str:
        (tmp / "recipe.yaml").write_text(SMOKE.read_text() + recipe)
        from firempo_kernels.integrations import train

        return cli(train.main, ["--config", str(tmp / "recipe.yaml"), "--output_dir", str(tmp / "run")], 2, *names)

    probe("firempo-train recipe", name)(run)


_config_probe("trust_remote_code as the string 'false'", "trust_remote_code: 'false'\n", "trust_remote_code")
_config_probe("boolean 'banana'", "use_peft: banana\n", "use_peft")
_config_probe("unknown key", "lr: 1\n", "lr: unknown key")
_config_probe("learning rate as a quoted string", "learning_rate: '1e-4'\n", "learning_rate")
_config_probe("unknown preset", "preset: ipo\n", "preset")
_config_probe("integer key given 1.5", "per_device_train_batch_size: 1.5\n", "per_device_train_batch_size")
_config_probe("sectioned run config of an earlier release", "training: {epochs: 2}\n", "num_train_epochs")


@probe("firempo-train recipe", "missing recipe file")
def _(tmp):
    from firempo_kernels.integrations import train

    return cli(train.main, ["--config", str(tmp / "none.yaml")], 2, "no recipe at")


def _refused_after_a_run(tmp: Path, *extra: str, names: tuple[str, ...]) -> str:
    """A first run, then a second command into its folder that must be refused and leave the folder as it was."""
    _train(tmp, "run")
    before = _snapshot(tmp / "run")
    result = _train(tmp, "run", *extra, expect=2, names=names)
    if _snapshot(tmp / "run") != before:
        raise DataLost("the refused command changed the run's folder")
    return result


@probe("firempo-train", "second run into the same output_dir")
def _(tmp):
    return _refused_after_a_run(tmp, "--max_steps", "1", names=("already holds a run",))


@probe("firempo-train", "resume with a changed learning rate")
def _(tmp):
    return _refused_after_a_run(tmp, "--resume_from_checkpoint", "latest", "--learning_rate", "1",
                                names=("learning_rate: 0.0001 -> 1.0",))


@probe("firempo-train", "resume past a damaged newest checkpoint")
def _(tmp):
    _train(tmp, "run")
    (tmp / "run" / "checkpoint-2" / "trainer_state.json").write_text("{")
    result = _train(tmp, "run", "--resume_from_checkpoint", "latest", expect=0)
    rows = json.loads((tmp / "run" / "trainer_state.json").read_text())["log_history"]
    if [r["step"] for r in rows if "loss" in r and "train_loss" not in r] != [1, 2]:
        raise DataLost("logged rows lost")
    return result


@probe("firempo-train", "DeepSpeed latest tag pointing outside the run")
def _(tmp):
    _train(tmp, "run")
    (tmp / "run" / "checkpoint-2" / "latest").write_text("../../../../etc")
    return _train(tmp, "run", "--resume_from_checkpoint", str(tmp / "run" / "checkpoint-2"), expect=2,
                  names=("not a folder inside the checkpoint",))


@probe("firempo-train", "resume from a folder that is no checkpoint")
def _(tmp):
    return _train(tmp, "run", "--resume_from_checkpoint", str(tmp), expect=2, names=("resume_from_checkpoint",))


@probe("firempo-train", "precomputed reference of another model")
def _(tmp):
    store = ["--reference_mode", "precomputed", "--precomputed_reference_dir", str(tmp / "store")]
    _train(tmp, "pre", *store, "--precompute_reference", seed=1)
    return _train(tmp, "run", *store, seed=2, expect=2, names=("built from another reference model",))


@probe("firempo-train", "unwritable output_dir")
def _(tmp):
    (tmp / "file").write_text("x")
    return _train(tmp, "file/run", expect=2, names=("output_dir: cannot write",))


# ---------------------------------------------------------------------------------------------------

def run_probes(selected: str | None = None) -> list[tuple[str, str, str, str]]:
    results = []
    for entry, what, fn in PROBES:
        if selected and selected not in entry:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            try:
                outcome, note = fn(Path(tmp)), ""
            except Silent as e:
                outcome, note = "silent", str(e)
            except DataLost as e:
                outcome, note = "data lost", str(e)
            except Exception as e:  # noqa: BLE001 - anything else is a crash, by definition
                outcome, note = "crash", f"{type(e).__name__}: {str(e)[:300]}"
        results.append((entry, what, outcome, note))
    return results


def table(results) -> str:
    by_entry: dict[str, Counter] = defaultdict(Counter)
    for entry, _, outcome, _ in results:
        by_entry[entry][outcome] += 1
    lines = ["| entry point | probes | clear errors | handled | silent | crashes | data lost |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    total: Counter = Counter()
    for entry, counts in by_entry.items():
        total.update(counts)
        lines.append(f"| {entry} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite the table in docs/reliability.md")
    ap.add_argument("--only", help="probes of entry points whose name contains this")
    args = ap.parse_args(argv)
    results = run_probes(args.only)
    text = table(results)
    print(text)
    bad = [r for r in results if r[2] in ("silent", "crash", "data lost")]
    for entry, what, outcome, note in bad:
        print(f"{outcome}: {entry}: {what}: {note}", file=sys.stderr)
    if args.write:
        doc = ROOT / "docs" / "reliability.md"
        content = doc.read_text(encoding="utf-8")
        start, end = "<!-- probe table -->", "<!-- end of probe table -->"
        before, rest = content.split(start, 1)
        _, after = rest.split(end, 1)
        doc.write_text(f"{before}{start}\n{text}\n{end}{after}", encoding="utf-8")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

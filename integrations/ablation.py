"""``make ablation``: the paper's comparison in miniature, on the embedded synthetic scans, on CPUs.

    python -m firempo_kernels.integrations.ablation [--out runs/ablation] [--seeds 6] [--workers 2] [--quick]

From one base model and one set of on-policy pairs, every row of :data:`ROWS` is trained with several seeds
and evaluated on held-out scans:

1. data: four synthetic splits of their own (supervised fine-tuning, pairs, validation, held-out);
2. base: a tiny random Llava, taught the answer format with random key words, then fine-tuned on the true
   answers of its own split until closed-question accuracy on the *validation* split reaches the target: a
   base that reads the scans in part, so its greedy answers are right and wrong alike;
3. on-policy pairs from the base's greedy answers (rule-based editor, tagged differences), with v' written in
   each corruption mode a row uses; the held-out scans get the v' that removes the lesion, and the detectors of
   :mod:`.data.evidence` measure what each mode leaves visible;
4. one training run per (row, seed), each in one process of a pool (no launcher: the rows differ in the loss,
   not in the distribution), FiReMPOTrainer with the row's preset, gamma, visual pairing and corruption;
5. per question kind, on held-out scans: accuracy on v and on the lesion-removed v', the presence question's
   "no lesion" rate on lesion-removed scans, how far the key word's margin moves toward zero, the log-prob drop
   and the open question's ranking accuracy (:mod:`.evaluate`); per row the mean and standard error across
   seeds, and the difference to the gamma-0 control paired by seed.

Outputs in ``--out``: ``runs/<row>/seed-<s>.json`` (one per finished run; a rerun skips them, so an
interrupted ablation resumes), ``ablation.json``, ``ablation.md`` (tables) and ``ablation.png``. Nothing
written by another command is deleted: ``--out`` must be new, empty, or a previous ablation's folder with the
same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .cli import atomic_write, run_command, write_whole

_MARKER = ".firempo-ablation"
CONTROL = "gamma0"


@dataclass(frozen=True)
class Row:
    """One configuration of the objective: a preset, its visual term and the corruption its v' comes from."""

    name: str
    label: str
    preset: str
    gamma: float | None = None  #: None: the preset's own
    visual_pairing: str = "reversed"
    corruption: str = "inpaint"


def default_rows(gamma_ablation: float) -> tuple[Row, ...]:
    """The rows of the comparison; the pairing and corruption ablations run at ``gamma_ablation``."""
    g = f"{gamma_ablation:g}"
    return (
        Row("dpo", "DPO (every response token)", "dpo"),
        Row("mask_dpo", "MASK-DPO (spans, no KL)", "mask_dpo"),
        Row("rrpo", "RRPO (spans, forward KL)", "rrpo"),
        Row(CONTROL, "FiRe-MPO gamma 0 (control)", "firempo", gamma=0.0),
        Row("gamma0.1", "FiRe-MPO gamma 0.1 (paper)", "firempo", gamma=0.1),
        Row("gamma0.5", "FiRe-MPO gamma 0.5", "firempo", gamma=0.5),
        Row("gamma1", "FiRe-MPO gamma 1", "firempo", gamma=1.0),
        Row("v1", f"v1: (v, y+) > (v', y+), gamma {g}", "firempo", gamma=gamma_ablation, visual_pairing="same_response"),
        Row("v2", f"v2: (v, y+) > (v', y-), gamma {g}", "firempo", gamma=gamma_ablation, visual_pairing="cross"),
        Row("paper_noise", f"FiRe-MPO gamma {g}, the paper's noise as v'", "firempo", gamma=gamma_ablation,
            corruption="paper"),
    )


@dataclass(frozen=True)
class AblationConfig:
    """Sizes and rates of an ablation (the defaults are ``make ablation``'s)."""

    sft_images: int = 300
    pair_images: int = 120
    validation_images: int = 60
    heldout_images: int = 100
    image_size: int = 32
    hidden_size: int = 64
    data_seed: int = 0
    warmup_steps: int = 60
    contrast: tuple[float, float] = (14.0, 150.0)  #: lesion contrast of the pairs, validation and held-out scans
    sft_contrast: tuple[float, float] = (100.0, 150.0)  #: of the fine-tuning split: clear lesions teach looking
    #: 5e-3 and 1e-3 left side/level/size at chance for 1,000+ steps (every kind at its majority answer);
    #: 3e-4 read them within 150-500 steps in 3 of 5 runs (3 model seeds; validation split)
    sft_lr: float = 3e-4
    sft_batch: int = 32
    sft_target: float = 0.65  #: validation accuracy on the image-dependent kinds that stops the fine-tuning
    sft_max_steps: int = 800
    #: fine enough to stop inside the 55-75% band: accuracy climbs 10-20 points per 50 steps once it moves
    sft_check_every: int = 50
    #: the kinds the fine-tuning split teaches: the ones that need the image (presence is 85% "a lesion" and
    #: "where" repeats side and level), so that every step is a lesson in looking
    sft_kinds: tuple[str, ...] = ("side", "level", "size")
    seeds: int = 6
    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 5e-4
    beta: float = 0.1
    workers: int = 2
    max_new_tokens: int = 12
    rows: tuple[Row, ...] = field(default_factory=lambda: default_rows(1.0))


QUICK = AblationConfig(sft_images=6, pair_images=6, validation_images=4, heldout_images=4, warmup_steps=2,
                       sft_max_steps=2, sft_check_every=2, sft_batch=8, seeds=2, epochs=1, batch_size=2)


def _say(message: str) -> None:
    print(f"[ablation] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Shared preparation: data, base, pairs, corrupted images
# ---------------------------------------------------------------------------------------------------

def image_kind_accuracy(report) -> float:
    """Accuracy over the closed kinds that need the image to answer (side, level, size)."""
    right = total = 0
    for kind in ("side", "level", "size"):
        k = report.by_kind.get(kind)
        if k is not None and k.ranked:
            right += k.accuracy * k.ranked
            total += k.ranked
    return right / total if total else math.nan


def prepare(out: Path, cfg: AblationConfig) -> dict[str, Any]:
    """Writes the splits, the base model, the pairs (one file per corruption mode) and the held-out records
    with lesion-removed v' into ``out``; returns what the runs need and what the report says about it.
    Reuses what a previous call with the same settings wrote (``prepared.json``)."""
    import torch

    from .base_model import blind_answer, finetune_to_accuracy, teach
    from .data import GreedyAnswerer, RuleBasedEditor, corrupt_records, load_qa_records, make_pairs, write_records
    from .data.embedded import build_processor, build_tiny_llava
    from .data.evidence import evidence_check
    from .data.synthetic import make_synthetic_vqa, question_kind

    done = out / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    started = time.perf_counter()
    # One intra-op thread: a tiny model gains nothing from a second, and two spin against any other process on
    # the machine (a 10x slowdown measured on a busy 2-core host).
    torch.set_num_threads(1)
    data = out / "data"
    splits = {}
    for i, (split, n) in enumerate((("sft", cfg.sft_images), ("pairs", cfg.pair_images),
                                    ("validation", cfg.validation_images), ("heldout", cfg.heldout_images))):
        path = make_synthetic_vqa(data, num_images=n, seed=cfg.data_seed * 10 + i, image_size=cfg.image_size,
                                  split=split, contrast=cfg.sft_contrast if split == "sft" else cfg.contrast)
        splits[split] = load_qa_records(path)
    _say("wrote the splits: " + ", ".join(f"{k} {len(v)} questions" for k, v in splits.items()))

    torch.manual_seed(cfg.data_seed)
    processor = build_processor(image_size=cfg.image_size)
    model = build_tiny_llava(processor.tokenizer, image_size=cfg.image_size, hidden_size=cfg.hidden_size,
                             seed=cfg.data_seed)
    teach(model, processor, splits["sft"], answer=blind_answer, steps=cfg.warmup_steps, batch_size=cfg.sft_batch,
          lr=3e-3, seed=cfg.data_seed)

    def say(steps: int, report) -> None:
        _say(f"base after {steps} fine-tuning steps: validation closed accuracy {100 * report.accuracy:.1f}% "
             f"(side/level/size {100 * image_kind_accuracy(report):.1f}%)")

    teaching = [r for r in splits["sft"] if question_kind(r) in cfg.sft_kinds]
    tuned = finetune_to_accuracy(
        model, processor, teaching, splits["validation"], target=cfg.sft_target, max_steps=cfg.sft_max_steps,
        check_every=cfg.sft_check_every, batch_size=cfg.sft_batch, lr=cfg.sft_lr, seed=cfg.data_seed + 1000,
        measure=image_kind_accuracy, on_check=say,
    )
    base = out / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)

    answers = GreedyAnswerer(model, processor, max_new_tokens=cfg.max_new_tokens)(splits["pairs"])
    pairs, stats = make_pairs(splits["pairs"], answers, RuleBasedEditor())
    _say(f"on-policy pairs: {stats.summary()}")
    pair_files = {}
    for mode in sorted({row.corruption for row in cfg.rows}):
        path = data / f"pairs-{mode}.jsonl"
        write_records(path, corrupt_records(pairs, data / f"corrupted-pairs-{mode}", mode=mode))
        pair_files[mode] = str(path)
    heldout = {}
    evidence, evidence_tables = {}, {}
    for mode in ("paper", "inpaint"):
        recs = corrupt_records(splits["heldout"], data / f"corrupted-heldout-{mode}", mode=mode)
        path = data / f"heldout-{mode}.jsonl"
        write_records(path, recs)
        heldout[mode] = str(path)
        check = evidence_check(recs)
        evidence[mode], evidence_tables[mode] = check.to_json(), check.markdown()
    facts = {
        "base": str(base), "pairs": pair_files, "heldout": heldout["inpaint"], "heldout_files": heldout,
        "validation": str(data / "validation.jsonl"), "sft_checks": tuned.checks, "sft_steps": tuned.steps,
        "pairs_summary": stats.summary(), "pairs_right": stats.right, "pairs_wrong": stats.wrong,
        "evidence": evidence, "evidence_tables": evidence_tables, "prepare_s": time.perf_counter() - started,
    }
    write_whole(done, json.dumps(facts, indent=2))
    return facts


# ---------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------

def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Trains one row with one seed from the base and evaluates it on the held-out records; returns (and
    writes to ``job["result"]``) the run's evaluation and training summary. Runs in a pool worker."""
    import tempfile

    import torch
    from transformers import PrinterCallback

    from .data import load_qa_records
    from .data.build_pairs import load_model
    from .data.hf_dataset import load_preference_dataset
    from .evaluate import ModelScorer, evaluate
    from .trl import FiReMPOConfig, FiReMPOTrainer

    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["FIREMPO_PROGRESS"] = "0"
    row, cfg = Row(**job["row"]), job["config"]
    started = time.perf_counter()
    model, processor = load_model(job["base"])
    reference, _ = load_model(job["base"])
    dataset = load_preference_dataset(job["pairs"][row.corruption])
    with tempfile.TemporaryDirectory() as tmp:
        args = FiReMPOConfig(
            output_dir=tmp, preset=row.preset, gamma=row.gamma, visual_pairing=row.visual_pairing,
            beta=cfg["beta"], learning_rate=cfg["learning_rate"], num_train_epochs=cfg["epochs"],
            per_device_train_batch_size=cfg["batch_size"], lr_scheduler_type="cosine", warmup_steps=0.05,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
            seed=job["seed"], data_seed=job["seed"], max_length=None,
            disable_tqdm=True,
        )
        trainer = FiReMPOTrainer(model, ref_model=reference, args=args, train_dataset=dataset,
                                 processing_class=processor)
        trainer.remove_callback(PrinterCallback)  # sixty runs' logged rows would bury the progress lines
        trainer.train()
        history = [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]
    model.eval()
    report = evaluate(load_qa_records(job["heldout"]), ModelScorer(model, processor))
    tail = history[-max(1, len(history) // 10):]
    result = {
        "row": row.name, "seed": job["seed"], "eval": report.to_json(), "steps": len(history),
        "train_seconds": time.perf_counter() - started,
        "last_tenth": {k: _mean([r.get(k) for r in tail]) for k in ("loss", "rewards/margins", "visual/margins")},
    }
    write_whole(job["result"], json.dumps(result, indent=2))
    return result


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------

#: (name, how it is read from one run's evaluation JSON, label, percent?)
MEASURES: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    ("accuracy", ("accuracy",), "closed accuracy on v", True),
    ("side_v", ("by_kind", "side", "accuracy"), "side on v", True),
    ("side_v'", ("by_kind", "side", "accuracy_corrupted"), "side on v'", True),
    ("level_v", ("by_kind", "level", "accuracy"), "level on v", True),
    ("level_v'", ("by_kind", "level", "accuracy_corrupted"), "level on v'", True),
    ("size_v", ("by_kind", "size", "accuracy"), "size on v", True),
    ("presence_v", ("by_kind", "presence", "accuracy"), "presence on v", True),
    ("no_lesion_v'", ("by_kind", "presence", "no_lesion_rate_corrupted"), "'no lesion' on lesion-removed v'", True),
    ("shrink_side", ("by_kind", "side", "margin_shrink"), "side margin toward 0 on v' (nats)", False),
    ("shrink_level", ("by_kind", "level", "margin_shrink"), "level margin toward 0 on v' (nats)", False),
    ("drop", ("sensitivity",), "log-prob drop v -> v' (nats)", False),
    ("where_v", ("by_kind", "where", "accuracy"), "open 'where' ranking on v", True),
)


def _read(run: dict[str, Any], path: tuple[str, ...]) -> float:
    node: Any = run["eval"]
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return math.nan
        node = node[key]
    return float(node)


def aggregate(rows: Sequence[Row], runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per row and measure: mean and standard error across seeds, and the difference to the control
    (:data:`CONTROL`) paired by seed, with its standard error across seeds."""
    from .evaluate import mean_and_se

    control = runs.get(CONTROL, {})
    table: dict[str, Any] = {}
    for row in rows:
        seeds = sorted(runs.get(row.name, {}))
        cells = {}
        for name, path, _, _ in MEASURES:
            values = [_read(runs[row.name][s], path) for s in seeds]
            mean, se = mean_and_se(values) if values else (math.nan, math.nan)
            paired = [_read(runs[row.name][s], path) - _read(control[s], path) for s in seeds if s in control]
            dmean, dse = mean_and_se(paired) if paired and row.name != CONTROL else (math.nan, math.nan)
            cells[name] = {"mean": mean, "se": se, "diff": dmean, "diff_se": dse, "n": len(values)}
        table[row.name] = {"label": row.label, "seeds": seeds, "measures": cells}
    return table


def _cell(mean: float, se: float, pct: bool, signed: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    if pct:  # shares in percent, one decimal; nats signed, three decimals
        body = f"{100 * mean:{'+' if signed else ''}.1f}"
        return body if math.isnan(se) else f"{body} ± {100 * se:.1f}"
    body = f"{mean:+.3f}"
    return body if math.isnan(se) else f"{body} ± {se:.3f}"


def markdown_tables(table: dict[str, Any]) -> str:
    """Two markdown tables: the measures per row (mean ± SE across seeds) and the paired differences to the
    control."""
    head = "| row | seeds | " + " | ".join(label for _, _, label, _ in MEASURES) + " |"
    rule = "|---|---|" + "---|" * len(MEASURES)
    lines = [head, rule]
    for r in table.values():
        cells = [_cell(r["measures"][n]["mean"], r["measures"][n]["se"], pct) for n, _, _, pct in MEASURES]
        lines.append(f"| {r['label']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    diff = [head.replace("| row |", "| row, minus the gamma-0 control (paired by seed) |"), rule]
    for key, r in table.items():
        if key == CONTROL:
            continue
        cells = [_cell(r["measures"][n]["diff"], r["measures"][n]["diff_se"], pct, signed=True)
                 for n, _, _, pct in MEASURES]
        diff.append(f"| {r['label']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(diff)


def plot(table: dict[str, Any], png: Path, *, dpi: int = 110) -> Path:
    """Paired differences to the control (accuracy on v, 'no lesion' rate on v', side margin toward 0), one
    bar per row with its standard error across seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [("accuracy", "closed accuracy on v (points)", 100.0), ("no_lesion_v'", "'no lesion' on v' (points)", 100.0),
             ("shrink_side", "side margin toward 0 on v' (nats)", 1.0)]
    rows = [(k, r) for k, r in table.items() if k != CONTROL]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 0.45 * len(rows) + 1.6), sharey=True)
    for ax, (name, title, scale) in zip(axes, shown):
        means = [scale * r["measures"][name]["diff"] for _, r in rows]
        errs = [0.0 if math.isnan(r["measures"][name]["diff_se"]) else scale * r["measures"][name]["diff_se"]
                for _, r in rows]
        ax.barh(range(len(rows)), [0.0 if math.isnan(m) else m for m in means], xerr=errs, color="#4f81bd", capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels([r["label"] for _, r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("minus the gamma-0 control, paired by seed (mean ± SE across seeds)", fontsize=10)
    fig.tight_layout()
    with atomic_write(png, "wb") as f:
        fig.savefig(f, dpi=dpi, format="png")
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------------
# The whole ablation
# ---------------------------------------------------------------------------------------------------

def _settings(cfg: AblationConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))


def _open_out(out: Path, cfg: AblationConfig) -> None:
    """``out`` new, empty, or a previous ablation with the same settings (resumed); anything else refused."""
    settings = _settings(cfg)
    marker = out / _MARKER
    if marker.is_file():
        previous = json.loads(marker.read_text(encoding="utf-8"))
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise ValueError(f"--out {out} holds an ablation with other settings ({', '.join(changed)} differ); "
                             "choose a new folder")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no ablation; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    write_whole(marker, json.dumps(settings, indent=2))


def run_ablation(out: Path, cfg: AblationConfig, *, seeds: Sequence[int] | None = None) -> Path:
    """Prepares, runs every (row, seed) not run yet, aggregates; returns the path of ``ablation.md``."""
    started = time.perf_counter()
    _open_out(out, cfg)
    facts = prepare(out, cfg)
    seeds = list(range(cfg.seeds)) if seeds is None else list(seeds)
    jobs = []
    runs: dict[str, dict[int, dict[str, Any]]] = {row.name: {} for row in cfg.rows}
    for seed in seeds:  # seed-major: a cut run has whole seeds of every row, which pair with the control
        for row in cfg.rows:
            result = out / "runs" / row.name / f"seed-{seed}.json"
            if result.is_file():
                runs[row.name][seed] = json.loads(result.read_text(encoding="utf-8"))
                continue
            result.parent.mkdir(parents=True, exist_ok=True)
            jobs.append({"row": asdict(row), "seed": seed, "base": facts["base"], "pairs": facts["pairs"],
                         "heldout": facts["heldout"], "config": _settings(cfg), "result": str(result)})
    _say(f"{len(jobs)} runs to do ({len(cfg.rows)} rows x {len(seeds)} seeds, {cfg.workers} at a time)")
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        results: Any = map(run_one, jobs)
        if cfg.workers > 1 and jobs:
            # spawn: a forked worker would inherit this process's torch threads and state
            pool = stack.enter_context(ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(run_one, jobs)
        for k, res in enumerate(results, 1):
            runs[res["row"]][res["seed"]] = res
            _say(f"run {k}/{len(jobs)}: {res['row']} seed {res['seed']} in {res['train_seconds']:.0f} s, "
                 f"accuracy {100 * (res['eval']['accuracy'] or 0):.1f}%")
    runs_s = time.perf_counter() - t0
    table = aggregate(cfg.rows, runs)
    total_s = time.perf_counter() - started
    # A resumed or re-aggregated ablation reports the wall time of every invocation that did work, not only
    # its own (which is near zero when every run was already there).
    timings = _record_invocation(out, {"seconds": total_s, "runs_seconds": runs_s, "runs": len(jobs)})
    spent_s = sum(t["seconds"] for t in timings)
    write_whole(out / "ablation.json", json.dumps({"config": _settings(cfg), "prepared": facts, "table": table,
                                                   "invocations": timings, "total_seconds": spent_s}, indent=2))
    png = plot(table, out / "ablation.png")
    report = write_report(out, cfg, facts, table, png, spent_s)
    _say(f"done in {total_s / 60:.1f} minutes ({runs_s / 60:.1f} of them training and evaluating); "
         f"{spent_s / 60:.1f} minutes over the {len(timings)} invocation(s) of this folder")
    return report


def _record_invocation(out: Path, timing: dict[str, Any]) -> list[dict[str, Any]]:
    """Appends one invocation's wall time to ``out/invocations.jsonl`` and returns every invocation's."""
    ledger = out / "invocations.jsonl"
    timing = {"finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **timing}
    past = ledger.read_text(encoding="utf-8").splitlines() if ledger.is_file() else []
    timings = [json.loads(line) for line in past if line.strip()] + [timing]
    write_whole(ledger, "".join(json.dumps(t) + "\n" for t in timings))
    return timings


def write_report(out: Path, cfg: AblationConfig, facts: dict[str, Any], table: dict[str, Any], png: Path,
                 total_s: float) -> Path:
    """``ablation.md``: setup, what the corruption leaves visible, the tables and the plot."""
    evidence = "\n\n".join(f"**v' = {mode}**\n\n{table}" for mode, table in facts["evidence_tables"].items())
    sft = ", ".join(f"{s} steps: {100 * a:.0f}%" for s, a in facts["sft_checks"])
    text = "\n\n".join([
        "# FiRe-MPO ablation on the synthetic scans",
        f"Generated by `python -m firempo_kernels.integrations.ablation` in {total_s / 60:.1f} minutes of wall "
        f"time ({cfg.workers} worker processes; every invocation that wrote into this folder counted).",
        "## Setup",
        f"- Base: tiny random Llava (hidden {cfg.hidden_size}), format warm-up, then fine-tuned on the true "
        f"answers to the {'/'.join(cfg.sft_kinds)} questions of a split of its own (lesion contrast "
        f"{cfg.sft_contrast[0]:g}-{cfg.sft_contrast[1]:g}; the other splits {cfg.contrast[0]:g}-{cfg.contrast[1]:g}) "
        f"at learning rate {cfg.sft_lr:g}, until validation accuracy on side/level/size reached "
        f"{100 * cfg.sft_target:.0f}% (validation accuracy on side/level/size by step: {sft}).",
        f"- On-policy pairs from its greedy answers: {facts['pairs_summary']}.",
        f"- Each row: {cfg.epochs} epochs, batch {cfg.batch_size}, learning rate {cfg.learning_rate:g} (cosine), "
        f"beta {cfg.beta:g}, frozen reference = the base, seeds 0-{cfg.seeds - 1}; held-out v' removes the lesion "
        "(inpainting) for every row; a row's training v' is the mode it names.",
        "## What each corruption leaves visible (held-out scans, detectors that learn nothing)",
        evidence,
        "## Results (held-out scans; mean ± standard error across seeds)",
        markdown_tables(table),
        f"![paired differences]({png.name})",
    ]) + "\n"
    return write_whole(out / "ablation.md", text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m firempo_kernels.integrations.ablation`` (``make ablation``)."""
    ap = argparse.ArgumentParser(prog="python -m firempo_kernels.integrations.ablation",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/ablation", help="output folder (new, empty, or a previous ablation's)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per row (default 6)")
    ap.add_argument("--workers", type=int, default=None, help="training processes at a time (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the path in a few minutes")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)

    def body() -> int:
        cfg = QUICK if args.quick else AblationConfig()
        for name in ("seeds", "workers"):
            value = getattr(args, name)
            if value is not None:
                if value < 1:
                    raise ValueError(f"--{name} must be a positive integer; got {value}")
                cfg = replace(cfg, **{name: value})
        report = run_ablation(Path(args.out).resolve(), cfg)
        _say(f"report: {report}")
        return 0

    return run_command("ablation", body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())

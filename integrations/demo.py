"""``make demo``: the whole FiRe-MPO path on the embedded default, on CPUs, in a few minutes.

    python -m firempo_kernels.integrations.demo [--out runs/demo] [--quick]

Steps (each prints what it wrote and where):

1. data: a synthetic medical VQA set (:mod:`.data.synthetic`), a training split and a held-out split;
2. base model: the tiny random Llava of :mod:`.data.embedded`, taught the answer *format* by a short
   supervised warm-up whose key words (left/right, upper/lower, small/large, a/no lesion) are drawn at
   random, so it answers in well-formed sentences but does not know where to look: the stand-in for an
   instruction-tuned model that is not yet grounded;
3. on-policy pairs: the base model answers the training questions greedily, the rule-based editor judges
   and edits, the diff tags the edited words (:mod:`.data.build_pairs`);
4. lesion corruption of the training and held-out images (:mod:`.data.corrupt`);
5. FiRe-MPO training on 2 CPU processes under ZeRO-3, launched with ``deepspeed --num_gpus 2 --module
   firempo_kernels.integrations.train`` on a written TRL recipe (a frozen reference copy of the base model);
6. evaluation of the base and the trained model on the held-out split (:mod:`.evaluate`);
7. ``runs/demo/``: ``metrics.jsonl`` (training), ``eval.json``, ``curves.png`` (loss, reward margin, reward
   accuracy, both KLs over steps) and ``report.md``, whose path is printed last.

The learning rates are far above the paper's 1e-6: the paper nudges a 7B model for one epoch, the demo
moves a 0.1 M-parameter model from random features in a few hundred steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .cli import atomic_write, free_port, run_command, write_whole

_DEMO_MARKER = ".firempo-demo"
TRAIN_CURVES = ("loss", "rewards/margins", "rewards/accuracies", "kl/forward", "kl/reverse", "visual/margins")
REPORT_ROWS = TRAIN_CURVES + ("loss/visual",)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and rates of a demo run (the defaults are ``make demo``'s)."""

    train_images: int = 160
    heldout_images: int = 60
    image_size: int = 32
    hidden_size: int = 64
    seed: int = 0
    warmup_steps: int = 60  #: format warm-up: optimizer steps of ``warmup_batch`` examples
    warmup_batch: int = 32
    warmup_lr: float = 3e-3
    ranks: int = 2
    epochs: int = 6
    micro_batch_size: int = 8  #: per rank
    learning_rate: float = 1e-3
    max_new_tokens: int = 12
    corruption: str = "inpaint"  #: the v' of training and evaluation (a mode of :mod:`.data.corrupt`)


CORRUPTION_WORDS = {
    "paper": "sigma 45 noise inside the lesion mask, sigma 12 on the whole image for scans without one (the paper's)",
    "inpaint": "the dilated lesion filled from the tissue around it, with a texture matched to its surroundings",
    "blur": "a strong Gaussian blur of the dilated lesion",
}

QUICK = DemoConfig(train_images=6, heldout_images=4, warmup_steps=2, warmup_batch=8, epochs=1, micro_batch_size=2)


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------
# The base model: a format warm-up with random key words
# ---------------------------------------------------------------------------------------------------

def format_warmup(model, processor, records, cfg: DemoConfig) -> list[float]:
    """Teaches ``model`` the answer format (cross-entropy on :func:`~.base_model.blind_answer` responses, whose
    key word is random); returns the loss of every step."""
    from .base_model import blind_answer, teach

    return teach(model, processor, records, answer=blind_answer, steps=cfg.warmup_steps,
                 batch_size=cfg.warmup_batch, lr=cfg.warmup_lr, seed=cfg.seed)


# ---------------------------------------------------------------------------------------------------
# Training through the deepspeed launcher
# ---------------------------------------------------------------------------------------------------

def deepspeed_launcher() -> list[str]:
    """The ``deepspeed`` launcher beside this interpreter, or its module where no script was installed."""
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def write_run_config(out: Path, base_dir: Path, pairs: Path, cfg: DemoConfig) -> Path:
    """The ``firempo-train`` recipe of the demo (``recipe.yaml``: TRL's flat keys; paths are absolute)."""
    import torch
    import yaml

    on_gpu = torch.cuda.is_available()
    recipe = {
        "model_name_or_path": str(base_dir),
        "dtype": "bfloat16" if on_gpu else "float32",
        "freeze_vision": False,
        "reference_mode": "model",
        "preset": "firempo",  # the paper's beta 0.1, alpha 0.01, gamma 0.1, lambda 0.5
        "data_path": str(pairs),
        "deepspeed": "zero3",
        "output_dir": str(out / "train"),
        "num_train_epochs": cfg.epochs,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,  # a share of the run
        "per_device_train_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,  # a 0.1 M-parameter model has no activations worth recomputing
        "seed": cfg.seed,
        "bf16": on_gpu,
        "use_cpu": not on_gpu,  # without it the CPU ranks would each count themselves alone
        "logging_steps": 1,
        "save_strategy": "no",  # the trained model goes to train/final
        "report_to": "none",
    }
    path = out / "recipe.yaml"
    write_whole(path, yaml.safe_dump(recipe, sort_keys=False))
    return path


def launch_training(recipe: Path, ranks: int, log_path: Path) -> None:
    """``deepspeed --num_gpus N --module firempo_kernels.integrations.train --config recipe.yaml``.

    The launcher's output goes to the terminal and to ``log_path``; a failure raises with the log's tail.
    """
    cmd = deepspeed_launcher() + ["--num_gpus", str(ranks), "--master_port", str(free_port()),
                                  "--module", "firempo_kernels.integrations.train", "--config", str(recipe)]
    env = dict(os.environ)
    # One compute thread per rank: the ranks share this machine's cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or ranks) // ranks)))
    _say("launching: " + " ".join(cmd))
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if "[firempo]" in line or "FiRe-MPO" in line or "Error" in line:
                sys.stderr.write(line)
                sys.stderr.flush()
        code = proc.wait()
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"training failed (exit code {code}); full log: {log_path}\n{tail}")


# ---------------------------------------------------------------------------------------------------
# Curves and report
# ---------------------------------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The logged training rows (one per optimizer step) of a trainer's ``trainer_state.json``."""
    state = json.loads(path.read_text(encoding="utf-8"))
    return [row for row in state["log_history"] if "loss" in row and "train_loss" not in row]


def write_metrics(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The rows as JSON lines, written to a temporary file and renamed, so a crash never leaves half a file."""
    return write_whole(path, "".join(json.dumps(row) + "\n" for row in rows))


def plot_curves(rows: Sequence[dict[str, Any]], png: Path, *, dpi: int = 110) -> Path:
    """One PNG with loss, reward margin, reward accuracy and both KLs over the optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"loss": "FiRe-MPO loss", "rewards/margins": "reward margin (chosen - rejected)",
              "rewards/accuracies": "reward accuracy", "kl/forward": "KL(ref || policy) on y+ spans",
              "kl/reverse": "KL(policy || ref) on y+ spans",
              "visual/margins": "visual margin on v' (want > 0)"}
    fig, axes = plt.subplots(2, (len(TRAIN_CURVES) + 1) // 2, figsize=(4 * ((len(TRAIN_CURVES) + 1) // 2), 6.4))
    axes = axes.flatten()
    steps = [r["step"] for r in rows]
    for ax, name in zip(axes, TRAIN_CURVES):
        values = [r.get(name) if r.get(name) is not None else math.nan for r in rows]
        ax.plot(steps, values, color="#9bb7d4", linewidth=1)
        smooth = _moving_average(values, max(1, len(values) // 15))
        ax.plot(steps, smooth, color="#1f4e79", linewidth=2)
        ax.set_title(titles[name], fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(png, "wb") as f:
        fig.savefig(f, dpi=dpi, format="png")
    plt.close(fig)
    return png


def _moving_average(values: Sequence[float], width: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - width + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def _mean(rows, name, part) -> float:
    values = [r[name] for r in rows if r.get(name) is not None]
    if not values:
        return math.nan
    k = max(1, len(values) // 10)
    chosen = values[:k] if part == "first" else values[-k:]
    return sum(chosen) / len(chosen)


def _share_se(share: float, n: int) -> float:
    """The standard error of a share of ``n`` records (nan without records)."""
    return math.sqrt(max(share * (1 - share), 1e-12) / n) if n else math.nan


def verdicts(base, trained) -> list[str]:
    """Paragraphs stating what moved on the held-out set and what did not (beyond ~2 standard errors)."""
    lines = []
    if base.closed:
        se = math.hypot(_share_se(base.accuracy, base.closed), _share_se(trained.accuracy, trained.closed))
        delta = trained.accuracy - base.accuracy
        moved = abs(delta) > 2 * se
        lines.append(
            f"Closed-question accuracy went from {100 * base.accuracy:.1f}% to {100 * trained.accuracy:.1f}% "
            f"({100 * delta:+.1f} points on {base.closed} held-out records; two standard errors are about "
            f"{200 * se:.1f} points): {'it moved' if moved else 'within noise, it did not move'}."
        )
        per_question = []
        for question, (right_b, n) in base.by_question.items():
            right_t, _ = trained.by_question.get(question, (0, n))
            se_q = math.hypot(_share_se(right_b / n, n), _share_se(right_t / n, n))
            d = (right_t - right_b) / n
            state = "improved" if d > 2 * se_q else "got worse" if d < -2 * se_q else "did not move beyond noise"
            per_question.append(f"- {question!r}: {right_b}/{n} -> {right_t}/{n}, {state}.")
        lines.append("\n".join(per_question))
    if base.corrupted:
        se = math.hypot(base.sensitivity_se, trained.sensitivity_se)
        delta = trained.sensitivity - base.sensitivity
        # A model that ignores the image scores v and v' alike up to fp32 rounding of the summed log-probs
        # (about 1e-6 nats): a difference that small is no movement, however small its standard error.
        moved = abs(delta) > max(2 * se, 1e-3)
        lines.append(
            f"The log-prob drop (of the v' ground truth's log-prob from v to v', all kinds together) went from "
            f"{base.sensitivity:+.3f} to {trained.sensitivity:+.3f} nats ({delta:+.3f}; two standard errors are "
            f"about {2 * se:.3f}): {'it moved' if moved else 'within noise, it did not move'}; the answer became "
            f"less likely under v' for {100 * base.sensitivity_drops:.0f}% -> {100 * trained.sensitivity_drops:.0f}% "
            f"of the records. On a lesion-removed scan a confidently wrong answer also drops, so read it beside "
            f"the per-kind table."
        )
    return lines


def generated_verdict(base_answers, trained_answers, base, trained) -> str:
    """What the models' own greedy answers did (closed accuracy of the generated answer, overall and per kind,
    beyond ~2 standard errors), and whether it agrees with the log-prob ranking of :func:`verdicts`."""

    def change(b, t) -> tuple[str, bool]:
        se = math.hypot(b.closed_accuracy_se, t.closed_accuracy_se)
        delta = t.closed_accuracy - b.closed_accuracy
        state = "improved" if delta > 2 * se else "got worse" if delta < -2 * se else "did not move beyond noise"
        return f"{100 * b.closed_accuracy:.1f}% -> {100 * t.closed_accuracy:.1f}% ({state})", delta < -2 * se

    overall, fell = change(base_answers.overall, trained_answers.overall)
    kinds = [f"{kind} {change(b, trained_answers.by_kind[kind])[0]}" for kind, b in base_answers.by_kind.items()
             if b.closed and kind in trained_answers.by_kind]
    text = (f"The models' own greedy answers: closed accuracy of the generated answer {overall}"
            + (f"; per kind: {', '.join(kinds)}" if kinds else "") + ".")
    se = math.hypot(_share_se(base.accuracy, base.closed), _share_se(trained.accuracy, trained.closed))
    ranked_up = trained.accuracy - base.accuracy > 2 * se
    if ranked_up and (fell or trained_answers.overall.closed_accuracy <= base_answers.overall.closed_accuracy):
        text += (" The ranking of the candidates rose while the answers the model says did not: it ranks the right "
                 "candidate first more often without saying it (its answers are in eval.json).")
    return text


def margins_paragraph(clean_first: float, clean_last: float, visual_first: float, visual_last: float) -> str:
    """The clean and the visual reward margins over training, with what each one measures; no verdict."""
    head = (f"Clean reward margin (beta x [Delta(y+, v) - Delta(y-, v)]) {clean_first:+.3f} -> {clean_last:+.3f}; "
            f"visual margin (beta x [Delta(y-, v') - Delta(y+, v')]) {visual_first:+.3f} -> {visual_last:+.3f}.")
    if math.isnan(visual_last):
        return head + " No example had a corrupted image, so the visual term never ran."
    return head + (
        " The visual margin grows when the policy, relative to the reference, becomes less sure of the chosen "
        "phrase than of the rejected one on v'. Both are measured on the training pairs; what the model does on "
        "unseen scans is in the held-out tables below.")


def write_report(out: Path, cfg: DemoConfig, facts: dict[str, Any], rows, base, trained, png: Path,
                 answers: dict[str, Any]) -> Path:
    """``report.md``: setup, training curves summary, base vs trained tables (log-prob ranking and the
    generated answers' scores) and the verdicts."""
    from .evaluate import comparison_table, kind_table
    from .metrics import answer_table

    first = {n: _mean(rows, n, "first") for n in REPORT_ROWS}
    last = {n: _mean(rows, n, "last") for n in REPORT_ROWS}
    curve_lines = [f"| {n} | {first[n]:.4f} | {last[n]:.4f} |" for n in REPORT_ROWS]
    setup = [
        f"- Data: {facts['train_records']} training questions on {cfg.train_images} synthetic scans, "
        f"{facts['heldout_records']} held-out questions on {cfg.heldout_images} other scans (closed: side, level, "
        "size, presence; open: where).",
        f"- Base model: tiny random Llava ({facts['parameters']:,} parameters) after a {cfg.warmup_steps}-step format "
        f"warm-up on answers whose key word is random (loss {facts['warmup_first']:.2f} -> "
        f"{facts['warmup_last']:.2f}): it answers in the right format but has no reason to look at the lesion.",
        f"- On-policy pairs from its greedy answers: {facts['pairs_summary']}.",
        f"- Lesion corruption v' ({cfg.corruption!r} mode of `firempo-corrupt`): "
        + CORRUPTION_WORDS.get(cfg.corruption, cfg.corruption) + "; what each mode leaves visible is measured below.",
        f"- Training: FiRe-MPO (beta 0.1, alpha 0.01, gamma 0.1, lambda 0.5), {facts['steps']} optimizer steps of "
        f"{cfg.micro_batch_size} x {cfg.ranks} examples, learning rate {cfg.learning_rate:g} (cosine), "
        f"{cfg.ranks} CPU processes under DeepSpeed ZeRO-3 (`deepspeed --num_gpus {cfg.ranks}`), frozen "
        f"reference = the base model; {facts['train_s']:.0f} s including the launch.",
    ]
    sections = [
        "# FiRe-MPO demo on the embedded synthetic VQA set",
        f"Generated by `python -m firempo_kernels.integrations.demo` in {facts['total_s']:.0f} s.",
        "## Setup",
        "\n".join(setup),
        "## Training curves",
        f"![training curves]({png.name})",
        "Mean of the first and of the last tenth of the steps:",
        "| metric | first | last |\n|---|---|---|\n" + "\n".join(curve_lines),
        margins_paragraph(first["rewards/margins"], last["rewards/margins"], first["visual/margins"],
                          last["visual/margins"]),
        "## What v' still shows (held-out scans, detectors that learn nothing)",
        "A corruption removes the evidence for a question kind when every detector falls to chance on v' while "
        "one of them reads v well. Where it does not, the visual term asks the model to be less sure of a "
        "finding the corrupted scan still shows.",
        *[f"**v' = {mode}**\n\n{table}" for mode, table in facts["evidence"].items()],
        "## Held-out evaluation, base vs trained",
        comparison_table({"base": base, "trained": trained}),
        f"Per question kind (v' = {cfg.corruption}; on a scan whose lesion was removed, side, level and size have "
        "no right answer: accuracy on v' near chance and margins that move toward zero are what looking at the "
        "lesion gives, and the presence question's 'no lesion' rate on v' is the one right answer there):",
        kind_table({"base": base, "trained": trained}),
        "Greedy answers, scored as medical VQA papers score them (exact match and recall of the answer's words, "
        "closed accuracy of the generated answer; percent, each with its standard error):",
        answer_table(answers),
        "## What moved and what did not",
        *verdicts(base, trained),
        generated_verdict(answers["base"], answers["trained"], base, trained),
        "A model this small, trained for minutes on synthetic scans, shows the mechanics (on-policy pairs, "
        "corruption, the loss under ZeRO-3, the evaluation), not what the method does for a 7B medical model.",
    ]
    text = "\n\n".join(sections) + "\n"
    return write_whole(out / "report.md", text)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------

def _previous_demo(out: Path) -> bool:
    """Whether ``out`` holds what a demo run wrote (its marker, or the report of a run from before it)."""
    if (out / _DEMO_MARKER).is_file():
        return True
    report = out / "report.md"
    return report.is_file() and report.read_text(encoding="utf-8", errors="replace").startswith("# FiRe-MPO demo")


def run_demo(out: Path, cfg: DemoConfig) -> Path:
    """Runs every step into ``out`` (emptied first) and returns the report's path."""
    import torch

    from .data import (GreedyAnswerer, RuleBasedEditor, corrupt_records, load_qa_records, make_pairs,
                       write_records)
    from .data.build_pairs import load_model
    from .data.evidence import evidence_check
    from .data.embedded import build_processor, build_tiny_llava
    from .data.synthetic import make_synthetic_vqa
    from .evaluate import ModelScorer, evaluate, generate_and_score

    started = time.perf_counter()
    if out.exists() and any(out.iterdir()):
        if not _previous_demo(out):  # never delete a folder the demo did not write
            raise ValueError(f"--out {out} is not empty and holds no previous demo run; choose a new or empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / _DEMO_MARKER).write_text("written by python -m firempo_kernels.integrations.demo; rerunning replaces it\n")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(cfg.seed)

    data = out / "data"
    train_qa = load_qa_records(make_synthetic_vqa(data, num_images=cfg.train_images, seed=cfg.seed,
                                                  image_size=cfg.image_size, split="train"))
    heldout_qa = load_qa_records(make_synthetic_vqa(data, num_images=cfg.heldout_images, seed=cfg.seed + 1,
                                                    image_size=cfg.image_size, split="heldout"))
    _say(f"wrote {len(train_qa)} training and {len(heldout_qa)} held-out question records, scans and lesion "
         f"masks to {data}")

    processor = build_processor(image_size=cfg.image_size)
    model = build_tiny_llava(processor.tokenizer, image_size=cfg.image_size, hidden_size=cfg.hidden_size,
                             seed=cfg.seed)
    warmup = format_warmup(model, processor, train_qa, cfg)
    base_dir = out / "base"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    _say(f"wrote the base model (tiny Llava + format warm-up, loss {warmup[0]:.2f} -> {warmup[-1]:.2f}) to {base_dir}")

    answers = GreedyAnswerer(model, processor, max_new_tokens=cfg.max_new_tokens)(train_qa)
    pairs, stats = make_pairs(train_qa, answers, RuleBasedEditor())
    pairs = corrupt_records(pairs, data / "corrupted-train", mode=cfg.corruption)
    pairs_path = data / "pairs.jsonl"
    write_records(pairs_path, pairs)
    _say(f"{stats.summary()}; wrote them with corrupted images to {pairs_path}")
    evidence = {}
    for mode in dict.fromkeys(("paper", cfg.corruption)):
        corrupted = corrupt_records(heldout_qa, data / f"corrupted-heldout-{mode}", mode=mode)
        evidence[mode] = evidence_check(corrupted).markdown()
        if mode == cfg.corruption:
            heldout = corrupted
    heldout_path = data / "heldout.jsonl"
    write_records(heldout_path, heldout)
    _say(f"wrote {len(heldout)} held-out records with corrupted images ({cfg.corruption}) to {heldout_path}; "
         f"measured what each corruption leaves visible")

    base_report = evaluate(heldout, ModelScorer(model, processor))
    base_answers, base_said = generate_and_score(heldout, model, processor, max_new_tokens=cfg.max_new_tokens)
    _say(f"base model: closed accuracy {100 * base_report.accuracy:.1f}%, visual sensitivity "
         f"{base_report.sensitivity:+.3f} nats")

    recipe = write_run_config(out, base_dir, pairs_path, cfg)
    _say(f"wrote the training recipe to {recipe}")
    t0 = time.perf_counter()
    launch_training(recipe, cfg.ranks, out / "train.log")
    train_s = time.perf_counter() - t0
    final = out / "train" / "final"
    processor.save_pretrained(final)  # the trainer saves the weights; the processor makes the folder loadable
    rows = read_metrics(out / "train" / "trainer_state.json")
    metrics_path = write_metrics(rows, out / "metrics.jsonl")
    _say(f"trained {len(rows)} steps in {train_s:.0f} s; model in {final}, metrics in {metrics_path}")

    trained, _ = load_model(str(final))
    trained_report = evaluate(heldout, ModelScorer(trained, processor))
    trained_answers, trained_said = generate_and_score(heldout, trained, processor, max_new_tokens=cfg.max_new_tokens)
    eval_path = out / "eval.json"
    generated = {name: {"scores": r.to_json(), "answers": dict(zip((q.id for q in heldout), said))}
                 for name, r, said in (("base", base_answers, base_said), ("trained", trained_answers, trained_said))}
    write_whole(eval_path, json.dumps({"base": base_report.to_json(), "trained": trained_report.to_json(),
                                       "generated": generated, "config": asdict(cfg)}, indent=2))
    _say(f"trained model: closed accuracy {100 * trained_report.accuracy:.1f}%, visual sensitivity "
         f"{trained_report.sensitivity:+.3f} nats; wrote both evaluations to {eval_path}")

    png = plot_curves(rows, out / "curves.png")
    _say(f"wrote the training curves to {png}")
    facts = {
        "total_s": time.perf_counter() - started, "train_s": train_s, "steps": len(rows),
        "train_records": len(train_qa), "heldout_records": len(heldout),
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_first": warmup[0], "warmup_last": warmup[-1], "pairs_summary": stats.summary(),
        "evidence": evidence,
    }
    return write_report(out, cfg, facts, rows, base_report, trained_report, png,
                        {"base": base_answers, "trained": trained_answers})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m firempo_kernels.integrations.demo`` (``make demo``)."""
    ap = argparse.ArgumentParser(prog="python -m firempo_kernels.integrations.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="output folder (a previous demo run there is replaced)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the path in about a minute")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)

    def body() -> int:
        report = run_demo(Path(args.out).resolve(), QUICK if args.quick else DemoConfig())
        _say(f"report: {report}")
        return 0

    return run_command("demo", body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())

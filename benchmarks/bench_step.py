"""One whole FiRe-MPO training step of a small Qwen2.5-VL with Qwen's real vocabulary (V = 151936), or of a
small Gemma 3 (MedGemma) with Gemma's (V = 262144): forward and backward through the model, every pass of the
method.

    .venv/bin/python benchmarks/bench_step.py [--prefix 128 256 512 1024] [--answer 32]
        [--answer-sweep 16 64 128] [--answer-sweep-prefix 512] [--reps 3]
    .venv/bin/python benchmarks/bench_step.py --family gemma3 [--prefix 256 512] [--answer 32] [--reps 3]

Methods, on the same model, reference and batch:

- ``packed``: ours with ``shared_prefix`` (the default): per image kind one forward of the example's
  [prompt | chosen | rejected] row, in the policy and the reference (integrations/packing.py);
- ``unpacked``: ours with ``shared_prefix=False``: both rows in full, the prompt run twice;
- ``precomputed``: ours packed, the reference read from a precomputed store (``--precompute-reference``:
  built once before training, outside the timed step), so no reference forward at all;
- ``authors``: the paper's code style: the model's own forward with full logits at every position of all 8
  passes (policy and reference on (v, y+), (v, y-), (v', y+), (v', y-)), ``log_softmax`` over the vocabulary,
  the same loss.

With ``--dpo``, the DPO preset instead (every answer token weighted, no corrupted image, no KL): ours packed
(``dpo_packed``) against TRL 1.16's ``DPOTrainer`` step with its fused head (``dpo_trl``: the policy and the
reference through ``add_fused_lm_head`` as ``DPOTrainer`` patches them, both rows in full, the sigmoid loss of
its ``_compute_loss``), each on its own copy of the same model; its table is a block of its own.

One example (B = 1) whose prompt is an image (4 placeholder tokens) and text up to ``--prefix`` tokens, and two
``--answer``-token answers that differ in a 4-token phrase (the span). The model: Qwen2.5-VL's architecture at
d = 512, 8 decoder layers, V = 151936; the paper's setting: LoRA (r 8) on every projection of the language
model, the reference = the policy with its adapters off. fp32, 2 threads. The authors' style runs up to
``--authors-max-prefix`` (its full logits take ~1.3 GB per pass at 1024 tokens and minutes per step here).

With ``--family gemma3``, the same methods and example on ``Gemma3ForConditionalGeneration`` (MedGemma's
architecture) built from a config with random weights: d = 512, 8 decoder layers, V = 262144, the head tied to
the embedding as in MedGemma, Gemma 3's pattern of five sliding-window layers (window 1024, MedGemma 4B's) to
one global layer, a SigLIP vision tower (d 512, 8 layers, 16-pixel images in 4-pixel patches pooled to 4 image
tokens: MedGemma's 896-pixel images give 256; here, as for Qwen, the prefix is mostly text), LoRA (r 8) on the
language model's projections only (not SigLIP's), the reference = adapters off. The image tokens attend each
other both ways (``token_type_ids``, derived from the ids by the model adapter). The prompt is laid out as
MedGemma's processor lays it out: ``<start_of_image>``, the image tokens, ``<end_of_image>``, then text. Its
defaults: prefixes 256 and 512, no answer sweep; outputs ``benchmarks/report/step_gemma3.json``,
``step_gemma3_vs_prefix.png`` and a generated block of its own in ``benchmarks/RESULTS.md``.

Peak extra memory: each (method, prefix) in its own process, the resident-set high-water mark of one step
minus the resident set before it (benchmarks/harness.py, CpuMemory). Time: the median of ``--reps`` steps
after a warm-up, the methods interleaved in one process. Writes ``benchmarks/report/step.json``,
``benchmarks/report/step_vs_prefix.png``, ``step_vs_answer.png`` (the answer sweep) and the generated block
of the "whole training step" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    # Sleeping OpenMP waits, as in every measuring process of benchmarks/report.py (worker_env): set before
    # torch starts its thread pool. On shared cores, spinning waits punished the fused head's many parallel
    # regions (on a loaded machine Gemma 3's packed step measured 2.2x the unpacked one with them, 0.73x
    # without).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.report import save_figure, update_results_md  # noqa: E402
from firempo_kernels.integrations.cli import write_whole  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- BEGIN GENERATED: benchmarks/bench_step.py -->", "<!-- END GENERATED: benchmarks/bench_step.py -->"
METHODS = ("packed", "unpacked", "precomputed", "authors")
FAMILIES = ("qwen2_5_vl", "gemma3")
DPO_METHODS = ("dpo_packed", "dpo_trl")
DPO_BEGIN = "<!-- BEGIN GENERATED: benchmarks/bench_step.py --dpo -->"
DPO_END = "<!-- END GENERATED: benchmarks/bench_step.py --dpo -->"
GEMMA3_BEGIN = "<!-- BEGIN GENERATED: benchmarks/bench_step.py --family gemma3 -->"
GEMMA3_END = "<!-- END GENERATED: benchmarks/bench_step.py --family gemma3 -->"
# TRL's DPOTrainer asks its fused head for these (they feed its logits/* and accuracy metrics).
TRL_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
VOCAB, HIDDEN, LAYERS = 151936, 512, 8
# Gemma 3 (MedGemma): its vocabulary, the head tied to the embedding; one global layer in every GEMMA3_PATTERN
# (5 sliding-window layers, then a global one), the sliding layers' window GEMMA3_WINDOW tokens.
GEMMA3_VOCAB, GEMMA3_HIDDEN, GEMMA3_LAYERS = 262144, 512, 8
GEMMA3_WINDOW, GEMMA3_PATTERN = 1024, 6
SPAN = slice(12, 16)  # the answers differ in these 4 tokens
# The language model's projections; not the vision tower's (Qwen's ``visual``, SigLIP's ``vision_tower``, whose
# attention has q_proj, k_proj and v_proj too).
LORA_TARGETS = (r"^(?!.*(?:visual|vision_tower)).*\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
FAMILY_NAMES = {"qwen2_5_vl": "Qwen2.5-VL", "gemma3": "Gemma 3 (MedGemma)"}


def model_shape(family: str) -> tuple[int, int, int]:
    """(vocabulary, hidden size, decoder layers) of ``family``'s benchmark model."""
    if family == "gemma3":
        return GEMMA3_VOCAB, GEMMA3_HIDDEN, GEMMA3_LAYERS
    return VOCAB, HIDDEN, LAYERS


def base_model(family: str, seed: int = 0):
    """``family``'s benchmark model with random weights (reproducible from ``seed``), frozen, in eval mode."""
    from firempo_kernels.integrations.smoke import tiny_config, tiny_model

    vocab, hidden, layers = model_shape(family)
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers)
    if family == "qwen2_5_vl":
        base = tiny_model("qwen2_5_vl", seed=seed, **kwargs)
    elif family == "gemma3":
        import transformers

        # tiny_config's Gemma 3 (SigLIP tower, 4 image tokens, ids at the top of the vocabulary) with MedGemma's
        # tied head and Gemma 3's layer pattern and window in place of the tests' short ones.
        config = tiny_config("gemma3", tie_word_embeddings=True, **kwargs)
        config.text_config.sliding_window = GEMMA3_WINDOW
        config.text_config.layer_types = ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention"
                                          for i in range(layers)]
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = transformers.Gemma3ForConditionalGeneration(config).eval()
    else:
        raise ValueError(f"bench_step: `family` must be one of {FAMILIES}; got {family!r}")
    base.requires_grad_(False)
    return base


def build(prefix: int, answer: int, seed: int = 0, family: str = "qwen2_5_vl"):
    """(policy, reference, batch, loss_fn): the LoRA policy, its reference (``"adapters_disabled"``), one
    collated example and the paper's loss."""
    import peft

    from firempo_kernels import FiReMPOLoss
    from firempo_kernels.integrations.batch import PreferenceCollator, PreferenceExample
    from firempo_kernels.integrations.smoke import _image_layout, _special_ids

    vocab = model_shape(family)[0]
    base = base_model(family, seed)
    # The paper's setting: LoRA on the language model's projections; the reference is the policy with its
    # adapters off (one model in memory, the head shared).
    torch.manual_seed(seed)  # LoRA's A matrices: the same in every process
    policy = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=LORA_TARGETS)).train()
    lora_g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as after some training: the policy differs from its reference
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02, generator=lora_g)
    # Both families' configs put their image-start (Qwen's vision_start, Gemma's boi) and image-end ids here.
    special = _special_ids(vocab)
    image_tokens, vision = _image_layout(policy.config)
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, vocab - 16, (n,), generator=g)  # noqa: E731 - below the special ids
    prompt = torch.cat((torch.tensor([special["vision_start_token_id"]] + [special["image_token_id"]] * image_tokens
                                     + [special["vision_end_token_id"]]), text(prefix - image_tokens - 2)))
    chosen = text(answer)
    rejected = chosen.clone()
    rejected[SPAN] = text(SPAN.stop - SPAN.start)
    images = {k: torch.randn(v, generator=g) if isinstance(v, tuple) else v for k, v in vision.items()}
    corrupted = {k: (v + 0.5 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                 for k, v in images.items()}

    def row(response):
        ids = torch.cat((prompt, response))
        labels = torch.cat((torch.full_like(prompt, -100), response))
        weights = torch.zeros(ids.shape[0])
        weights[prompt.shape[0] + SPAN.start: prompt.shape[0] + SPAN.stop] = 1.0
        return ids, labels, weights

    example = PreferenceExample("x", *row(chosen), *row(rejected), images=images, corrupted_images=corrupted)
    batch = PreferenceCollator(0)([example])
    batch.has_corrupted_image = torch.ones(1, dtype=torch.bool)
    return policy, "adapters_disabled", batch, FiReMPOLoss()


def step_ours(policy, reference, batch, loss_fn, shared: bool) -> float:
    from firempo_kernels.integrations.forward import compute_firempo_loss

    out = compute_firempo_loss(policy, reference, batch, loss_fn, shared_prefix=shared)
    out.loss.backward()
    return out.loss.item()


def step_authors(policy, reference, batch, loss_fn) -> float:
    """Full logits at every position of the 8 passes, as a plain implementation of the paper computes them."""
    from firempo_kernels.integrations.models import get_adapter

    adapter = get_adapter(policy)
    labels, weights = batch.labels[:, 1:], batch.span_weights[:, 1:]
    targets = labels.clamp_min(0)[..., None]

    def logits(images):
        both = {k: torch.cat((v, v)) for k, v in images.items()}
        return policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **both,
                      **adapter.extra_inputs(policy, batch.input_ids)).logits[:, :-1].float()

    sums, kls = [], None
    for images in (batch.images, batch.corrupted_images):
        log_p = F.log_softmax(logits(images), -1)
        with torch.no_grad(), policy.disable_adapter():  # the reference: the policy without its adapters
            log_q = F.log_softmax(logits(images), -1)
        delta = (weights * (log_p.gather(-1, targets) - log_q.gather(-1, targets))[..., 0]).sum(1)
        sums.append(delta)
        if kls is None:  # the token KL on the clean chosen row's span tokens, over the full vocabulary
            p, q = log_p[0].exp(), log_q[0].exp()
            forward = (q * (log_q[0] - log_p[0])).sum(-1)
            reverse = (p * (log_p[0] - log_q[0])).sum(-1)
            kls = (weights[0] * (loss_fn.lambda_ * forward + (1 - loss_fn.lambda_) * reverse)).sum()
    (clean_c, clean_r), (corr_c, corr_r) = sums
    rank = -F.logsigmoid(loss_fn.beta * (clean_c - clean_r))
    visual = -loss_fn.gamma * F.logsigmoid(loss_fn.beta * (corr_r - corr_c))
    loss = rank + visual + loss_fn.alpha * kls
    loss.backward()
    return loss.item()


def build_dpo(prefix: int, answer: int, method: str, seed: int = 0):
    """The model and batch of :func:`build` for the DPO preset: every answer token weighted, no v'."""
    import dataclasses

    from firempo_kernels import FiReMPOLoss

    policy, reference, batch, _ = build(prefix, answer, seed)
    batch = dataclasses.replace(batch, span_weights=(batch.labels != -100).float(), corrupted_images=None,
                                has_corrupted_image=None)
    if method == "dpo_trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(policy.get_base_model(), outputs=TRL_HEAD_OUTPUTS)  # as DPOTrainer.__init__ does
    return policy, reference, batch, FiReMPOLoss.dpo()


def step_trl_dpo(policy, batch, loss_fn) -> float:
    """TRL 1.16 ``DPOTrainer._compute_loss`` (sigmoid loss, reference = adapters disabled) on the same rows:
    its collator's layout is ours, chosen rows then rejected rows, labels on the completion."""
    from firempo_kernels.integrations.models import get_adapter

    both = {k: torch.cat((v, v)) for k, v in batch.images.items()}
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **both,
                  **get_adapter(policy).extra_inputs(policy, batch.input_ids))
    seq_len = batch.labels.shape[1] - 1
    logps = policy(**inputs, labels=batch.labels, fused_lm_head=True).log_probs[:, -seq_len:].sum(1)
    with torch.no_grad(), policy.disable_adapter():
        ref_logps = policy(**inputs, labels=batch.labels, fused_lm_head=True).log_probs[:, -seq_len:].sum(1)
    ratios = logps - ref_logps
    loss = -F.logsigmoid(loss_fn.beta * (ratios[0] - ratios[1])).mean()
    loss.backward()
    return loss.item()


_STORES: dict = {}


def stored_reference(policy, batch):
    """The precomputed reference of this batch (adapters off) as training uses it: a store built once before
    the first step (here on first use, in a temporary folder removed at exit) and opened once; each step
    looks its examples up (from disk) and, the head being the policy's frozen one, loads no head."""
    import atexit
    import shutil
    import tempfile

    from firempo_kernels.integrations.precompute import (
        PrecomputedReferenceStore,
        PrecomputedStoreReference,
        precompute_reference,
    )
    from firempo_kernels.integrations.reference import AdaptersDisabledReference

    key = (id(policy), id(batch))
    if key not in _STORES:
        directory = tempfile.mkdtemp(prefix="firempo-bench-store-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        precompute_reference(AdaptersDisabledReference(), [batch], directory, policy=policy, progress=False)
        _STORES[key] = PrecomputedStoreReference(PrecomputedReferenceStore(directory))
    return _STORES[key]


def run_step(method: str, policy, reference, batch, loss_fn) -> float:
    policy.zero_grad(set_to_none=True)
    if method == "dpo_trl":
        return step_trl_dpo(policy, batch, loss_fn)
    if method == "precomputed":
        return step_ours(policy, stored_reference(policy, batch), batch, loss_fn, shared=True)
    if method == "authors":
        return step_authors(policy, reference, batch, loss_fn)
    return step_ours(policy, reference, batch, loss_fn, shared=method in ("packed", "dpo_packed"))


def child(method: str, prefix: int, answer: int, family: str = "qwen2_5_vl") -> dict:
    """Peak extra memory of one step of ``method`` (run in a fresh process)."""
    from benchmarks.harness import CpuMemory, _Glibc

    glibc = _Glibc()
    glibc.tight()
    policy, reference, batch, loss_fn = (build_dpo(prefix, answer, method) if method in DPO_METHODS
                                         else build(prefix, answer, family=family))
    run_step(method, policy, reference, batch, loss_fn)  # warm-up
    policy.zero_grad(set_to_none=True)
    memory = CpuMemory()
    memory.start()
    value = run_step(method, policy, reference, batch, loss_fn)
    return {"peak_extra_mib": memory.peak_extra_mib(), "loss": value}


def measure(shapes, reps: int, authors_max_prefix: int, authors_max_answer: int = 32, dpo: bool = False,
            family: str = "qwen2_5_vl") -> list[dict]:
    """One row per (prefix, answer) of ``shapes``; the authors' style only up to both maxima (its steps take
    30 s and more beyond them here)."""
    from benchmarks.harness import _Glibc

    # glibc's steady state of a long-running process (benchmarks/harness.py): the authors' style frees
    # gigabytes each step, and without it the next method's step pays for faulting its buffers back in.
    _Glibc().steady()
    rows = []
    for prefix, answer in shapes:
        record = {"prefix": prefix, "answer": answer}
        if dpo:
            methods = list(DPO_METHODS)
        else:
            authors = prefix <= authors_max_prefix and answer <= authors_max_answer
            methods = [m for m in METHODS if m != "authors" or authors]
        for method in methods:
            proc = subprocess.run([sys.executable, __file__, "--child", method, "--prefix", str(prefix),
                                   "--answer", str(answer), "--family", family],
                                  capture_output=True, text=True, env=_env())
            if proc.returncode != 0:
                raise RuntimeError(f"{method} at prefix {prefix}: {proc.stderr[-2000:]}")
            record[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        # TRL patches the forward of the model it is given: each DPO method gets its own copy.
        setups = {m: build_dpo(prefix, answer, m) for m in methods} if dpo else dict.fromkeys(
            methods, build(prefix, answer, family=family))
        times: dict[str, list[float]] = {m: [] for m in methods}
        for method in methods:
            run_step(method, *setups[method])  # warm-up
        for _ in range(reps):
            for method in methods:
                t0 = time.perf_counter()
                run_step(method, *setups[method])
                times[method].append(time.perf_counter() - t0)
        for method in methods:
            record[method]["seconds"] = statistics.median(times[method])
        record["load"] = os.getloadavg()[0]
        rows.append(record)
        print(json.dumps(record), flush=True)
    return rows


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["TQDM_DISABLE"] = "1"
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _run_line(rows: list[dict], reps: int) -> str:
    """Machine, date, command and load of a run: the first line of each generated block."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    policy = os.environ.get("OMP_WAIT_POLICY")
    return (f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, fp32, "
            f"{'OMP_WAIT_POLICY=' + policy + ', ' if policy else ''}{date}; "
            f"`{' '.join(['.venv/bin/python', 'benchmarks/bench_step.py'] + sys.argv[1:])}`; median of {reps} steps, "
            f"load average {min(r['load'] for r in rows):.1f}-{max(r['load'] for r in rows):.1f}.")


def write(rows: list[dict], out: Path, reps: int, results_md: Path = RESULTS_MD, family: str = "qwen2_5_vl") -> str:
    """The JSON, the plots and the generated block of ``family`` (Qwen's files keep their names; Gemma 3's are
    ``step_gemma3*`` and its block has markers of its own)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "step" if family == "qwen2_5_vl" else f"step_{family}"
    write_whole(out / f"{stem}.json", json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    answer, sweep_prefixes = rows[0]["answer"], [r["prefix"] for r in rows if r["answer"] != rows[0]["answer"]]
    plots = [("prefix", "prefix tokens (image + question)", [r for r in rows if r["answer"] == answer],
              f"{answer}-token answers", f"{stem}_vs_prefix.png")]
    if sweep_prefixes:
        at = sweep_prefixes[0]
        plots.append(("answer", "answer tokens (each of the two)", [r for r in rows if r["prefix"] == at],
                      f"a {at}-token prefix", f"{stem}_vs_answer.png"))
    for key, xlabel, chosen, fixed, name in plots:
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
        for method, color in zip(METHODS, ("C0", "C1", "C2", "C3")):
            done = sorted((r for r in chosen if method in r), key=lambda r: r[key])
            ax_t.plot([r[key] for r in done], [r[method]["seconds"] for r in done], "o-", color=color, label=method)
            ax_m.plot([r[key] for r in done], [r[method]["peak_extra_mib"] for r in done], "o-", color=color,
                      label=method)
        for ax, label in ((ax_t, "step time, s"), (ax_m, "peak extra memory, MiB")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        ax_m.set_yscale("log")
        ax_t.legend()
        vocab, hidden, layers = model_shape(family)
        fig.suptitle(f"one FiRe-MPO step, {FAMILY_NAMES[family]} (d {hidden}, {layers} layers, V {vocab}), {fixed}")
        fig.tight_layout()
        save_figure(fig, out / name)
        plt.close(fig)

    lines = [
        _run_line(rows, reps),
        "",
        "| prefix | answers | packed | unpacked | precomputed ref. | authors' style | packed / unpacked time "
        "| packed / authors time | peak: packed | unpacked | precomputed ref. | authors' style |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, u, a, s = r["packed"], r["unpacked"], r.get("authors"), r.get("precomputed")
        a_time = f"{a['seconds']:.2f} s" if a else "not run"
        a_ratio = f"{p['seconds'] / a['seconds']:.3f}x" if a else "-"
        a_peak = f"{a['peak_extra_mib']:,.0f} MiB" if a else "not run"
        s_time = f"{s['seconds']:.2f} s" if s else "not run"
        s_peak = f"{s['peak_extra_mib']:,.0f} MiB" if s else "not run"
        lines.append(
            f"| {r['prefix']} | {r['answer']} | {p['seconds']:.2f} s | {u['seconds']:.2f} s | {s_time} | {a_time} "
            f"| {p['seconds'] / u['seconds']:.2f}x | {a_ratio} "
            f"| {p['peak_extra_mib']:,.0f} MiB | {u['peak_extra_mib']:,.0f} MiB | {s_peak} | {a_peak} |")
    agree = max(abs(r[m]["loss"] - r["unpacked"]["loss"]) / abs(r["unpacked"]["loss"])
                for r in rows for m in METHODS if m in r)
    names = ", ".join(f"`benchmarks/report/{name}`" for *_, name in plots)
    lines += ["", f"The methods' losses agree to {agree:.1e} relative (the same objective). Plots: {names}."]
    text = "\n".join(lines)
    begin, end = (BEGIN, END) if family == "qwen2_5_vl" else (GEMMA3_BEGIN, GEMMA3_END)
    update_results_md(results_md, text, begin, end)
    return text


def write_dpo(rows: list[dict], out: Path, reps: int) -> str:
    out.mkdir(parents=True, exist_ok=True)
    write_whole(out / "step_dpo.json", json.dumps(rows, indent=1))
    lines = [
        _run_line(rows, reps),
        "",
        "| prefix | answers | ours (packed) | TRL DPOTrainer step | ours / TRL time | peak: ours | TRL |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, t = r["dpo_packed"], r["dpo_trl"]
        lines.append(f"| {r['prefix']} | {r['answer']} | {o['seconds']:.2f} s | {t['seconds']:.2f} s "
                     f"| {o['seconds'] / t['seconds']:.2f}x | {o['peak_extra_mib']:,.0f} MiB "
                     f"| {t['peak_extra_mib']:,.0f} MiB |")
    agree = max(abs(r["dpo_packed"]["loss"] - r["dpo_trl"]["loss"]) / abs(r["dpo_trl"]["loss"]) for r in rows)
    lines += ["", f"The two losses agree to {agree:.1e} relative (the same objective)."]
    text = "\n".join(lines)
    update_results_md(RESULTS_MD, text, DPO_BEGIN, DPO_END)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl",
                    help="the model: Qwen2.5-VL (V 151936) or Gemma 3 / MedGemma (V 262144)")
    ap.add_argument("--prefix", type=int, nargs="+",
                    help="prefix lengths (default: 128 256 512 1024; Gemma 3: 256 512)")
    ap.add_argument("--answer", type=int, default=32)
    ap.add_argument("--answer-sweep", type=int, nargs="*",
                    help="more answer lengths, measured at the prefix --answer-sweep-prefix (plotted apart; "
                         "default: 16 64 128; Gemma 3: none)")
    ap.add_argument("--answer-sweep-prefix", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--authors-max-prefix", type=int, default=512)
    ap.add_argument("--out", default=str(HERE / "report"))
    ap.add_argument("--dpo", action="store_true", help="the DPO preset: ours against TRL's DPOTrainer step")
    ap.add_argument("--child", choices=METHODS + DPO_METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gemma = args.family == "gemma3"
    if args.dpo and gemma:
        ap.error("--dpo runs on the Qwen2.5-VL model only")
    if args.prefix is None:
        args.prefix = [256, 512] if gemma else [128, 256, 512, 1024]
    if args.answer_sweep is None:
        args.answer_sweep = [] if gemma else [16, 64, 128]
    torch.set_num_threads(int(_env()["OMP_NUM_THREADS"]))
    if args.child:
        print(json.dumps(child(args.child, args.prefix[0], args.answer, args.family)))
        return 0
    shapes = [(p, args.answer) for p in args.prefix]
    if not args.dpo:
        shapes += [(args.answer_sweep_prefix, a) for a in args.answer_sweep if a != args.answer]
    rows = measure(shapes, args.reps, args.authors_max_prefix, dpo=args.dpo, family=args.family)
    if args.dpo:
        print(write_dpo(rows, Path(args.out), args.reps))
    else:
        print(write(rows, Path(args.out), args.reps, family=args.family))
    return 0


if __name__ == "__main__":
    sys.exit(main())

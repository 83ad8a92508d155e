"""Regenerates the family table of docs/families.md from a run of the tests that check each column.

    .venv/bin/python docs/families_table.py            # about 3 minutes on 2 cores
    .venv/bin/python docs/families_table.py --zero3    # also the 2-rank ZeRO-3 runs (about 7 minutes more)

Each cell is what the named tests did in this run: "yes" when every test behind it passed, "FAILED" when one
failed, "not run" when none was collected or selected (ZeRO-3 without --zero3), "-" where no test exists for
that family (said in the notes under the table). The table (with the run's date, the session seed and the
command) replaces the one between the markers of docs/families.md and of the README.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "families.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- families-table:begin -->", "<!-- families-table:end -->"


def _new(family: str) -> dict[str, list[str]]:
    """The processor-driven families of tests/test_families.py."""
    return {
        "exact": [f"test_families.py::test_hidden_states_times_head_are_the_models_logits[{family}]",
                  f"test_families.py::test_fused_loss_equals_the_loss_of_the_models_logits[{family}-False]"],
        "trains": [f"test_families.py::test_trains_from_a_saved_folder_and_a_precomputed_reference_equals_the_live_one"
                   f"[{family}]"],
        "packed": [f"test_packing.py::test_packed_hidden_states_equal_unpacked_at_every_position[{family}-sdpa]",
                   f"test_packing.py::test_packed_hidden_states_equal_unpacked_at_every_position[{family}-eager]",
                   f"test_packing.py::test_loss_and_gradients_equal_unpacked[{family}-False]",
                   f"test_families.py::test_fused_loss_equals_the_loss_of_the_models_logits[{family}-True]"],
        "ZeRO-3": [],
        "precomputed reference": [
            f"test_families.py::test_trains_from_a_saved_folder_and_a_precomputed_reference_equals_the_live_one"
            f"[{family}]"],
    }


def _old(family: str) -> dict[str, list[str]]:
    """The families served first, checked by test_models.py, test_packing.py and test_trl_trainer.py."""
    return {
        "exact": [f"test_models.py::test_hidden_states_are_the_heads_input[{family}]",
                  f"test_models.py::test_adapter_loss_equals_full_logits_loss[{family}]"],
        "trains": [f"test_trl_trainer.py::test_each_vision_family_trains_with_corrupted_images[{family}]"],
        "packed": [f"test_packing.py::test_packed_hidden_states_equal_unpacked_at_every_position[{family}-sdpa]",
                   f"test_packing.py::test_loss_and_gradients_equal_unpacked[{family}-False]"],
        "ZeRO-3": [],
        "precomputed reference": [],
    }


#: family -> (model class, column -> the test ids that establish it)
FAMILIES: dict[str, tuple[str, dict[str, list[str]]]] = {
    "llava": ("LlavaForConditionalGeneration", _old("llava")),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", _old("qwen2_vl")),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", _old("qwen2_5_vl")),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", _old("qwen3_vl")),
    "gemma3": ("Gemma3ForConditionalGeneration (MedGemma)", _new("gemma3")),
    "paligemma": ("PaliGemmaForConditionalGeneration", _new("paligemma")),
    "paligemma2": ("PaliGemmaForConditionalGeneration, Gemma 2 text, soft-capped", _new("paligemma2")),
    "llava_next": ("LlavaNextForConditionalGeneration", _new("llava_next")),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", _new("llava_onevision")),
    "idefics3": ("Idefics3ForConditionalGeneration", _new("idefics3")),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", _new("qwen3_5")),
    "internvl": ("InternVLForConditionalGeneration", _new("internvl")),
    "gemma4": ("Gemma4ForConditionalGeneration", _new("gemma4")),
    "mistral3": ("Mistral3ForConditionalGeneration, Pixtral vision", _new("mistral3")),
    "smolvlm": ("SmolVLMForConditionalGeneration", _new("smolvlm")),
}
FAMILIES["qwen2_5_vl"][1]["precomputed reference"] = ["test_trl_trainer.py::test_precomputed_reference_equals_live"]
FAMILIES["qwen2_vl"][1]["ZeRO-3"] = [  # smoke.yaml's family
    "test_trainer_distributed.py::test_zero3_two_ranks_equal_one_process_without_deepspeed"]
for _family in ("gemma3", "paligemma2"):
    FAMILIES[_family][1]["ZeRO-3"] = [
        f"test_trainer_distributed.py::test_zero3_two_ranks_equal_one_process_for_other_families[{_family}]"]
# Qwen3.5 never packs (recurrent layers): the column says that it runs unpacked, and the test that it does.
FAMILIES["qwen3_5"][1]["packed"] = ["test_families.py::test_a_model_with_recurrent_layers_runs_unpacked_said_once"]
UNPACKED = {"qwen3_5"}
COLUMNS = ["exact", "trains", "packed", "ZeRO-3", "precomputed reference"]
NOTES = [
    "exact: hidden states times the head equal the model's own logits (fp32, 1e-5 of their size) at every "
    "real position of right-padded rows with images, and the fused loss and its gradients equal the float64 "
    "loss of those logits.",
    "trains: FiReMPOTrainer, 2 steps with clean and corrupted images, every metric logged (new families: from a "
    "folder saved with save_pretrained and loaded with AutoModelForImageTextToText / AutoProcessor; the processor "
    "is handed to the trainer for llava_onevision, qwen3_5, internvl, gemma4 and smolvlm, whose stock processors "
    "need torchvision for their video part, and for mistral3, whose PixtralProcessor imports torchvision: its "
    "tiny processor is a class of this project writing Pixtral's image prompt).",
    "packed: packed equals unpacked hidden states (1e-5) and loss and gradients; qwen3_5 runs unpacked "
    "(gated-delta-net layers carry state along the row), said once in the log.",
    "ZeRO-3: 2 CPU ranks equal one process (loss per step and weights, 1e-5); run for one Qwen-VL family, for "
    "Gemma 3 (bidirectional image blocks, sliding windows) and PaliGemma 2 (soft cap, carried prompt lengths); "
    "the other families share their code path.",
    "precomputed reference: training with the stored reference equals training with the live one.",
    "-: no test of that column for that family.",
]


def _run(ids: list[str], zero3: bool) -> tuple[dict[str, str], str]:
    """Run the tests behind the table (ZeRO-3's only with ``zero3``); returns (test id -> passed / failed /
    skipped, the session seed, drawn here so that the run can be replayed)."""
    selected = sorted({f"tests/{i}" for i in ids if zero3 or "distributed" not in i})
    seed = str(int.from_bytes(os.urandom(3), "little"))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", FIREMPO_TEST_SEED=seed)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *selected]
        subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        outcome: dict[str, str] = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            test_id = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
            kinds = {child.tag for child in case}
            outcome[test_id] = ("failed" if kinds & {"failure", "error"} else
                                "skipped" if "skipped" in kinds else "passed")
    return outcome, seed


def _cell(family: str, column: str, tests: list[str], outcome: dict[str, str]) -> str:
    if not tests:
        return "-"
    seen = [outcome.get(t) for t in tests]
    if "failed" in seen:
        return "FAILED"
    if any(s is None or s == "skipped" for s in seen):
        return "not run"
    return "unpacked" if column == "packed" and family in UNPACKED else "yes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero3", action="store_true", help="also run the 2-rank ZeRO-3 tests (minutes)")
    args = parser.parse_args(argv)
    ids = [t for _, cols in FAMILIES.values() for tests in cols.values() for t in tests]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    outcome, seed = _run(ids, args.zero3)
    lines = ["| family | model class | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for family, (model, cols) in FAMILIES.items():
        cells = [_cell(family, c, cols[c], outcome) for c in COLUMNS]
        lines.append(f"| `{family}` | {model} | " + " | ".join(cells) + " |")
    command = "python docs/families_table.py" + (" --zero3" if args.zero3 else "")
    table = "\n".join([
        BEGIN,
        f"Generated by `{command}` from the test run of {started} (tiny models, CPU, "
        f"FIREMPO_TEST_SEED={seed}).",
        "",
        *lines,
        "",
        *[f"- {note}" for note in NOTES],
        END,
    ])
    sys.path.insert(0, str(ROOT))
    from firempo_kernels.integrations.cli import write_whole

    texts = {doc: doc.read_text(encoding="utf-8") for doc in (DOC, README)}
    for doc, text in texts.items():
        if BEGIN not in text or END not in text:
            print(f"families_table: {doc} has no {BEGIN} ... {END} markers", file=sys.stderr)
            return 2
    for doc, text in texts.items():
        head, rest = text.split(BEGIN, 1)
        write_whole(doc, head + table + rest.split(END, 1)[1])
    print("\n".join(lines))
    failed = sorted(t for t in ids if outcome.get(t) == "failed")
    if failed:
        print(f"failed ({len(failed)}): {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

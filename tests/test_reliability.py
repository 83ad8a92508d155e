"""Nothing lost, nothing silently wrong: one case per class of fault (a second run into the same folder, a
mismatched precomputed reference or resumed config, bad input found late, unclear errors, numeric edges,
unsafe input). The numeric edges of the ops and the loss are in test_ops.py / test_losses.py
(``test_kl_is_never_negative_*``, ``test_bad_hyperparameters_raise``, ``test_bad_num_examples_in_batch_raises``);
the strict types of the recipe in test_run_config.py. ``tests/probe_reliability.py`` sweeps the entry
points and fills the table of docs/reliability.md."""

import json
import re
from pathlib import Path

import pytest

from probe_reliability import scan_records

from firempo_kernels.integrations import train
from firempo_kernels.integrations.data import corrupt, build_pairs
from firempo_kernels.integrations.data.records import RecordValidationError, load_qa_records

SMOKE = str(Path(train.__file__).parent / "configs" / "smoke.yaml")


@pytest.fixture(autouse=True)
def quiet_and_single_threaded(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("FIREMPO_PROGRESS", "0")


def firempo_train(out: Path, *extra: str, seed: int = 0) -> int:
    return train.main([
        "--config", SMOKE, "--tiny_seed", str(seed), "--synthetic_examples", "4", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_steps", "2", "--save_steps", "1", "--disable_tqdm", "true",
        "--gradient_checkpointing", "false", "--output_dir", str(out), *extra,
    ])


def no_traceback(err: str) -> bool:
    """No traceback of ours; in-process runs leave transformers' logger holding an earlier captured stream,
    whose complaint ("--- Logging error ---" and its own traceback) is pytest's artefact, not the command's."""
    return "Traceback" not in re.sub(r"--- Logging error ---.*?Arguments: [^\n]*\n", "", err, flags=re.S)


def logged_steps(out: Path) -> list[int]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [row["step"] for row in state["log_history"] if "loss" in row and "train_loss" not in row]


# 1. A second run into the same output folder -----------------------------------------------------------

def test_a_second_run_into_the_same_folder_is_refused_continued_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert firempo_train(out) == 0
    before = sorted(p.name for p in out.iterdir())
    assert firempo_train(out, "--max_steps", "1") == 2
    err = capsys.readouterr().err
    assert f"output_dir={out} already holds a run" in err and "--resume_from_checkpoint latest" in err
    assert "--overwrite_output_dir true" in err and no_traceback(err)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing deleted, nothing rewritten
    assert logged_steps(out) == [1, 2]

    # continued: one history, steps 1-3 (max_steps may change on resume; the log says so)
    assert firempo_train(out, "--resume_from_checkpoint", "latest", "--max_steps", "3") == 0
    err = capsys.readouterr().err
    assert "accepted changes max_steps: 2 -> 3" in err
    assert logged_steps(out) == [1, 2, 3]

    assert firempo_train(out, "--overwrite_output_dir", "true", "--max_steps", "1") == 0
    assert "removing the previous run's" in capsys.readouterr().err
    assert logged_steps(out) == [1]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


# 2. Silent mismatches: a store built by another model, a resume with another config ----------------------

def test_a_precomputed_reference_of_another_model_is_refused(tmp_path, capsys):
    store = tmp_path / "store"
    common = ["--reference_mode", "precomputed", "--precomputed_reference_dir", str(store)]
    assert firempo_train(tmp_path / "pre", *common, "--precompute_reference", seed=1) == 0
    assert firempo_train(tmp_path / "other", *common, seed=2) == 2  # the policy (and reference) of another seed
    err = capsys.readouterr().err
    assert "built from another reference model" in err and "output head weights" in err
    assert firempo_train(tmp_path / "same", *common, seed=1) == 0


def test_a_precomputed_reference_of_other_content_is_refused_at_lookup(tmp_path):
    import torch

    from firempo_kernels.integrations.batch import PreferenceCollator, PreferenceExample
    from firempo_kernels.integrations.precompute import PrecomputedReferenceStore, precompute_reference
    from firempo_kernels.integrations.smoke import tiny_model

    def example(token: int) -> PreferenceExample:
        ids = torch.tensor([1, 2, token, 3])
        labels = torch.tensor([-100, -100, token, 3])
        weights = torch.tensor([0.0, 0.0, 1.0, 0.0])
        return PreferenceExample("a", ids, labels, weights, ids.clone(), labels.clone(), weights.clone())

    collate = PreferenceCollator(0)
    model = tiny_model("llama")
    precompute_reference(model, [collate([example(5)])], tmp_path / "store", progress=False)
    store = PrecomputedReferenceStore(tmp_path / "store")
    batch = collate([example(5)])
    store.lookup(batch.example_ids, batch.content_hashes)
    changed = collate([example(6)])  # the same id, another token
    with pytest.raises(ValueError, match=r"example\(s\) \['a'\] differ from the ones the store was built from"):
        store.lookup(changed.example_ids, changed.content_hashes)


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert firempo_train(out) == 0
    assert firempo_train(out, "--resume_from_checkpoint", "latest", "--max_steps", "3", "--learning_rate", "5e-4",
                         "--beta", "0.2") == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.0001 -> 0.0005" in err and "beta: 0.1 -> 0.2" in err and "max_steps" not in err
    assert "A resumed run continues the same run" in err and no_traceback(err)
    assert logged_steps(out) == [1, 2]


# 3. Late failures: found up front instead -------------------------------------------------------------

def test_a_truncated_image_is_found_when_the_records_load(tmp_path):
    data = scan_records(tmp_path, truncated=1)
    with pytest.raises(RecordValidationError, match=r"line 2: record 'r1': `image` is not a readable image"):
        load_qa_records(data)


def test_corrupt_skips_a_truncated_image_and_writes_the_rest(tmp_path, capsys):
    data = scan_records(tmp_path, truncated=1)
    out = tmp_path / "out" / "records.jsonl"
    with pytest.warns(UserWarning, match="r1"):
        assert corrupt.main(["--data", str(data), "--out", str(out), "--image-dir", str(tmp_path / "v"),
                             "--on-error", "skip"]) == 0
    assert [r.id for r in load_qa_records(out)] == ["r0", "r2"]


def test_unwritable_outputs_are_found_before_the_work(tmp_path, capsys):
    data = scan_records(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert corrupt.main(["--data", str(data), "--out", str(blocker / "out.jsonl"),
                         "--image-dir", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "--out: cannot write into" in err and no_traceback(err)
    assert not (tmp_path / "v").exists() or not any((tmp_path / "v").iterdir())  # no image was written
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": f"r{i}", "answer": "No."}) + "\n" for i in range(3)))
    assert build_pairs.main(["--data", str(data), "--answers", str(answers), "--out", str(blocker / "p.jsonl")]) == 2
    assert "--out: cannot write into" in capsys.readouterr().err
    assert train.main(["--config", SMOKE, "--output_dir", str(blocker / "run")]) == 2
    assert "output_dir: cannot write into" in capsys.readouterr().err


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path):
    from firempo_kernels.integrations.cli import atomic_write

    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("crash")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


# 4. Clear errors ---------------------------------------------------------------------------------------

def test_encoding_problems_are_reported_by_line_and_a_bom_is_accepted(tmp_path):
    data = scan_records(tmp_path)
    lines = data.read_bytes().splitlines(keepends=True)
    latin1 = lines[1].replace(b"lesion", b"l\xe9sion")  # an editor's Latin-1 "é"
    data.write_bytes(b"\xef\xbb\xbf" + lines[0] + latin1 + lines[2])
    with pytest.raises(RecordValidationError) as info:
        load_qa_records(data)
    column = latin1.index(b"\xe9") + 1
    assert [str(p) for p in info.value.problems] == [
        f"line 2: record: not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8"]
    data.write_bytes(b"\xef\xbb\xbf" + lines[0] + lines[2])
    assert [r.id for r in load_qa_records(data)] == ["r0", "r2"]  # the BOM did not reject the first record


def test_an_empty_record_file_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no record"):
        load_qa_records(empty)
    assert corrupt.main(["--data", str(empty), "--out", str(tmp_path / "o.jsonl"), "--image-dir", str(tmp_path)]) == 2
    assert "holds no record" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


def test_answers_file_errors_cite_their_own_lines(tmp_path, capsys):
    data = scan_records(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": "r0", "answer": "No."}\n\n{"id": "r1", "answer": 3}\n{"id": "r2", "answer": "Yes.\n')
    assert build_pairs.main(["--data", str(data), "--answers", str(answers), "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "line 3: must be" in err and "line 4: not valid JSON" in err and no_traceback(err)


def test_a_missing_model_folder_is_named(tmp_path, capsys):
    data = scan_records(tmp_path)
    assert build_pairs.main(["--data", str(data), "--model", "/nonexistent", "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--model: no model folder at /nonexistent" in err and "repo id" not in err


def test_resume_passes_over_a_damaged_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert firempo_train(out) == 0
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hi')  # cut by a crash
    assert firempo_train(out, "--resume_from_checkpoint", "latest") == 0
    err = capsys.readouterr().err
    assert "passing over checkpoint-2: its trainer_state.json is unreadable" in err
    assert logged_steps(out) == [1, 2]  # step 2 was trained again from checkpoint-1


# 6. Unsafe input ---------------------------------------------------------------------------------------

def test_a_deepspeed_latest_tag_pointing_outside_the_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert firempo_train(out) == 0
    for step in (1, 2):
        (out / f"checkpoint-{step}" / "latest").write_text("../../../elsewhere")
    assert firempo_train(out, "--resume_from_checkpoint", str(out / "checkpoint-2")) == 2
    err = capsys.readouterr().err
    assert "not a folder inside the checkpoint" in err and no_traceback(err)


def test_the_project_never_unpickles_with_weights_only_false():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("firempo_kernels", "integrations", "csrc_triton", "benchmarks"):
        for source in (root / folder).rglob("*.py"):
            text = source.read_text()
            if ("torch.load(" in text and "weights_only=True" not in text) or "pickle.load" in text:
                offenders.append(str(source))
    assert not offenders


# The sweep ----------------------------------------------------------------------------------------------

def test_the_probe_sweep_finds_nothing_silent_crashing_or_lost_and_the_documented_table_is_current():
    import probe_reliability

    results = probe_reliability.run_probes()
    bad = [r for r in results if r[2] in ("silent", "crash", "data lost")]
    assert not bad
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert probe_reliability.table(results) in doc, "rerun: python tests/probe_reliability.py --write"


def test_resume_after_the_data_file_changed_under_the_same_path_is_refused(tmp_path):
    from firempo_kernels.integrations.recipe import parse_recipe
    from firempo_kernels.integrations.run_dir import check_resume, record_run, run_record

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"id": "a"}\n')
    out = tmp_path / "run"
    record = run_record(*parse_recipe(["--tiny_model", "llava", "--data_path", str(data), "--output_dir", str(out),
                                       "--bf16", "false"]))
    record_run(str(out), record)
    (out / "checkpoint-1").mkdir()
    check_resume(record, str(out), out / "checkpoint-1", print)  # unchanged: accepted
    data.write_text('{"id": "a"}\n{"id": "b"}\n')
    changed = run_record(*parse_recipe(["--tiny_model", "llava", "--data_path", str(data), "--output_dir", str(out),
                                        "--bf16", "false"]))
    with pytest.raises(ValueError, match="data_path contents: 'sha256:"):
        check_resume(changed, str(out), out / "checkpoint-1", print)

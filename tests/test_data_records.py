"""The JSONL record formats: the loader reports every bad record of a broken file at once."""

import json

import numpy as np
import pytest
from PIL import Image

from firempo_kernels.integrations.data.records import (
    PreferenceRecord,
    RecordValidationError,
    load_preference_records,
    load_qa_records,
    write_records,
)


@pytest.fixture
def folder(tmp_path):
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "scan.png")
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "small_mask.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


GOOD = {"image": "scan.png", "question": "Where?", "chosen": "in the <mask>left</mask> lung",
        "rejected": "in the <mask>right</mask> lung"}


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_every_bad_record_of_a_broken_file_is_reported(folder):
    lines = [
        {"id": "ok-1", **GOOD},
        "{not json",
        {"id": "no-image", **{**GOOD, "image": "missing.png"}},
        {"id": "unbalanced", **{**GOOD, "chosen": "in the <mask>left lung"}},
        {"id": "nested", **{**GOOD, "rejected": "<mask>in <mask>the</mask></mask> lung"}},
        {"id": "untagged", **{**GOOD, "chosen": "in the left lung", "rejected": "in the right lung"}},
        {"id": "empty", **{**GOOD, "chosen": "   "}},
        {"id": "only-tags", **{**GOOD, "chosen": "<mask></mask>"}},
        {"id": "ok-1", **GOOD},
        {"id": "bad-mask", **GOOD, "lesion_mask": "small_mask.png"},
        {"id": "bad-box", **GOOD, "lesion_bbox": [4, 4, 2, 9]},
        {"id": "box-outside", **GOOD, "lesion_bbox": [0, 0, 11, 4]},
        {"id": "unreadable", **{**GOOD, "image": "broken.png"}},
        {"id": "no-question", **{k: v for k, v in GOOD.items() if k != "question"}},
        [1, 2],
        {"id": "ok-2", **GOOD, "note": "kept"},
        "",
    ]
    path = _write(folder / "pairs.jsonl", lines)
    with pytest.raises(RecordValidationError) as info:
        load_preference_records(path)
    err = info.value
    bad_lines = sorted({p.line for p in err.problems})
    assert bad_lines == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    text = str(err)
    for needle in (
        "line 2: record: not valid JSON",
        "record 'no-image': `image` file not found",
        "record 'unbalanced': `chosen`: <mask> is never closed",
        "record 'nested': `rejected`: nested <mask>",
        "record 'untagged': no <mask>...</mask> tag in either response",
        "record 'empty': `chosen` is empty",
        "record 'only-tags': `chosen`: empty <mask></mask> span",
        "line 9: record 'ok-1': duplicate id (first on line 1)",
        "record 'bad-mask': `lesion_mask` is 6x6 but the image is 10x8",
        "record 'bad-box': `lesion_bbox` must be [x_min, y_min, x_max, y_max]",
        "record 'box-outside': `lesion_bbox` [0.0, 0.0, 11.0, 4.0] lies outside the 10x8 image",
        "record 'unreadable': `image` is not a readable image",
        "record 'no-question': missing `question`",
        "line 15: record: must be a JSON object; got list",
    ):
        assert needle in text, needle
    assert text.startswith(f"{path}: 14 bad record(s)")

    with pytest.warns(UserWarning, match="14 bad record"):
        good = load_preference_records(path, on_error="skip")
    assert [r.id for r in good] == ["ok-1", "ok-2"]
    assert good[1].extra == {"note": "kept"}
    assert good[0].image == str(folder / "scan.png")


def test_tag_on_one_side_only_is_valid(folder):
    path = _write(folder / "p.jsonl", [{"id": "a", **GOOD, "chosen": "in the left lung"}])
    (rec,) = load_preference_records(path)
    assert isinstance(rec, PreferenceRecord) and rec.chosen == "in the left lung"


def test_qa_records_and_round_trip_through_write(folder):
    raw = {
        "id": 17, "image": "scan.png", "question": "Left or right?", "ground_truth": "left",
        "answer_type": "closed", "candidates": ["left", "right"], "lesion_bbox": [1, 1, 4, 4],
    }
    bad = {"id": "c", "image": "scan.png", "question": "q", "answer_type": "closed", "candidates": ["one"]}
    path = _write(folder / "qa.jsonl", [raw, bad])
    with pytest.raises(RecordValidationError, match="closed question needs at least 2 `candidates`"):
        load_qa_records(path)
    with pytest.warns(UserWarning, match="1 bad record"):
        (rec,) = load_qa_records(path, on_error="skip")
    assert rec.id == "17" and rec.candidates == ("left", "right") and rec.lesion_bbox == (1.0, 1.0, 4.0, 4.0)
    out = folder / "sub" / "out.jsonl"
    write_records(out, [rec])
    line = json.loads(out.read_text())
    assert line["image"] == str(folder / "scan.png")  # outside the file's folder: kept absolute
    write_records(folder / "here.jsonl", [rec])
    assert json.loads((folder / "here.jsonl").read_text())["image"] == "scan.png"  # below it: relative
    (again,) = load_qa_records(out)
    assert again == rec


def test_loader_argument_errors(folder):
    with pytest.raises(FileNotFoundError, match="record file not found"):
        load_qa_records(folder / "nope.jsonl")
    with pytest.raises(ValueError, match="`on_error` must be 'raise' or 'skip'"):
        load_qa_records(_write(folder / "x.jsonl", []), on_error="ignore")

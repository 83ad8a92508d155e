"""Preference records as a Hugging Face dataset in TRL's format: columns, PIL images, failures up front."""

import json
import warnings

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from firempo_kernels.integrations.data import (  # noqa: E402
    RecordValidationError,
    load_preference_dataset,
    load_preference_records,
    preference_dataset_from_records,
    preference_features,
    preference_rows_from_records,
)

BASE = {"question": "Is the lesion in the left or the right lung?",
        "chosen": "The lesion is in the <mask>left</mask> lung",
        "rejected": "The lesion is in the <mask>right</mask> lung"}


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(tmp_path / "images" / "a.png")  # gray
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / "a_noisy.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    big = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    return tmp_path


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def _good(folder):
    return _write(folder / "pairs.jsonl", [
        {"id": "a", "image": "images/a.png", "corrupted_image": "images/a_noisy.png", **BASE},
        {"id": "b", "image": "b.png", **BASE, "question": "Where is the lesion?", "note": "extra keys ignored"},
    ])


def test_columns_types_and_images(folder):
    ds = load_preference_dataset(_good(folder))
    assert isinstance(ds, datasets.Dataset) and len(ds) == 2
    assert ds.column_names == ["id", "prompt", "chosen", "rejected", "images", "corrupted_images"]
    assert ds.features == preference_features()
    a, b = ds[0], ds[1]
    assert [a["id"], b["id"]] == ["a", "b"]
    assert a["prompt"] == BASE["question"] and b["prompt"] == "Where is the lesion?"
    assert a["chosen"] == BASE["chosen"] and a["rejected"] == BASE["rejected"]  # tags kept as written
    assert "<mask>left</mask>" in ds["chosen"][1]
    for row in (a, b):
        assert isinstance(row["images"], list) and len(row["images"]) == 1
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in row["images"])
    assert a["images"][0].size == (10, 12)
    expected = np.asarray(Image.open(folder / "images" / "a.png").convert("RGB"))
    assert np.array_equal(np.asarray(a["images"][0]), expected)  # lossless: the file's own bytes are stored
    assert len(a["corrupted_images"]) == 1 and isinstance(a["corrupted_images"][0], Image.Image)
    expected = np.asarray(Image.open(folder / "images" / "a_noisy.png"))
    assert np.array_equal(np.asarray(a["corrupted_images"][0]), expected)
    assert b["corrupted_images"] == []  # no corrupted image: an empty list (c = 0)


def test_the_dataset_no_longer_needs_the_files(folder):
    ds = load_preference_dataset(_good(folder))
    for p in (folder / "images" / "a.png", folder / "b.png"):
        p.unlink()
    assert ds[1]["images"][0].size == (8, 8)


def test_prompt_template(folder):
    ds = load_preference_dataset(_good(folder), prompt_template="USER: <image> {question} ASSISTANT:")
    assert ds[1]["prompt"] == "USER: <image> Where is the lesion? ASSISTANT:"


def test_a_truncated_image_fails_at_load_time_naming_the_record(folder):
    path = _write(folder / "pairs.jsonl", [
        {"id": "a", "image": "images/a.png", **BASE},
        {"id": "cut", "image": "truncated.png", **BASE},
        {"id": "cut-v", "image": "whole.png", "corrupted_image": "truncated.png", **BASE},
    ])
    with pytest.raises(RecordValidationError, match="line 2: record 'cut'"):
        load_preference_records(path)  # the images are decoded whole when the records load
    with pytest.raises(RecordValidationError) as info:
        load_preference_dataset(path)
    text = str(info.value)
    assert "line 2: record 'cut': `image` is not a readable image" in text
    assert "line 3: record 'cut-v': `corrupted_image` is not a readable image" in text
    assert "truncated.png" in text and text.startswith(f"{path}: 2 bad record(s)")
    assert {(p.line, p.id) for p in info.value.problems} == {(2, "cut"), (3, "cut-v")}


def test_record_and_image_problems_are_reported_together(folder):
    path = _write(folder / "pairs.jsonl", [
        {"id": "untagged", "image": "b.png", **BASE, "chosen": "left", "rejected": "right"},
        {"id": "cut", "image": "truncated.png", **BASE},
        {"id": "ok", "image": "b.png", **BASE},
    ])
    with pytest.raises(RecordValidationError) as info:
        load_preference_dataset(path)
    assert [(p.line, p.id) for p in info.value.problems] == [(1, "untagged"), (2, "cut")]


def test_skip_drops_bad_records_with_a_warning(folder):
    path = _write(folder / "pairs.jsonl", [
        {"id": "a", "image": "images/a.png", **BASE},
        {"id": "cut", "image": "truncated.png", **BASE},
        {"id": "missing", "image": "nowhere.png", **BASE},
        {"id": "b", "image": "b.png", **BASE},
    ])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_preference_dataset(path, on_error="skip")
    assert ds["id"] == ["a", "b"]
    assert len(caught) == 1  # one warning listing every bad record
    text = str(caught[0].message)
    assert "line 2: record 'cut'" in text and "line 3: record 'missing'" in text


def test_all_records_bad_is_an_error_even_when_skipping(folder):
    path = _write(folder / "pairs.jsonl", [{"id": "cut", "image": "truncated.png", **BASE}])
    with pytest.raises(RecordValidationError, match="line 1: record 'cut'"):  # nothing left to train on
        load_preference_dataset(path, on_error="skip")


def test_in_memory_records(folder):
    records = load_preference_records(_good(folder))
    rows = preference_rows_from_records(records, prompt_template="{question}!")
    assert [r["id"] for r in rows] == ["a", "b"] and rows[0]["prompt"].endswith("?!")
    assert isinstance(rows[0]["images"][0]["bytes"], bytes) and rows[1]["corrupted_images"] == []
    ds = datasets.Dataset.from_list(rows, features=preference_features())
    assert isinstance(ds[0]["corrupted_images"][0], Image.Image)
    ds2 = preference_dataset_from_records(records)
    assert ds2["id"] == ["a", "b"] and ds2[1]["corrupted_images"] == []


@pytest.mark.parametrize("kwargs, name", [
    (dict(on_error="ignore"), "`on_error`"),
    (dict(prompt_template="no field"), "`prompt_template`"),
    (dict(prompt_template="{question} {image}"), "`prompt_template`"),
    (dict(prompt_template=3), "`prompt_template`"),
])
def test_bad_arguments_are_named(folder, kwargs, name):
    with pytest.raises(ValueError, match=name):
        load_preference_dataset(_good(folder), **kwargs)


def test_bad_path(folder):
    with pytest.raises(FileNotFoundError):
        load_preference_dataset(folder / "nothing.jsonl")
    with pytest.raises(ValueError, match="`path`"):
        load_preference_dataset(None)
    with pytest.raises(ValueError, match="`records`"):
        preference_rows_from_records([{"id": "a"}])

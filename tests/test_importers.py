"""Importers: fixture folders in each release's layout (a few records, images generated) become the question
records docs/datasets.md shows; a broken release gives one error listing every problem."""

import json

import numpy as np
import pytest
from PIL import Image

from firempo_kernels.integrations.data.importers import closed_candidates, import_records, main
from firempo_kernels.integrations.data.records import RecordValidationError, load_qa_records


def _img(path, size=(12, 8), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path)


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False))


def _slake_entry(qid, img, question, answer, kind, lang="en"):
    return {"img_id": int(img[5:]), "img_name": f"{img}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Abdomen", "modality": "CT", "answer_type": kind,
            "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}


@pytest.fixture
def slake(tmp_path):
    root = tmp_path / "Slake1.0"
    # xmlab1: its segmentation has the liver (70) and a liver cancer (175) in a 2x3 block
    _img(root / "imgs/xmlab1/source.jpg")
    seg = np.zeros((8, 12), np.uint8)
    seg[:, :6] = 70
    seg[2:4, 3:6] = 175
    Image.fromarray(seg).save(root / "imgs/xmlab1/mask.png")
    _json(root / "imgs/xmlab1/detection.json", [{"Liver": [0, 0, 6, 8]}])
    # xmlab2: a chest X-ray with a nodule box only
    _img(root / "imgs/xmlab2/source.jpg")
    _json(root / "imgs/xmlab2/detection.json", [{"Nodule": [4.0, 1.0, 3.0, 2.0]}, {"Heart": [0, 0, 2, 2]}])
    # xmlab3: organs only
    _img(root / "imgs/xmlab3/source.jpg")
    Image.fromarray(np.full((8, 12), 70, np.uint8)).save(root / "imgs/xmlab3/mask.png")
    (root / "mask.txt").write_text("70:Liver\n175:Liver Cancer\n180:Heart\n")
    _json(root / "train.json", [
        _slake_entry(0, "xmlab1", "Does the liver look abnormal?", "Yes", "CLOSED"),
        _slake_entry(1, "xmlab1", "肝脏看起来异常吗?", "是", "CLOSED", lang="zh"),
        _slake_entry(2, "xmlab1", "Which is bigger in this image, liver or spleen?", "Liver", "CLOSED"),
        _slake_entry(3, "xmlab2", "What is the main organ?", "Lung", "OPEN"),
        _slake_entry(4, "xmlab3", "Which is smaller, spleen or liver?", "Spleen", "CLOSED"),
        _slake_entry(5, "xmlab3", "Is this a T1 or T2 image?", "T2", "CLOSED"),
    ])
    _json(root / "validate.json", [_slake_entry(9, "xmlab3", "Where is the liver?", "Left", "OPEN")])
    return root


def test_slake_release_imports_to_the_documented_records(slake, tmp_path):
    out = tmp_path / "data/train.jsonl"
    assert main(["slake", "--root", str(slake), "--split", "train", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["slake-0", "slake-2", "slake-3", "slake-4", "slake-5"]
    first = lines[0]
    assert first == {
        "id": "slake-0", "image": str(slake / "imgs/xmlab1/source.jpg"),
        "question": "Does the liver look abnormal?", "ground_truth": "Yes", "answer_type": "closed",
        "candidates": ["yes", "no"], "lesion_mask": "train.masks/xmlab1.png", "source": "slake",
        "source_answer_type": "CLOSED", "qid": 0, "img_id": 1, "location": "Abdomen", "modality": "CT",
        "content_type": "Organ",
    }
    # images are referenced where they lie (outside the output's folder: absolute), not copied
    assert not (tmp_path / "data/train.images").exists()
    # the closed options come from the closed answers the question names; a question naming none stays open
    assert lines[1]["candidates"] == ["Liver", "Spleen"] and lines[3]["candidates"] == ["Spleen", "Liver"]
    assert lines[4]["answer_type"] == "open" and "candidates" not in lines[4]
    # lesion masks: the segmentation's cancer block, the nodule's box; none for organs only
    mask = np.asarray(Image.open(tmp_path / "data/train.masks/xmlab1.png"))
    want = np.zeros((8, 12), np.uint8)
    want[2:4, 3:6] = 255
    np.testing.assert_array_equal(mask, want)
    assert lines[2]["lesion_mask"] == "train.masks/xmlab2.png"
    box = np.zeros((8, 12), np.uint8)
    box[1:3, 4:7] = 255
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "data/train.masks/xmlab2.png")), box)
    assert "lesion_mask" not in lines[3]
    records = load_qa_records(out)  # the project's own loader accepts them
    assert records[1].candidates == ("Liver", "Spleen")


def test_relative_root_and_out(slake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["slake", "--root", "Slake1.0", "--split", "train", "--out", "data/train.jsonl"]) == 0
    monkeypatch.chdir(slake)  # the records do not depend on the folder they were written from
    records = load_qa_records(tmp_path / "data/train.jsonl")
    assert records[0].image == str(slake / "imgs/xmlab1/source.jpg")
    assert records[0].lesion_mask == str(tmp_path / "data/train.masks/xmlab1.png")


def test_slake_options_languages_labels_copy_and_validation_file(slake, tmp_path):
    out = tmp_path / "all.jsonl"
    (slake / "imgs/xmlab3/mask.png").write_bytes(b"broken")  # not read: no lesion label has a grey value
    recs, notes = import_records("slake", slake, "train", out, languages=("en", "zh"),
                                 lesion_labels=("Nodule",), copy_images=True)
    assert [r.id for r in recs] == ["slake-0", "slake-1", "slake-2", "slake-3", "slake-4", "slake-5"]
    assert [r.lesion_mask is not None for r in recs] == [False, False, False, True, False, False]
    assert recs[0].image == str(tmp_path / "all.images/imgs/xmlab1/source.jpg")
    assert (tmp_path / "all.images/imgs/xmlab1/source.jpg").is_file()
    val, _ = import_records("slake", slake, "validation", tmp_path / "val.jsonl", lesion_labels=("Nodule",))
    assert [r.id for r in val] == ["slake-9"]


def test_slake_broken_release_lists_every_problem(slake, tmp_path):
    entries = json.loads((slake / "train.json").read_text())
    entries[0]["img_name"] = "xmlab7/source.jpg"  # no such image
    del entries[2]["answer"]
    entries[5]["answer_type"] = "MAYBE"
    entries.append("not an object")
    _json(slake / "train.json", entries)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(slake / "imgs/xmlab3/mask.png")  # wrong size
    (slake / "imgs/xmlab2/detection.json").write_text("[{\"Nodule\": [10, 1, 5, 2]}]")  # outside
    out = tmp_path / "train.jsonl"
    with pytest.raises(RecordValidationError) as info:
        import_records("slake", slake, "train", out)
    text = str(info.value)
    for needle in ("xmlab7/source.jpg", "`answer` must be a non-empty string", "MAYBE", "entry 6: must be a JSON object",
                   "3x3 but the image is 12x8", "outside the 12x8 image"):
        assert needle in text, (needle, text)
    assert not out.exists()
    assert main(["slake", "--root", str(slake), "--split", "train", "--out", str(out)]) == 2


def test_closed_candidates():
    vocab = ["Left Lung", "Right Lung", "Left", "Right", "Lung", "Yes"]
    assert closed_candidates("Is it the left lung or the right lung?", "Left Lung", vocab) == ["Left Lung", "Right Lung"]
    assert closed_candidates("Is it on the left or right?", "Left", vocab) == ["Left", "Right"]
    assert closed_candidates("Is it normal?", "no", vocab) == ["yes", "no"]
    assert closed_candidates("Which organ?", "Liver", vocab) == ["Liver"]


def test_vqa_rad_public_release_and_split_pair(tmp_path):
    root = tmp_path / "VQA_RAD"
    _img(root / "VQA_RAD Image Folder/synpic1.jpg")
    _img(root / "VQA_RAD Image Folder/synpic2.jpg")

    def q(qid, img, question, answer, kind, phrase):
        return {"qid": qid, "phrase_type": phrase, "qid_linked_id": "x", "image_case_url": "u", "image_name": img,
                "image_organ": "CHEST", "evaluation": "given", "question": question, "question_rephrase": "NULL",
                "question_relation": "NULL", "question_frame": "NULL", "question_type": "PRES",
                "answer": answer, "answer_type": kind}

    _json(root / "VQA_RAD Dataset Public.json", [
        q(1, "synpic1.jpg", "Is there a pneumothorax?", "no", "CLOSED", "freeform"),
        q(2, "synpic1.jpg", "Is there a pneumothorax?", "No", "CLOSED", "para"),  # a repeat
        q(3, "synpic2.jpg", "How many ribs are fractured?", 2, "OPEN", "freeform"),
        q(4, "synpic2.jpg", "Is the mass on the left or right?", "right", "CLOSED", "test_freeform"),
        q(5, "synpic2.jpg", "Is it on the left?", "left", "CLOSED", "test_para"),
    ])
    recs, notes = import_records("vqa-rad", root, "train", tmp_path / "train.jsonl")
    assert [(r.id, r.ground_truth, r.answer_type, r.candidates) for r in recs] == [
        ("vqa-rad-1", "no", "closed", ("yes", "no")), ("vqa-rad-3", "2", "open", ())]
    assert notes["repeated (image, question, answer) triples left out"] == 1
    assert recs[0].image == str(root / "VQA_RAD Image Folder/synpic1.jpg") and recs[0].lesion_mask is None
    test, _ = import_records("vqa-rad", root, "test", tmp_path / "test.jsonl")
    assert [(r.id, r.answer_type, r.candidates) for r in test] == [
        ("vqa-rad-4", "closed", ("right", "left")), ("vqa-rad-5", "open", ())]
    both, _ = import_records("vqa-rad", root, "train", tmp_path / "dup.jsonl", keep_duplicates=True)
    assert len(both) == 3
    # the trainset.json / testset.json pair with images/
    other = tmp_path / "data_RAD"
    _img(other / "images/synpic9.jpg")
    _json(other / "testset.json", [{"qid": 7, "image_name": "synpic9.jpg", "image_organ": "HEAD",
                                     "answer": "yes", "answer_type": "CLOSED", "question_type": "PRES",
                                     "question": "Is there a bleed?", "phrase_type": "test_freeform"}])
    (rec,), _ = import_records("vqa-rad", other, "test", tmp_path / "t2.jsonl")
    assert rec.image == str(other / "images/synpic9.jpg") and rec.candidates == ("yes", "no")


def test_vqa_rad_missing_images_listed_at_once(tmp_path):
    root = tmp_path / "VQA_RAD"
    (root / "images").mkdir(parents=True)
    _json(root / "trainset.json", [
        {"qid": i, "image_name": f"synpic{i}.jpg", "question": "Is it normal?", "answer": "yes",
         "answer_type": "CLOSED"} for i in range(3)])
    with pytest.raises(RecordValidationError) as info:
        import_records("vqa-rad", root, "train", tmp_path / "train.jsonl")
    assert [p.id for p in info.value.problems] == ["vqa-rad-0", "vqa-rad-1", "vqa-rad-2"]


def test_iu_xray_annotation(tmp_path):
    root = tmp_path / "iu_xray"
    for study in ("CXR1_1_IM-0001", "CXR2_IM-0652"):
        _img(root / f"images/{study}/0.png")
        _img(root / f"images/{study}/1.png")
    study = lambda i, s, r: {"id": i, "report": r, "image_path": [f"{i}/0.png", f"{i}/1.png"], "split": s}  # noqa: E731
    _json(root / "annotation.json", {
        "train": [study("CXR1_1_IM-0001", "train", "The heart is normal. No effusion.")],
        "val": [], "test": [study("CXR2_IM-0652", "test", "Mild cardiomegaly.")]})
    out = tmp_path / "iu/test.jsonl"
    assert main(["iu-xray", "--root", str(root), "--split", "test", "--out", str(out)]) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line == {
        "id": "iu-xray-CXR2_IM-0652", "image": str(root / "images/CXR2_IM-0652/0.png"),
        "question": "Describe the findings of this chest X-ray.", "ground_truth": "Mild cardiomegaly.",
        "answer_type": "open", "task": "report", "source": "iu-xray",
        "views": [str(root / "images/CXR2_IM-0652/0.png"), str(root / "images/CXR2_IM-0652/1.png")],
    }
    (root / "images/CXR2_IM-0652/1.png").unlink()
    with pytest.raises(RecordValidationError, match="view file"):
        import_records("iu-xray", root, "test", out)
    with pytest.raises(ValueError, match="splits"):
        import_records("iu-xray", root, "dev", out)


def test_parquet_copy_read_with_datasets(tmp_path):
    import io

    import datasets

    def png(v):
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4), v, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    root = tmp_path / "SLAKE-vqa-english"
    (root / "data").mkdir(parents=True)
    feats = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                               "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": png(1), "path": None}, {"bytes": png(1), "path": None}, {"bytes": png(2), "path": None}],
        "question": ["Is the lung healthy?", "What organ is this?", "Which is bigger, liver or heart?"],
        "answer": ["Yes", "Lung", "Liver"]}, features=feats)
    ds.to_parquet(str(root / "data/test-00000-of-00001.parquet"))
    recs, _ = import_records("slake", root, "test", tmp_path / "out/test.jsonl")
    assert [(r.id, r.answer_type, r.candidates) for r in recs] == [
        ("slake-test-00000", "closed", ("yes", "no")), ("slake-test-00001", "open", ()),
        ("slake-test-00002", "open", ())]
    assert recs[0].image == recs[1].image == str(tmp_path / "out/test.images/slake-test-00000.png")
    assert np.asarray(Image.open(recs[2].image)).max() == 2
    with pytest.raises(FileNotFoundError, match="split 'train'"):
        import_records("slake", root, "train", tmp_path / "out/train.jsonl")

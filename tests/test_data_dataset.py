"""Records to trainer batches: prompt + response rows, labels on the response only, weights on the spans."""

import pytest
import torch

from firempo_kernels.integrations.batch import PreferenceCollator
from firempo_kernels.integrations.data.corrupt import corrupt_records
from firempo_kernels.integrations.data.dataset import PreferenceDataset, PromptEncoder
from firempo_kernels.integrations.data.diff import tag_differences
from firempo_kernels.integrations.data.embedded import build_processor
from firempo_kernels.integrations.data.records import RecordValidationError, as_preference, load_qa_records
from firempo_kernels.integrations.data.synthetic import make_synthetic_vqa


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    records = load_qa_records(make_synthetic_vqa(folder, num_images=3, lesion_rate=1.0, seed=4))
    pairs = []
    for rec in records:
        tagged = tag_differences(rec.ground_truth, rec.wrong_answers[0])
        pairs.append(as_preference(rec, tagged.first, tagged.second))
    return folder, pairs, build_processor()


def test_examples_collate_into_a_valid_batch(setup):
    folder, pairs, processor = setup
    pairs = corrupt_records(pairs[:3], folder / "corrupted") + pairs[3:6]
    ds = PreferenceDataset(pairs, processor)
    tok = processor.tokenizer
    ex = ds[0]
    ex.validate()
    prompt_len = int((ex.chosen_labels == -100).sum())
    prompt = ex.chosen_input_ids[:prompt_len]
    assert int((prompt == tok.convert_tokens_to_ids("<image>")).sum()) == 16  # 32x32 image, 8x8 patches
    assert torch.equal(prompt, ex.rejected_input_ids[:prompt_len])
    response = ex.chosen_input_ids[prompt_len:]
    assert tok.decode(response[:-1]) == pairs[0].chosen.replace("<mask>", "").replace("</mask>", "")
    assert response[-1] == tok.eos_token_id
    weighted = ex.chosen_input_ids[ex.chosen_span_weights > 0]
    assert tok.decode(weighted) == ("left" if "left</mask>" in pairs[0].chosen else "right")
    assert ex.corrupted_images["pixel_values"].shape == ex.images["pixel_values"].shape == (1, 3, 32, 32)
    assert not torch.equal(ex.corrupted_images["pixel_values"], ex.images["pixel_values"])

    batch = PreferenceCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    batch.validate()
    assert batch.has_corrupted_image.tolist() == [True] * 3 + [False] * 3
    assert batch.example_ids == tuple(p.id for p in pairs)
    assert torch.equal(PreferenceDataset(pairs, processor, use_corrupted=False)[0].images["pixel_values"],
                       ex.images["pixel_values"])


def test_untokenisable_records_are_all_reported_up_front(setup):
    _, pairs, processor = setup
    broken = [
        as_preference(pairs[0], "The lesion is in the <mask>lef</mask>t lung", pairs[0].rejected),
        pairs[1],
        as_preference(pairs[2], pairs[2].chosen, "The lesion is <mask>sma</mask>ll"),
    ]
    with pytest.raises(RecordValidationError) as info:
        PreferenceDataset(broken, processor)
    assert [p.id for p in info.value.problems] == [pairs[0].id, pairs[2].id]
    assert "chosen: phrase 'lef'" in str(info.value) and "rejected: phrase 'sma'" in str(info.value)
    with pytest.warns(UserWarning, match="2 bad record"):
        ds = PreferenceDataset(broken, processor, on_error="skip")
    assert [r.id for r in ds.records] == [pairs[1].id]


def test_prompt_encoder_template_and_errors(setup):
    _, _, processor = setup
    enc = PromptEncoder(processor, prompt_template="USER: {image} {question} ASSISTANT:")
    assert enc.text("Where is the lesion?") == PromptEncoder(processor).text("Where is the lesion?")
    with pytest.raises(ValueError, match="must be a str containing '\\{question\\}'"):
        PromptEncoder(processor, prompt_template="no placeholder")
    with pytest.raises(ValueError, match="`on_error` must be 'raise' or 'skip'"):
        PreferenceDataset([], processor, on_error="drop")

"""The collated batch format: padding, row order, v' filling, and the errors a malformed record raises."""

import pytest
import torch

from firempo_kernels.integrations.batch import PreferenceBatch, PreferenceCollator, PreferenceExample

PAD = 0


def make_example(example_id, prompt_len, chosen_len, rejected_len, *, corrupted=True, vocab=50):
    def row(resp_len):
        ids = torch.randint(1, vocab, (prompt_len + resp_len,))
        labels = ids.clone()
        labels[:prompt_len] = -100
        weights = torch.zeros(prompt_len + resp_len)
        weights[prompt_len + 1 : prompt_len + resp_len] = torch.rand(resp_len - 1) + 0.5
        return ids, labels, weights

    c, r = row(chosen_len), row(rejected_len)
    image = {"pixel_values": torch.randn(1, 3, 4, 4), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    corrupted_image = {k: v + 1 for k, v in image.items()} if corrupted else None
    return PreferenceExample(example_id, *c, *r, images=image, corrupted_images=corrupted_image)


def test_collate_pads_right_and_puts_chosen_rows_first():
    examples = [make_example("a", 3, 4, 6), make_example("b", 5, 2, 3, corrupted=False)]
    batch = PreferenceCollator(PAD, pad_to_multiple_of=4)(examples)
    batch.validate()
    assert batch.example_ids == ("a", "b") and batch.num_examples == 2
    assert batch.input_ids.shape == (4, 12)  # longest row is 3 + 6 = 9, rounded up to 12
    order = [
        examples[0].chosen_input_ids, examples[1].chosen_input_ids,
        examples[0].rejected_input_ids, examples[1].rejected_input_ids,
    ]
    for r, ids in enumerate(order):
        t = ids.shape[0]
        assert torch.equal(batch.input_ids[r, :t], ids)
        assert torch.all(batch.input_ids[r, t:] == PAD)
        assert torch.all(batch.attention_mask[r, :t] == 1) and torch.all(batch.attention_mask[r, t:] == 0)
        assert torch.all(batch.labels[r, t:] == -100) and torch.all(batch.span_weights[r, t:] == 0)
    # v' missing for example b: its slot holds the clean image, flagged c = 0.
    assert torch.equal(batch.has_corrupted_image, torch.tensor([True, False]))
    assert torch.equal(batch.corrupted_images["pixel_values"][0], examples[0].corrupted_images["pixel_values"][0])
    assert torch.equal(batch.corrupted_images["pixel_values"][1], examples[1].images["pixel_values"][0])
    assert batch.images["image_grid_thw"].shape == (2, 3)


def test_collate_without_any_corrupted_image_has_no_corrupted_block():
    batch = PreferenceCollator(PAD)([make_example("a", 2, 3, 3, corrupted=False)])
    batch.validate()
    assert batch.corrupted_images is None and batch.has_corrupted_image is None


def test_to_moves_every_tensor():
    batch = PreferenceCollator(PAD)([make_example("a", 2, 3, 3)]).to("cpu")
    assert isinstance(batch, PreferenceBatch) and batch.images["pixel_values"].device.type == "cpu"


def test_shifted_labels_are_rejected():
    ex = make_example("a", 2, 4, 4)
    ex.chosen_labels = torch.roll(ex.chosen_labels, -1)
    with pytest.raises(ValueError, match="NOT shifted"):
        PreferenceCollator(PAD)([ex])


def test_span_weight_on_an_ignored_label_is_rejected():
    ex = make_example("a", 2, 4, 4)
    ex.rejected_span_weights[0] = 1.0
    with pytest.raises(ValueError, match="rejected_span_weights.*ignore_index"):
        PreferenceCollator(PAD)([ex])


def test_negative_span_weight_is_rejected():
    ex = make_example("a", 2, 4, 4)
    ex.chosen_span_weights[-1] = -0.5
    with pytest.raises(ValueError, match="chosen_span_weights.*>= 0"):
        PreferenceCollator(PAD)([ex])


def test_corrupted_image_of_another_shape_is_rejected():
    ex = make_example("a", 2, 4, 4)
    ex.corrupted_images["pixel_values"] = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="corrupted_images\\['pixel_values'\\]"):
        PreferenceCollator(PAD)([ex])


def test_duplicate_ids_and_empty_batches_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        PreferenceCollator(PAD)([make_example("a", 2, 3, 3), make_example("a", 2, 3, 3)])
    with pytest.raises(ValueError, match="at least one"):
        PreferenceCollator(PAD)([])
    with pytest.raises(TypeError, match="pad_token_id"):
        PreferenceCollator(None)


def test_batch_validate_catches_left_padding_and_row_count():
    batch = PreferenceCollator(PAD)([make_example("a", 2, 3, 5)])
    left = PreferenceBatch(**{**batch.__dict__, "attention_mask": batch.attention_mask.flip(1)})
    with pytest.raises(ValueError, match="right-padded"):
        left.validate()
    short = PreferenceBatch(**{**batch.__dict__, "example_ids": ("a", "b")})
    with pytest.raises(ValueError, match=r"\[2B, T\] with B=2"):
        short.validate()


def test_prompt_lengths_are_where_each_rows_labels_begin():
    examples = [make_example("a", 3, 4, 6), make_example("b", 5, 2, 3)]
    batch = PreferenceCollator(PAD)(examples)
    batch.validate()
    assert batch.prompt_lengths.tolist() == [3, 5, 3, 5]  # chosen rows, then rejected rows
    assert torch.equal(batch.to("cpu").prompt_lengths, batch.prompt_lengths)
    for bad, match in ((torch.tensor([3, 5, 3]), "shape"), (torch.tensor([3.0, 5, 3, 5]), "int64"),
                       (torch.tensor([3, 50, 3, 5]), "between 0")):
        with pytest.raises(ValueError, match=match):
            PreferenceBatch(**{**batch.__dict__, "prompt_lengths": bad}).validate()


def test_image_stacks_of_different_sizes_are_zero_padded_to_the_largest():
    """Anyres tiles, split images, pixel masks: each example's stack padded at the end of every dimension."""
    small, large = make_example("a", 3, 4, 6), make_example("b", 5, 2, 3)
    small.images = {"pixel_values": torch.randn(1, 2, 3, 4, 4), "pixel_attention_mask": torch.ones(1, 2, 4, 4)}
    large.images = {"pixel_values": torch.randn(1, 3, 3, 4, 6), "pixel_attention_mask": torch.ones(1, 3, 4, 6)}
    small.corrupted_images = large.corrupted_images = None
    batch = PreferenceCollator(PAD)([small, large])
    pixels, mask = batch.images["pixel_values"], batch.images["pixel_attention_mask"]
    assert pixels.shape == (2, 3, 3, 4, 6) and mask.shape == (2, 3, 4, 6)
    assert torch.equal(pixels[0, :2, :, :, :4], small.images["pixel_values"][0])
    assert pixels[0, 2].abs().sum() == 0 and pixels[0, :, :, :, 4:].abs().sum() == 0
    assert torch.equal(pixels[1], large.images["pixel_values"][0])
    assert mask[0].sum() == 2 * 4 * 4  # padding is masked out
    large.images = {"pixel_values": torch.randn(1, 3, 4, 6), "pixel_attention_mask": torch.ones(1, 3, 4, 6)}
    with pytest.raises(ValueError, match="number of dimensions"):
        PreferenceCollator(PAD)([small, large])

"""Tiny processors: real transformers processors whose output a tiny model of the same family takes as is."""

import pickle

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from firempo_kernels.integrations import smoke  # noqa: E402
from firempo_kernels.integrations.models import get_adapter  # noqa: E402
from firempo_kernels.integrations.smoke import TINY_WORDS, tiny_config, tiny_model, tiny_processor  # noqa: E402

VISION = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PLACEHOLDER = {"llava": "<image>"}  # Qwen-VL: below
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_TOKENS = 4  # 16 x 16 pixels: 2 x 2 patches of 8 (Llava), 4 x 4 patches of 4 merged 2 x 2 (Qwen-VL)


def _image(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _forward(family, model, batch):
    inputs = dict(batch)
    if "mm_token_type_ids" not in inputs:  # what the adapter would add (Qwen-VL: M-RoPE positions)
        inputs.update(get_adapter(model).extra_inputs(model, inputs["input_ids"]))
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(params=VISION)
def family(request):
    if request.param == "qwen3_vl":
        import transformers

        if not hasattr(transformers, "Qwen3VLProcessor"):
            pytest.skip("this transformers release has no Qwen3-VL")
    return request.param


def test_tokenizer_layout_matches_tiny_config(family):
    proc = tiny_processor(family)
    tok = proc.tokenizer
    config = tiny_config(family)
    assert len(tok) == config.get_text_config().vocab_size == 128
    assert tok.pad_token_id == 0 and tok.eos_token_id is not None
    assert tok.convert_tokens_to_ids(proc.image_token) == config.image_token_id == 127
    if family != "llava":
        assert tok.convert_tokens_to_ids("<|video_pad|>") == config.video_token_id == 126
        assert tok.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id == 125
        assert tok.convert_tokens_to_ids("<|vision_end|>") == config.vision_end_token_id == 124
    # the synthetic medical set's words and the chat words are all known
    from firempo_kernels.integrations.data.synthetic import vocabulary

    text = " ".join(vocabulary()) + " USER : ASSISTANT 0 7 x"
    assert tok.unk_token_id not in tok(text)["input_ids"]
    words = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert words == text.split()


def test_one_image_gives_the_tiny_models_input_and_finite_logits(family, one_thread):
    proc = tiny_processor(family)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the lesion?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert PLACEHOLDER.get(family, QWEN_PLACEHOLDER) in prompt
    batch = proc(text=[prompt], images=[[_image(16, 16, 0)]], return_tensors="pt")
    model = tiny_model(family)
    ids = batch["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == IMAGE_TOKENS
    assert proc.tokenizer.unk_token_id not in ids.tolist()[0]
    if family == "llava":
        assert tuple(batch["pixel_values"].shape) == (1, 3, 16, 16)
    else:
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
        assert tuple(batch["pixel_values"].shape) == (16, 3 * 2 * 4 * 4)
        # the processor's mm_token_type_ids are those the adapter derives from the ids
        expected = get_adapter(model).extra_inputs(model, ids)["mm_token_type_ids"]
        assert torch.equal(batch["mm_token_type_ids"].to(expected.dtype), expected)
    logits = _forward(family, model, batch)
    assert logits.shape == (1, ids.shape[1], 128)
    assert torch.isfinite(logits).all()


def test_two_images_of_different_sizes_in_one_batch(family, one_thread):
    proc = tiny_processor(family)
    placeholder = PLACEHOLDER.get(family, QWEN_PLACEHOLDER)
    texts = [f"USER: {placeholder} Is the lesion large or small? ASSISTANT:", f"USER: {placeholder} What color is it?"]
    images = [[_image(40, 23, 1)], [_image(9, 31, 2).convert("L")]]  # any size, aspect ratio or mode
    batch = proc(text=texts, images=images, return_tensors="pt", padding=True)
    model = tiny_model(family)
    ids = batch["input_ids"]
    assert (ids == model.config.image_token_id).sum(1).tolist() == [IMAGE_TOKENS, IMAGE_TOKENS]
    if family == "llava":
        assert tuple(batch["pixel_values"].shape) == (2, 3, 16, 16)
    else:
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    logits = _forward(family, model, batch)
    assert logits.shape == (2, ids.shape[1], 128)
    assert torch.isfinite(logits).all()


def test_processor_pickles_and_saves(family, tmp_path):
    proc = tiny_processor(family)
    again = pickle.loads(pickle.dumps(proc))
    assert type(again) is type(proc)
    text = f"{PLACEHOLDER.get(family, QWEN_PLACEHOLDER)} the scan"
    a = proc(text=[text], images=[[_image(16, 16, 3)]], return_tensors="pt")
    b = again(text=[text], images=[[_image(16, 16, 3)]], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()


def test_llama_gets_a_tokenizer_with_a_chat_template():
    tok = tiny_processor("llama")
    assert not hasattr(tok, "image_processor") and len(tok) == 128
    text = tok.apply_chat_template([{"role": "user", "content": "Where is the lesion?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "USER: Where is the lesion? ASSISTANT:"
    assert tok.unk_token_id not in tok(text)["input_ids"]


def test_smaller_vocabularies_keep_the_layout():
    proc = tiny_processor("qwen2_vl", vocab_size=40)
    tok = proc.tokenizer
    assert len(tok) == 40 and tok.convert_tokens_to_ids("<|image_pad|>") == 39
    assert tok.convert_tokens_to_ids("<|vision_end|>") == 36
    # words fill the ids below the 8 reserved top ones, in TINY_WORDS order
    assert tok.convert_ids_to_tokens(list(range(3, 32))) == list(TINY_WORDS[:29])


@pytest.mark.parametrize("bad", [dict(family="gpt2"), dict(family="llava", vocab_size=8),
                                 dict(family="llava", vocab_size=64.0)])
def test_bad_arguments_are_named(bad):
    bad = dict(bad)
    family = bad.pop("family")
    with pytest.raises(ValueError, match="`family`" if family == "gpt2" else "`vocab_size`"):
        tiny_processor(family, **bad)


def test_words_are_documented_and_unique():
    assert len(set(TINY_WORDS)) == len(TINY_WORDS) <= 128 - 8 - 3
    assert all(w and not any(c.isspace() for c in w) for w in TINY_WORDS)
    assert smoke.tiny_processor.__doc__ and "TINY_WORDS" in smoke.tiny_processor.__doc__


def test_the_projects_preference_dataset_takes_a_tiny_processor(family, tmp_path, one_thread):
    from firempo_kernels.integrations.data import PreferenceDataset, PreferenceRecord

    _image(24, 20, 4).save(tmp_path / "scan.png")
    _image(24, 20, 5).save(tmp_path / "noisy.png")
    record = PreferenceRecord(
        id="r0", image=str(tmp_path / "scan.png"), corrupted_image=str(tmp_path / "noisy.png"),
        question="Is the lesion in the left or the right lung?",
        chosen="The lesion is in the <mask>left</mask> lung", rejected="The lesion is in the <mask>right</mask> lung",
    )
    proc = tiny_processor(family)
    example = PreferenceDataset([record], proc)[0]  # the chat template path of PromptEncoder
    model = tiny_model(family)
    ids = example.chosen_input_ids
    assert int((ids == model.config.image_token_id).sum()) == IMAGE_TOKENS
    assert proc.tokenizer.unk_token_id not in ids.tolist()
    assert ids[-1] == proc.tokenizer.eos_token_id
    weighted = proc.tokenizer.convert_ids_to_tokens(ids[example.chosen_span_weights > 0])
    assert weighted == ["left"]
    assert example.corrupted_images is not None
    batch = {"input_ids": ids[None], **example.images}
    logits = _forward(family, model, batch)
    assert torch.isfinite(logits).all()


# The families served through ImageTextAdapter: each tiny processor is the family's own class (or, where the
# stock class holds a video processor, which needs torchvision, an images-only subclass of it; Mistral 3's
# PixtralProcessor cannot be imported without torchvision: a class of its own, None here).
IMAGE_PLACEHOLDER = {"gemma3": "<image_soft_token>", "gemma4": "<|image|>", "paligemma": "<image>",
                     "paligemma2": "<image>", "llava_next": "<image>", "llava_onevision": "<image>",
                     "idefics3": "<image>", "qwen3_5": "<|image_pad|>", "internvl": "<IMG_CONTEXT>",
                     "mistral3": "[IMG]", "smolvlm": "<image>"}
STOCK_CLASS = {"gemma3": "Gemma3Processor", "gemma4": "Gemma4Processor", "paligemma": "PaliGemmaProcessor",
               "paligemma2": "PaliGemmaProcessor", "llava_next": "LlavaNextProcessor",
               "llava_onevision": "LlavaOnevisionProcessor", "idefics3": "Idefics3Processor",
               "qwen3_5": "Qwen3VLProcessor", "internvl": "InternVLProcessor", "mistral3": None,
               "smolvlm": "SmolVLMProcessor"}
RELOADS = ("gemma3", "paligemma", "paligemma2", "llava_next", "idefics3")


@pytest.mark.parametrize("family", sorted(IMAGE_PLACEHOLDER))
def test_the_other_families_processors(family, tmp_path, one_thread):
    import transformers

    proc = tiny_processor(family)
    if STOCK_CLASS[family] is None:
        assert type(proc).__name__ == "TinyPixtralProcessor"
    else:
        assert isinstance(proc, getattr(transformers, STOCK_CLASS[family]))
        assert (type(proc).__name__ == STOCK_CLASS[family]) == (family in RELOADS)
    tok, config = proc.tokenizer, tiny_config(family)
    assert tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER[family]) == config.image_token_id == 127
    from firempo_kernels.integrations.data.synthetic import vocabulary

    text = " ".join(vocabulary())
    assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the lesion?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    out = proc(text=[prompt], images=[[_image(24, 16, 4)]], return_tensors="pt")
    ids = out["input_ids"]
    assert int((ids == config.image_token_id).sum()) > 0 and int(ids.max()) < 128
    again = pickle.loads(pickle.dumps(proc))
    assert torch.equal(again(text=[prompt], images=[[_image(24, 16, 4)]], return_tensors="pt")["input_ids"], ids)
    if family in RELOADS:  # a saved folder is a user's checkpoint: AutoProcessor gives the same processor back
        proc.save_pretrained(tmp_path)
        loaded = transformers.AutoProcessor.from_pretrained(tmp_path)
        assert type(loaded) is type(proc)
        back = loaded(text=[prompt], images=[[_image(24, 16, 4)]], return_tensors="pt")
        assert back.keys() == out.keys() and all(torch.equal(back[k], out[k]) for k in out)


def test_the_mistral3_prompt_is_pixtrals_layout(one_thread):
    """Pixtral's layout, written here from its description: an image resized to H x W pixels (at most 32 a
    side, multiples of 8: 4-pixel patches merged 2 x 2) is H / 8 rows of W / 8 [IMG] tokens, each row closed
    by [IMG_BREAK], the last by [IMG_END]; pixel_values hold the resized image, image_sizes its size."""
    proc = tiny_processor("mistral3")
    tok = proc.tokenizer
    img, brk, end = (tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
    assert (img, brk, end) == (127, 125, 124)  # tiny_config's image id; the others are ordinary tokens
    seen = set()
    for width, height in ((16, 16), (32, 16), (16, 32), (40, 24), (8, 8)):
        out = proc(text=["[IMG] Where"], images=[[_image(width, height, 5)]], return_tensors="pt")
        rows, cols = (int(x) // 8 for x in out["image_sizes"][0])
        assert 8 * max(rows, cols) <= 32 and out["pixel_values"].shape[-2:] == (8 * rows, 8 * cols)
        expected = ([img] * cols + [brk]) * rows
        expected[-1] = end
        assert out["input_ids"][0].tolist() == expected + [tok.convert_tokens_to_ids("Where")]
        seen.add((rows, cols))
    assert {(2, 2), (2, 4), (4, 2), (1, 1)} <= seen


def test_one_word_tokenizer_and_chat_template_serve_the_embedded_model_and_the_tiny_ones():
    from firempo_kernels.integrations.data.embedded import CHAT_TEMPLATE, build_word_tokenizer, word_tokenizer

    assert tiny_processor("llava").chat_template == build_word_tokenizer().chat_template == CHAT_TEMPLATE
    tok = tiny_processor("llama")
    messages = [{"role": "user", "content": "Is it large?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "yes"}]}]
    assert tok.apply_chat_template(messages, tokenize=False) == "USER: Is it large? ASSISTANT: yes "
    with pytest.raises(ValueError, match="must not repeat"):
        word_tokenizer(["<pad>", "<unk>", "</s>", "a", "a"], pad="<pad>", unk="<unk>", eos="</s>")
    with pytest.raises(ValueError, match=r"\['<s>'\] must be in `tokens`"):
        word_tokenizer(["<pad>", "<unk>", "</s>"], pad="<pad>", unk="<unk>", eos="</s>", bos="<s>")
    # punctuation runs: one token by default, one a mark when split (what <mask> tags need)
    both = ["<pad>", "<unk>", "</s>", "<", "/", "</", "a"]
    assert word_tokenizer(both, pad="<pad>", unk="<unk>", eos="</s>")("</a", add_special_tokens=False)[
        "input_ids"] == [5, 6]
    assert word_tokenizer(both, pad="<pad>", unk="<unk>", eos="</s>", split_punctuation=True)(
        "</a", add_special_tokens=False)["input_ids"] == [3, 4, 6]

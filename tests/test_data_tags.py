"""Tag parsing and span-weight alignment across tokenizer behaviours, all built offline."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from firempo_kernels.integrations.data.embedded import build_word_tokenizer
from firempo_kernels.integrations.data.tags import (
    SpanAlignmentError,
    TagError,
    encode_response,
    insert_tags,
    parse_tags,
)

WORDS = (
    "the lesion is in left right upper lower lung there no a small large nodule opacity mass "
    "consolidation effusion pleural bilateral hilar lobe of and with without"
).split()
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) + " ." for i in range(len(WORDS))] * 4 + [" ".join(WORDS).title()]


def _fast(core: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _bpe(pre, decoder, vocab_size: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre
    core.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    core.train_from_iterator(CORPUS + ["<mask> </mask> ward ward"], trainer)
    return _fast(core)


def word_level_with_special_tags():
    """Tags are special tokens of the tokenizer: they would be kept whole if it ever saw them."""
    tok = build_word_tokenizer(WORDS + [w.capitalize() for w in WORDS] + ["ward", "."])
    tok.add_special_tokens({"additional_special_tokens": ["<mask>", "</mask>"]})
    return tok


def byte_level_leading_space(trim_offsets: bool):
    """GPT-2 style: words carry their leading space (``Ġleft``); offsets either include it or not."""
    tok = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets), decoders.ByteLevel(), 400)
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    return tok


def metaspace_subwords():
    """SentencePiece style (``▁left``) with few merges: words split into several pieces, ``<`` ``mask`` ``>``."""
    return _bpe(pre_tokenizers.Metaspace(prepend_scheme="always"), decoders.Metaspace(prepend_scheme="always"), 60)


def lowercasing_whitespace_bpe():
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<unk>", "</s>"], show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    return _fast(core)


TOKENIZERS = {
    "word-level, tags special": word_level_with_special_tags,
    "byte-level, space in offsets": lambda: byte_level_leading_space(False),
    "byte-level, trimmed offsets": lambda: byte_level_leading_space(True),
    "metaspace, subword pieces": metaspace_subwords,
    "lowercasing bpe": lowercasing_whitespace_bpe,
}


@pytest.fixture(params=list(TOKENIZERS), scope="module")
def tokenizer(request):
    return TOKENIZERS[request.param]()


def _random_tagged(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    out, i = [], 0
    while i < len(words):
        if rng.random() < 0.3:
            j = min(len(words), i + rng.randint(1, 3))
            out.append("<mask>" + " ".join(words[i:j]) + "</mask>")
            i = j
        else:
            out.append(words[i])
            i += 1
    text = " ".join(out)
    return text + (" ." if rng.random() < 0.3 else "")


def test_parse_tags_positions_and_round_trip():
    t = parse_tags("The lesion is in the <mask>left</mask> lung, <mask> upper lobe </mask>.")
    assert t.text == "The lesion is in the left lung,  upper lobe ."
    assert t.phrases == ("left", "upper lobe")
    assert t.tagged() == "The lesion is in the <mask>left</mask> lung,  <mask>upper lobe</mask> ."
    assert parse_tags("no tags at all").spans == ()
    assert insert_tags("abc def", [(0, 3), (4, 7)]) == "<mask>abc</mask> <mask>def</mask>"


@pytest.mark.parametrize(
    "bad, what",
    [
        ("a <mask>b <mask>c</mask></mask>", "nested"),
        ("a </mask>b", "without an opening"),
        ("a <mask>b", "never closed"),
        ("a <mask>  </mask> b", "empty"),
    ],
)
def test_parse_tags_rejects_bad_tags(bad, what):
    with pytest.raises(TagError, match=what):
        parse_tags(bad, where="record 'r1', chosen")
    with pytest.raises(TagError, match="record 'r1', chosen"):
        parse_tags(bad, where="record 'r1', chosen")


def test_parse_tags_type_error():
    with pytest.raises(TypeError, match="`tagged` must be a str"):
        parse_tags(None)


def test_round_trip_on_random_responses(tokenizer):
    rng = random.Random(7)
    for _ in range(60):
        tagged = _random_tagged(rng)
        parsed = parse_tags(tagged)
        enc = encode_response(tokenizer, tagged)
        # the ids are those of the untagged text: the tags never reach the tokenizer
        assert list(enc.input_ids) == tokenizer(parsed.text, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        assert len(enc.span_weights) == len(enc.input_ids) and enc.span_weights[-1] == 0.0
        # the weighted tokens are exactly the tagged phrases (adjacent phrases merge into one run)
        assert enc.tagged() == _merge_adjacent(parsed)
        weighted = [i for i, w in zip(enc.input_ids, enc.span_weights) if w]
        decoded = tokenizer.decode(weighted).replace(" ", "").lower()
        assert decoded == "".join(parsed.phrases).replace(" ", "").lower()


def _merge_adjacent(parsed):
    spans = []
    for a, b in parsed.spans:
        if spans and not parsed.text[spans[-1][1] : a].strip():
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return insert_tags(parsed.text, spans)


def test_tags_split_into_pieces_by_the_tokenizer_are_still_removed():
    tok = metaspace_subwords()
    assert len(tok("<mask>", add_special_tokens=False)["input_ids"]) > 1  # the tag itself would be several pieces
    enc = encode_response(tok, "in the <mask>left</mask> lung")
    assert list(enc.input_ids[:-1]) == tok("in the left lung", add_special_tokens=False)["input_ids"]
    assert enc.tagged() == "in the <mask>left</mask> lung"


def test_tags_as_special_tokens_are_removed():
    tok = word_level_with_special_tags()
    mask_id = tok.convert_tokens_to_ids("<mask>")
    enc = encode_response(tok, "<mask>no</mask> nodule")
    assert mask_id not in enc.input_ids
    assert enc.span_weights == (1.0, 0.0, 0.0)


def test_leading_space_variants_weight_the_same_words():
    got = {}
    for trim in (False, True):
        tok = byte_level_leading_space(trim)
        enc = encode_response(tok, "the nodule is in the <mask>left</mask> lung")
        got[trim] = [tok.decode([i]) for i, w in zip(enc.input_ids, enc.span_weights) if w]
    assert got[False] == got[True]
    assert "".join(got[True]).strip() == "left"


def test_weight_and_eos_options():
    tok = build_word_tokenizer(WORDS)
    enc = encode_response(tok, "a <mask>small</mask> nodule", weight=0.25, add_eos=False)
    assert enc.span_weights == (0.0, 0.25, 0.0) and tok.eos_token_id not in enc.input_ids
    with pytest.raises(ValueError, match="`weight` must be a finite number >= 0"):
        encode_response(tok, "a <mask>small</mask> nodule", weight=-1.0)
    with pytest.raises(ValueError, match="`boundary` must be"):
        encode_response(tok, "a <mask>small</mask> nodule", boundary="snap")


def test_straddling_token_names_record_and_phrase():
    tok = byte_level_leading_space(True)
    assert len(tok(" left", add_special_tokens=False)["input_ids"]) == 1  # so "lef" ends inside a token
    text = "in the <mask>lef</mask>t lung"
    with pytest.raises(SpanAlignmentError, match=r"record 'x9', chosen: phrase 'lef'"):
        encode_response(tok, text, where="record 'x9', chosen")
    enc = encode_response(tok, text, boundary="expand")
    assert enc.tagged() == "in the <mask>left</mask> lung"


def test_phrase_of_unknown_characters_is_still_weighted_or_named():
    tok = build_word_tokenizer(WORDS)
    enc = encode_response(tok, "the <mask>xylophone</mask> lung")  # <unk>, but offsets still cover it
    assert enc.span_weights == (0.0, 1.0, 0.0, 0.0)
    assert enc.input_ids[1] == tok.unk_token_id


def test_missing_eos_and_slow_tokenizer_errors():
    tok = _fast(Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos_token_id"):
        encode_response(tok, "<mask>a</mask>")

    class Slow:
        eos_token_id = 0

        def __call__(self, text, **kw):
            raise NotImplementedError("return_offset_mapping is not available")

    with pytest.raises(ValueError, match="cannot return offsets"):
        encode_response(Slow(), "<mask>a</mask>")

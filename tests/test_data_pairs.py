"""Pair construction: the diff tags exactly the changed words; editors; the paper's chosen/rejected policy."""

import json
import random

import pytest

import firempo_kernels.integrations.data.build_pairs as bp
from firempo_kernels.integrations.data.diff import tag_differences
from firempo_kernels.integrations.data.editors import (
    Edit,
    LLMEditor,
    RuleBasedEditor,
    load_editor,
    parse_edit_reply,
)
from firempo_kernels.integrations.data.records import QARecord, load_preference_records
from firempo_kernels.integrations.data.tags import parse_tags

VOCAB = "the a lesion nodule mass is in of left right upper lower lung lobe small large round oval no".split()


@pytest.mark.parametrize(
    "first, second, tagged_first, tagged_second",
    [
        ("The lesion is in the left lung.", "The lesion is in the right lung.",
         "The lesion is in the <mask>left</mask> lung.", "The lesion is in the <mask>right</mask> lung."),
        ("A small round nodule, left lobe", "A large oval nodule, left lobe",
         "A <mask>small round</mask> nodule, left lobe", "A <mask>large oval</mask> nodule, left lobe"),
        ("small nodule and large mass", "large nodule and small mass",
         "<mask>small</mask> nodule and <mask>large</mask> mass", "<mask>large</mask> nodule and <mask>small</mask> mass"),
        ("There is a lesion", "There is no lesion", "There is <mask>a</mask> lesion", "There is <mask>no</mask> lesion"),
        ("lesion present", "no lesion present", "<mask>lesion</mask> present", "<mask>no lesion</mask> present"),
        ("effusion on the left", "effusion on the left side",
         "effusion on the <mask>left</mask>", "effusion on the <mask>left side</mask>"),
        ("lungs.", "lung.", "<mask>lungs</mask>.", "<mask>lung</mask>."),
    ],
)
def test_diff_tags_exactly_the_changed_words(first, second, tagged_first, tagged_second):
    pair = tag_differences(first, second)
    assert (pair.first, pair.second) == (tagged_first, tagged_second)
    assert parse_tags(pair.first).text == first and parse_tags(pair.second).text == second


def test_diff_on_random_substitutions():
    rng = random.Random(11)
    for _ in range(200):
        words = [rng.choice(VOCAB) for _ in range(rng.randint(3, 14))]
        positions = sorted(rng.sample(range(len(words)), rng.randint(1, max(1, len(words) // 3))))
        edited = list(words)
        for p in positions:
            edited[p] = rng.choice([w for w in VOCAB if w != words[p]]) + "x"  # a word found nowhere else
        pair = tag_differences(" ".join(words), " ".join(edited))
        runs = _runs(positions)
        assert pair.first_phrases == tuple(" ".join(words[a:b]) for a, b in runs)
        assert pair.second_phrases == tuple(" ".join(edited[a:b]) for a, b in runs)


def _runs(positions):
    runs = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [tuple(r) for r in runs]


def test_diff_errors():
    with pytest.raises(ValueError, match="same words"):
        tag_differences("left  lung", "left lung")
    with pytest.raises(ValueError, match="`second` must contain at least one word"):
        tag_differences("left", "  ")
    with pytest.raises(TypeError, match="`first` must be a str"):
        tag_differences(None, "a")


SIDE = QARecord(
    id="s1", image="x.png", question="Left or right?", ground_truth="The lesion is in the left lung",
    answer_type="closed", candidates=("left", "right"), wrong_answers=("The lesion is in the right lung",),
)
WHERE = QARecord(
    id="w1", image="x.png", question="Where?", ground_truth="The lesion is in the upper left lung", answer_type="open",
    wrong_answers=("The lesion is in the lower left lung", "The lesion is in the upper right lung",
                   "The lesion is in the lower right lung"),
)


def test_rule_editor_closed_questions():
    ed = RuleBasedEditor()
    assert ed(SIDE, "It is in the right lung") == Edit(False, "It is in the left lung")
    assert ed(SIDE, "Left lung") == Edit(True, "Right lung")  # the case of the answer is kept
    assert ed(SIDE, "lung lung") == Edit(False, SIDE.ground_truth)  # nothing to swap: the ground truth
    assert ed(SIDE, "left or right") == Edit(False, SIDE.ground_truth)
    up = QARecord(id="u", image="x", question="q", ground_truth="upper left", candidates=("upper left", "left"))
    assert ed(up, "the upper left one") == Edit(True, "the left one")  # longest candidate wins
    assert ed(SIDE, "") is None
    assert ed(QARecord(id="n", image="x", question="q"), "left") is None


def test_rule_editor_open_questions():
    ed = RuleBasedEditor()
    right = ed(WHERE, "The lesion is in the upper left lung")
    assert right.correct and right.edited in WHERE.wrong_answers
    assert ed(WHERE, "The lesion is in the upper left lung") == right  # deterministic
    assert ed(WHERE, "The lesion is in the lower right lung") == Edit(False, WHERE.ground_truth)
    phrase = QARecord(id="p", image="x", question="q", ground_truth="upper left", wrong_answers=("lower right",))
    assert ed(phrase, "seen in the lower right zone") == Edit(False, "seen in the upper left zone")
    assert ed(phrase, "seen in the upper left zone") == Edit(True, "seen in the lower right zone")
    no_wrong = QARecord(id="q", image="x", question="q", ground_truth="upper left")
    assert ed(no_wrong, "upper left") is None  # right, but nothing to make it wrong with


def test_llm_editor_and_reply_parsing():
    prompts = []

    def generate(prompt):
        prompts.append(prompt)
        return 'Sure. {"correct": false, "edited": "The lesion is in the left lung"} done'

    edit = LLMEditor(generate)(SIDE, "The lesion is in the right lung")
    assert edit == Edit(False, "The lesion is in the left lung")
    assert "Model answer: The lesion is in the right lung" in prompts[0] and SIDE.ground_truth in prompts[0]
    assert parse_edit_reply('{"correct": "yes", "edited": "x"} {"correct": true, "edited": "y"}') == Edit(True, "y")
    assert parse_edit_reply("no json here") is None
    with pytest.raises(TypeError, match="`generate` must be callable"):
        LLMEditor("model")


def test_load_editor_specs():
    assert isinstance(load_editor("rule"), RuleBasedEditor)
    assert isinstance(load_editor("firempo_kernels.integrations.data.editors:RuleBasedEditor"), RuleBasedEditor)
    with pytest.raises(ValueError, match="'rule', 'hf:PATH', 'openai:MODEL' or 'module:callable'"):
        load_editor("nonsense")
    with pytest.raises(ValueError, match="needs a model name"):
        load_editor("openai:")


def test_paper_policy_and_drops():
    answers = [
        "The lesion is in the right lung",  # wrong: rejected = answer, chosen = its correction
        "The lesion is in the left lung",  # right: chosen = answer, rejected = counterfactual
        "   ",
    ]
    records = [SIDE, QARecord(**{**SIDE.__dict__, "id": "s2"}), QARecord(**{**SIDE.__dict__, "id": "s3"})]
    pairs, stats = bp.make_pairs(records, answers, RuleBasedEditor())
    assert (stats.wrong, stats.right, dict(stats.dropped)) == (1, 1, {"empty answer": 1})
    wrong, right = pairs
    assert wrong.rejected == "The lesion is in the <mask>right</mask> lung"
    assert wrong.chosen == "The lesion is in the <mask>left</mask> lung"
    assert right.chosen == "The lesion is in the <mask>left</mask> lung"
    assert right.rejected == "The lesion is in the <mask>right</mask> lung"
    assert wrong.extra == {"answer": answers[0], "answer_correct": False}
    same = bp.make_pairs([SIDE], ["x"], lambda r, a: Edit(False, "x"))[1]
    assert dict(same.dropped) == {"edit has the answer's words": 1}
    with pytest.raises(ValueError, match="got 1 records but 2 answers"):
        bp.make_pairs([SIDE], ["a", "b"], RuleBasedEditor())


def test_command_with_answers_from_a_file(tmp_path, capsys):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "qa.jsonl").write_text(json.dumps({**{k: v for k, v in SIDE.__dict__.items() if k != "extra"},
                                                   "image": "x.png", "candidates": ["left", "right"],
                                                   "wrong_answers": list(SIDE.wrong_answers)}) + "\n")
    (tmp_path / "answers.jsonl").write_text(json.dumps({"id": "s1", "answer": "It is the right lung"}) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert bp.main(["--data", str(tmp_path / "qa.jsonl"), "--answers", str(tmp_path / "answers.jsonl"),
                    "--out", str(out)]) == 0
    assert f"wrote 1 preference records to {out}" in capsys.readouterr().out
    (pair,) = load_preference_records(out)
    assert (pair.chosen, pair.rejected) == ("It is the <mask>left</mask> lung", "It is the <mask>right</mask> lung")


def test_greedy_answers_from_a_tiny_llava_are_deterministic(tmp_path):
    from firempo_kernels.integrations.data.embedded import build_processor, build_tiny_llava
    from firempo_kernels.integrations.data.records import load_qa_records
    from firempo_kernels.integrations.data.synthetic import make_synthetic_vqa

    records = load_qa_records(make_synthetic_vqa(tmp_path, num_images=2, lesion_rate=1.0))
    processor = build_processor()
    model = build_tiny_llava(processor.tokenizer, seed=3)
    answer = bp.GreedyAnswerer(model, processor, max_new_tokens=6, batch_size=4)
    first = answer(records)
    assert len(first) == len(records) and all(isinstance(a, str) for a in first)
    assert answer(records) == first
    assert processor.tokenizer.padding_side == "right"  # restored after generation
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        bp.GreedyAnswerer(model, processor, batch_size=0)


def test_llm_editor_on_a_local_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from firempo_kernels.integrations.data.embedded import build_word_tokenizer

    tok = build_word_tokenizer()
    tok.chat_template = None  # a plain causal LM: the prompt goes in as it is
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    editor = LLMEditor.from_pretrained(str(tmp_path), max_new_tokens=3)
    reply = editor.generate("Where is the lesion?")
    assert isinstance(reply, str) and editor.generate("Where is the lesion?") == reply  # greedy
    assert editor(SIDE, "The lesion is in the right lung") is None  # no JSON in a random model's words

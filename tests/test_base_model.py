"""Supervised steps of the demo's and the ablation's base models: deterministic per seed, the loss is the
response cross-entropy, the fine-tuning stops where the validation measure says."""

import random

import pytest
import torch

from firempo_kernels.integrations.base_model import blind_answer, finetune_to_accuracy, teach, true_answer
from firempo_kernels.integrations.data import load_qa_records
from firempo_kernels.integrations.data.embedded import build_processor, build_tiny_llava
from firempo_kernels.integrations.data.synthetic import make_synthetic_vqa

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    records = load_qa_records(make_synthetic_vqa(tmp_path_factory.mktemp("d"), num_images=3, seed=5, lesion_rate=1.0))
    return records, build_processor()


def _model(processor):
    return build_tiny_llava(processor.tokenizer, hidden_size=32, seed=3)


def test_teach_is_deterministic_and_lowers_the_loss(setup):
    records, processor = setup
    runs = []
    for _ in range(2):
        model = _model(processor)
        losses = teach(model, processor, records, answer=true_answer, steps=6, batch_size=4, lr=3e-3, seed=1,
                       show_progress=False)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert runs[0][0][-1] < runs[0][0][0]
    assert not model.training


def test_teach_first_loss_is_the_response_cross_entropy(setup):
    """Step one's loss (before any update) equals the mean token cross-entropy of the responses computed from
    the model's own logits, for the records the seed draws."""
    records, processor = setup
    model = _model(processor)
    rng = random.Random(7)
    batch = rng.sample(list(records), 2)
    tok = processor.tokenizer
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in batch:
            from firempo_kernels.integrations.data.dataset import PromptEncoder, load_image

            prompt, images = PromptEncoder(processor)(rec.question, load_image(rec.image))
            response = tok(true_answer(rec, rng), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **images).logits[0].double()
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
            total -= logp.gather(1, torch.tensor(response)[:, None]).sum().item()
            count += len(response)
    losses = teach(model, processor, records, answer=true_answer, steps=1, batch_size=2, lr=1e-3, seed=7,
                   show_progress=False)
    assert losses[0] == pytest.approx(total / count, rel=1e-5)


def test_blind_answer_keeps_the_sentence_and_draws_the_key(setup):
    records, _ = setup
    side = next(r for r in records if r.id.endswith("-side"))
    seen = {blind_answer(side, random.Random(i)) for i in range(30)}
    assert seen == {"The lesion is in the left lung", "The lesion is in the right lung"}


def test_finetune_stops_at_the_first_check_that_reaches_the_target(setup):
    records, processor = setup
    values = iter([0.2, 0.4, 0.7, 0.9])
    seen = []
    result = finetune_to_accuracy(
        _model(processor), processor, records, records[:2], target=0.6, max_steps=100, check_every=2,
        batch_size=2, lr=1e-3, seed=0, measure=lambda report: next(values),
        on_check=lambda steps, report: seen.append(steps),
    )
    assert result.checks == [(0, 0.2), (2, 0.4), (4, 0.7)] and result.steps == 4 and result.reached
    assert seen == [0, 2, 4]
    capped = finetune_to_accuracy(
        _model(processor), processor, records, records[:2], target=0.99, max_steps=3, check_every=2,
        batch_size=2, lr=1e-3, seed=0, measure=lambda report: 0.5,
    )
    assert [s for s, _ in capped.checks] == [0, 2, 3] and not capped.reached


@pytest.mark.parametrize("kwargs, message", [
    (dict(target=1.0), "`target` must lie in"),
    (dict(max_steps=0), "`max_steps` must be a positive number"),
])
def test_finetune_refuses_bad_settings(setup, kwargs, message):
    records, processor = setup
    args = {**dict(target=0.5, max_steps=2, check_every=1, batch_size=2, lr=1e-3, seed=0), **kwargs}
    with pytest.raises(ValueError, match=message):
        finetune_to_accuracy(_model(processor), processor, records, records, **args)

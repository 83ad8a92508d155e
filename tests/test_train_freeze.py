"""`freeze_vision` leaves exactly the language model and the head trainable, in every served family: the
vision tower and every module that carries its features into the language model are frozen."""

import pytest

from firempo_kernels.integrations import train
from firempo_kernels.integrations.smoke import TINY_FAMILIES, tiny_model

# The language model of each family, by the attribute transformers gives it; everything else but the head is
# the vision side.
_LANGUAGE_MODEL = ("model.language_model.", "model.text_model.")


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "llama"])
def test_freeze_vision_leaves_the_language_model_and_head(family):
    model = tiny_model(family)
    train._freeze(model, freeze_vision=True, train_head=True)
    for name, p in model.named_parameters():
        language = name.startswith(_LANGUAGE_MODEL) or name.startswith("lm_head.")
        assert p.requires_grad == language, f"{family}: {name} requires_grad={p.requires_grad}"


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "llama"])
def test_default_lora_targets_are_the_language_model_projections(family):
    import re

    model = tiny_model(family)
    pattern = re.compile(train._DEFAULT_LORA_TARGETS)
    targets = {name for name, _ in model.named_modules() if pattern.match(name)}
    assert targets, family
    assert all(name.startswith(_LANGUAGE_MODEL) for name in targets), sorted(targets)

"""From records to the trainer's :class:`~firempo_kernels.integrations.batch.PreferenceExample`.

:class:`PromptEncoder` turns (image, question) into the prompt's token ids (image placeholders expanded by
the model's processor) and the vision inputs; :class:`PreferenceDataset` appends each tokenised response
(:func:`.tags.encode_response`: tags removed, span weights by offsets, EOS appended) and yields examples
that :class:`~firempo_kernels.integrations.batch.PreferenceCollator` pads into a batch.

Every response is tokenised and checked when the dataset is built, so a bad tag or a phrase the tokenizer
cannot represent is reported up front (all of them, with record ids), never in mid-epoch.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Sequence

import torch

from ..batch import PreferenceExample
from .records import OnError, PreferenceRecord, RecordProblem, RecordValidationError
from .tags import EncodedResponse, SpanAlignmentError, TagError, encode_response

# Keys a processor returns for the text (PaliGemma's adds `labels`); everything else is a vision input of the
# batch. Per-token vision inputs (token types, positions) are derived from the ids by the model adapter, or
# from where the prompt ends, which the collated batch knows.
_TEXT_KEYS = frozenset({
    "input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "offset_mapping", "labels",
})


def load_image(path: str):
    """Opens an image as 8-bit RGB (vision towers take three channels; grayscale scans are replicated)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class PromptEncoder:
    """Turns ``(question, image)`` into prompt token ids and vision inputs with a Hugging Face processor.

    Args:
        processor: a multimodal processor (``processor(text=..., images=...)``) with a ``tokenizer``; or a
            plain tokenizer for text-only models (then images are ignored).
        prompt_template: a format string with ``{question}`` and, for images, ``{image}`` (the processor's
            image token) used as is; None uses the processor's chat template with one user turn holding the
            image and the question, and the generation prompt.
    """

    def __init__(self, processor: Any, *, prompt_template: str | None = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.multimodal = hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")
        if prompt_template is not None:
            if not isinstance(prompt_template, str) or "{question}" not in prompt_template:
                raise ValueError(
                    f"PromptEncoder: `prompt_template` must be a str containing '{{question}}'; got {prompt_template!r}"
                )
        elif not getattr(processor, "chat_template", None):
            raise ValueError(
                f"PromptEncoder: {type(processor).__name__} has no chat template; pass `prompt_template`, e.g. "
                f"'USER: {{image}}\\n{{question}} ASSISTANT:'"
            )
        self.prompt_template = prompt_template

    def text(self, question: str) -> str:
        """The prompt text before the processor expands the image placeholder."""
        if self.prompt_template is not None:
            image_token = getattr(self.processor, "image_token", None) or ""
            return self.prompt_template.format(question=question, image=image_token)
        if self.multimodal:
            content: Any = [{"type": "image"}, {"type": "text", "text": question}]
        else:
            content = question  # text tokenizers' chat templates take a string
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def __call__(self, question: str, image: Any = None) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Returns ``(prompt ids, vision inputs)``; vision inputs have a leading dim over images/patches."""
        return self.encode_text(self.text(question), image)

    def encode_text(
        self, text: str, image: Any = None, *, add_special_tokens: bool = True
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        """``(prompt ids, vision inputs)`` of an already formatted prompt ``text`` (image placeholders in it).
        ``add_special_tokens=False`` for text a chat template rendered (it holds its special tokens already)."""
        if not self.multimodal or image is None:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), {}
        enc = self.processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=add_special_tokens)
        ids = enc["input_ids"][0].tolist()
        vision = {k: v for k, v in enc.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        return ids, vision


def encode_record_responses(
    record: PreferenceRecord, tokenizer: Any, *, boundary: Literal["error", "expand"] = "error"
) -> tuple[EncodedResponse, EncodedResponse]:
    """Tokenises the chosen and rejected responses of ``record`` (errors name the record and the side)."""
    chosen = encode_response(tokenizer, record.chosen, where=f"record {record.id!r}, chosen", boundary=boundary)
    rejected = encode_response(
        tokenizer, record.rejected, where=f"record {record.id!r}, rejected", boundary=boundary
    )
    return chosen, rejected


def response_row(
    prompt_ids: Sequence[int], response: EncodedResponse, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, span_weights)`` of prompt + response: labels only on the response tokens."""
    ids = torch.tensor(list(prompt_ids) + list(response.input_ids), dtype=torch.int64)
    labels = torch.full_like(ids, ignore_index)
    labels[len(prompt_ids) :] = ids[len(prompt_ids) :]
    weights = torch.zeros(ids.shape[0], dtype=torch.float32)
    weights[len(prompt_ids) :] = torch.tensor(response.span_weights, dtype=torch.float32)
    return ids, labels, weights


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference records as trainer examples (``PreferenceExample``), images loaded lazily.

    Args:
        records: validated records (:func:`.records.load_preference_records`).
        processor: the model's processor (or tokenizer), see :class:`PromptEncoder`.
        prompt_template: see :class:`PromptEncoder`.
        use_corrupted: attach v' for records that have ``corrupted_image`` (the visual term needs it).
        boundary: what to do with a token straddling a tagged phrase, see :func:`.tags.encode_response`.
        on_error: records whose responses cannot be tokenised exactly: ``"raise"`` (every one listed in one
            :class:`RecordValidationError`) or ``"skip"`` (warned, dropped).
        ignore_index: label of the prompt positions.
    """

    def __init__(
        self,
        records: Sequence[PreferenceRecord],
        processor: Any,
        *,
        prompt_template: str | None = None,
        use_corrupted: bool = True,
        boundary: Literal["error", "expand"] = "error",
        on_error: OnError = "raise",
        ignore_index: int = -100,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"PreferenceDataset: `on_error` must be 'raise' or 'skip'; got {on_error!r}")
        self.prompts = PromptEncoder(processor, prompt_template=prompt_template)
        self.use_corrupted = use_corrupted
        self.ignore_index = ignore_index
        self.records: list[PreferenceRecord] = []
        self.responses: list[tuple[EncodedResponse, EncodedResponse]] = []
        problems: list[RecordProblem] = []
        for rec in records:
            if not isinstance(rec, PreferenceRecord):
                raise TypeError(f"PreferenceDataset: `records` must hold PreferenceRecord; got {type(rec).__name__}")
            try:
                pair = encode_record_responses(rec, self.prompts.tokenizer, boundary=boundary)
            except (TagError, SpanAlignmentError) as e:
                problems.append(RecordProblem(0, rec.id, str(e)))
                continue
            self.records.append(rec)
            self.responses.append(pair)
        if problems:
            err = RecordValidationError("PreferenceDataset", problems)
            if on_error == "raise":
                raise err
            warnings.warn(f"skipping: {err}", stacklevel=2)
        if not self.records:
            raise ValueError("PreferenceDataset: no usable record")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PreferenceExample:
        rec = self.records[index]
        chosen, rejected = self.responses[index]
        prompt_ids, images = self.prompts(rec.question, load_image(rec.image))
        corrupted = None
        if self.use_corrupted and rec.corrupted_image is not None:
            corrupted_prompt, corrupted = self.prompts(rec.question, load_image(rec.corrupted_image))
            if corrupted_prompt != prompt_ids:  # same size by validation, so the placeholders match
                raise ValueError(f"record {rec.id!r}: the corrupted image gives a different prompt than the clean one")
        c_ids, c_labels, c_weights = response_row(prompt_ids, chosen, self.ignore_index)
        r_ids, r_labels, r_weights = response_row(prompt_ids, rejected, self.ignore_index)
        return PreferenceExample(
            example_id=rec.id,
            chosen_input_ids=c_ids,
            chosen_labels=c_labels,
            chosen_span_weights=c_weights,
            rejected_input_ids=r_ids,
            rejected_labels=r_labels,
            rejected_span_weights=r_weights,
            images=images,
            corrupted_images=corrupted,
        )

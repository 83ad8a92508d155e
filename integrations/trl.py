"""FiRe-MPO on TRL's ``DPOTrainer``: the trainer users already run, with the fused loss inside it.

::

    from firempo_kernels.integrations.trl import FiReMPOConfig, FiReMPOTrainer

    args = FiReMPOConfig(output_dir="runs/x", preset="firempo", beta=0.1)
    trainer = FiReMPOTrainer(model, args=args, train_dataset=dataset, processing_class=processor,
                             peft_config=lora)
    trainer.train()

Data is TRL's preference format: ``prompt``, ``chosen``, ``rejected`` and optional ``images``, where the
responses carry ``<mask>...</mask>`` around the edited phrases, plus an optional ``corrupted_images`` column
(v'; an empty list means the row has none, so c = 0 there) and an optional ``id``. With ``preset="dpo"`` every
response token has weight 1 and tags are not needed. :func:`~.data.hf_dataset.load_preference_dataset` builds
such a dataset from this project's JSONL records.

What TRL, transformers and accelerate do stays theirs: the loop, gradient accumulation, schedules, logging,
checkpoints and their rotation, resume, DeepSpeed and PEFT. This module adds the span-weighted collation, the
reference (:mod:`.reference`) and ``compute_loss``; the head and the loss run inside the policy's forward
(:mod:`.forward`), so a ZeRO-3 partitioned ``lm_head`` arrives whole with no user patch. The logged rows carry
TRL's metric names (``rewards/*``, ``logps/*``) and ours (``kl/forward``, ``kl/reverse``, ``loss/rank``,
``loss/visual``, ``loss/kl``, ``visual/margins``, ``span_tokens``), through ``Trainer.log``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from trl import DPOConfig, DPOTrainer

from firempo_kernels.losses import LOSS_PRESETS, FiReMPOLoss

from .batch import PreferenceBatch, PreferenceCollator, PreferenceExample
from .data.dataset import PromptEncoder, response_row
from .data.tags import TAG_OPEN, EncodedResponse, SpanAlignmentError, TagError, encode_response
from .blocks import add_firempo_forward
from .forward import compute_firempo_loss
from .models import unwrap_model
from .reference import (
    ADAPTERS_DISABLED,
    AdaptersDisabledReference,
    FrozenModelReference,
    Reference,
    is_peft_model,
)

__all__ = ["FiReMPOConfig", "FiReMPOTrainer", "FiReMPOCollator", "REFERENCE_MODES", "PRESETS"]

PRESETS = tuple(LOSS_PRESETS)
REFERENCE_MODES = ("auto", "model", ADAPTERS_DISABLED, "precomputed")
_DEFAULTS = {"alpha": 0.01, "gamma": 0.1, "lambda_": 0.5}  # the paper's, for the FiRe-MPO preset
_COLUMNS = ["id", "prompt", "chosen", "rejected", "image", "images", "corrupted_images"]


@dataclass
class FiReMPOConfig(DPOConfig):
    """``DPOConfig`` plus the FiRe-MPO settings; ``beta`` is DPOConfig's own (default 0.1).

    ``preset`` fills ``alpha``, ``gamma`` and ``lambda_`` with the named configuration's values unless they
    are given: ``firempo`` (alpha 0.01, gamma 0.1, lambda 0.5), ``rrpo`` (gamma 0, lambda 1), ``mask_dpo``
    (gamma 0, alpha 0), ``dpo`` (as mask_dpo, every response token weighted 1). The reference:
    ``reference_mode`` = ``auto`` (``ref_model`` when given; adapters disabled for a peft policy; the
    precomputed store when ``precompute_ref_log_probs``; else a frozen copy of the policy), ``model``,
    ``adapters_disabled`` or ``precomputed`` (a store in ``precomputed_reference_dir``, default
    ``<output_dir>/reference``, built before training when missing; a store there that another model, head,
    data or loss setting built is refused, and rebuilt only with ``overwrite_precomputed_reference``).
    """

    preset: Literal["firempo", "rrpo", "mask_dpo", "dpo"] = field(
        default="firempo", metadata={"help": "firempo | rrpo | mask_dpo | dpo"})
    alpha: float | None = field(default=None, metadata={"help": "weight of the token KL (preset's if unset)"})
    gamma: float | None = field(default=None, metadata={"help": "weight of the visual term (preset's if unset)"})
    lambda_: float | None = field(default=None, metadata={"help": "share of KL(ref||policy) (preset's if unset)"})
    visual_pairing: Literal["reversed", "same_response", "cross"] = field(
        default="reversed", metadata={"help": "reversed | same_response | cross"})
    reference_mode: Literal["auto", "model", "adapters_disabled", "precomputed"] = field(
        default="auto", metadata={"help": "auto | model | adapters_disabled | precomputed"})
    precomputed_reference_dir: str | None = field(
        default=None, metadata={"help": "store of the precomputed reference (default <output_dir>/reference)"}
    )
    overwrite_precomputed_reference: bool = field(
        default=False,
        metadata={"help": "rebuild a precomputed store that does not match this run (another model, head, data or "
                          "settings) in place; without it such a store is refused and kept",
                  "aliases": ["--overwrite-reference-store"]},
    )
    shared_prefix: bool = field(
        default=True,
        metadata={"help": "chosen and rejected rows share the forward of their common prefix (image and question); "
                          "models whose attention cannot take the packed mask run unpacked"},
    )

    def __post_init__(self) -> None:
        where = "FiReMPOConfig"
        for name in ("shared_prefix", "overwrite_precomputed_reference"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{where}: `{name}` must be a bool; got {getattr(self, name)!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"{where}: `preset` must be one of {PRESETS}; got {self.preset!r}")
        values = {**_DEFAULTS, **LOSS_PRESETS[self.preset]}
        for name in ("alpha", "gamma", "lambda_"):
            if getattr(self, name) is None:
                setattr(self, name, float(values[name]))
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(f"{where}: `reference_mode` must be one of {REFERENCE_MODES}; got {self.reference_mode!r}")
        if self.precomputed_reference_dir is not None and not isinstance(self.precomputed_reference_dir, (str, os.PathLike)):
            raise TypeError(
                f"{where}: `precomputed_reference_dir` must be a path or None; got "
                f"{type(self.precomputed_reference_dir).__name__}"
            )
        if self.precompute_ref_log_probs:
            # TRL's own precompute stores sequence log-probs only (and refuses vision data); FiRe-MPO's store
            # holds what the span terms and the token KL need, built by the trainer itself.
            if self.reference_mode not in ("auto", "precomputed"):
                raise ValueError(
                    f"{where}: `precompute_ref_log_probs=True` contradicts reference_mode={self.reference_mode!r}"
                )
            self.reference_mode, self.precompute_ref_log_probs = "precomputed", False
        loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unsupported = {
            "loss_type": (loss_type, ["sigmoid"]),
            "loss_weights": (self.loss_weights, None),
            "ld_alpha": (self.ld_alpha, None),
            "f_divergence_type": (self.f_divergence_type, "reverse_kl"),
            "label_smoothing": (self.label_smoothing, 0.0),
            "use_weighting": (self.use_weighting, False),
            "sync_ref_model": (self.sync_ref_model, False),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported and not (name == "loss_weights" and value in ([1.0], [1])):
                raise ValueError(
                    f"{where}: `{name}` must be {supported!r} (FiRe-MPO's rank terms are sigmoid DPO on span "
                    f"rewards); got {value!r}"
                )
        self.loss()  # validates beta, alpha, gamma, lambda_, visual_pairing with errors naming the field
        super().__post_init__()

    def loss(self) -> FiReMPOLoss:
        """The configured :class:`FiReMPOLoss`."""
        try:
            return FiReMPOLoss(
                beta=self.beta, alpha=self.alpha, gamma=self.gamma, lambda_=self.lambda_,
                visual_pairing=self.visual_pairing,
            )
        except (TypeError, ValueError) as e:
            raise type(e)(str(e).replace("FiReMPOLoss", "FiReMPOConfig")) from None

    @property
    def weights_every_response_token(self) -> bool:
        """Whether every response token is weighted 1 (the DPO preset), so no tags are needed."""
        return self.preset == "dpo"


def _text(value: Any, where: str) -> str:
    """A response or prompt as text: a string, or the content of a conversational message list's turns."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(m, Mapping) and "content" in m for m in value):
        parts = []
        for message in value:
            content = message["content"]
            if isinstance(content, str):
                parts.append(content)
            else:
                parts.extend(c.get("text", "") for c in content if isinstance(c, Mapping) and c.get("type") == "text")
        return "".join(parts)
    raise TypeError(f"{where} must be a string or a list of messages; got {type(value).__name__}")


def example_id(row: Mapping[str, Any]) -> str:
    """A row's ``id``, or a content hash of its text when it has none (stable across runs and processes)."""
    if row.get("id") is not None:
        return str(row["id"])
    text = json.dumps([row.get(k) for k in ("prompt", "chosen", "rejected")], sort_keys=True, default=str)
    return "sha1-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


class FiReMPOCollator:
    """TRL preference rows -> ``{"batch": PreferenceBatch}``: prompts through the processor (images expanded),
    responses tokenised with their ``<mask>`` tags turned into span weights, EOS appended, rows right-padded.

    Args:
        processing_class: the model's processor (vision) or tokenizer (text).
        weight_every_token: weight 1 on every response token (DPO) instead of the tagged spans.
        corrupted_pass: always carry corrupted images (clean copies, c = 0, for rows without v'), so that every
            batch, on every rank, makes the same model calls (ZeRO-3 needs that).
        max_length: a longer prompt + response is refused (truncating would cut spans or EOS silently).
        ignore_index, pad_to_multiple_of: of the collated batch.
        boundary: a token straddling a tag: ``"error"`` or ``"expand"`` (see :func:`.data.tags.encode_response`).

    A string prompt is used as written, except for a row with an image whose prompt lacks the processor's
    image token: that prompt becomes one user turn (image, text) rendered by the chat template. A list of
    messages is rendered by the chat template with the generation prompt.
    """

    def __init__(
        self,
        processing_class: Any,
        *,
        weight_every_token: bool = False,
        corrupted_pass: bool = False,
        max_length: int | None = None,
        ignore_index: int = -100,
        pad_to_multiple_of: int | None = None,
        boundary: str = "error",
    ) -> None:
        self.processing_class = processing_class
        self.prompts = PromptEncoder(processing_class, prompt_template="{question}")
        self._chat: PromptEncoder | None = None
        self.tokenizer = self.prompts.tokenizer
        self.weight_every_token = weight_every_token
        self.corrupted_pass = corrupted_pass
        self.max_length = max_length
        self.ignore_index = ignore_index
        self.boundary = boundary
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        # Rows without an `id` are keyed by a hash of their text, so identical rows share one (and one reference).
        self.pad = PreferenceCollator(
            int(pad or 0), ignore_index=ignore_index, pad_to_multiple_of=pad_to_multiple_of, unique_ids=False
        )

    def _prompt(self, prompt: Any, image: Any, where: str) -> tuple[list[int], dict[str, torch.Tensor]]:
        image_token = getattr(self.processing_class, "image_token", None)
        if isinstance(prompt, str):
            if image is not None and image_token and image_token not in prompt:
                if self._chat is None:
                    self._chat = PromptEncoder(self.processing_class)  # needs the processor's chat template
                return self.prompts.encode_text(self._chat.text(prompt), image, add_special_tokens=False)
            return self.prompts.encode_text(prompt, image)
        messages = [dict(m) for m in prompt]
        if image is not None and not any(
            isinstance(m.get("content"), list) and any(c.get("type") == "image" for c in m["content"]) for m in messages
        ):
            first = next((m for m in messages if m.get("role") == "user"), None)
            if first is None:
                raise ValueError(f"{where}: `prompt` has no user turn to attach the image to")
            text = first["content"] if isinstance(first["content"], str) else _text([first], where)
            first["content"] = [{"type": "image"}, {"type": "text", "text": text}]
        rendered = self.processing_class.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.prompts.encode_text(rendered, image, add_special_tokens=False)

    def _response(self, value: Any, where: str) -> EncodedResponse:
        text = _text(value, where)
        eos = self.tokenizer.eos_token
        if eos and text.endswith(eos):
            text = text[: -len(eos)]  # EOS is appended as a token below, as TRL does
        if self.weight_every_token:
            response = encode_response(self.tokenizer, text, where=where, boundary="expand")
            return EncodedResponse(response.text, response.input_ids, (1.0,) * len(response.input_ids),
                                   response.offsets)
        return encode_response(self.tokenizer, text, where=where, boundary=self.boundary)

    def check_tags(self, row: Mapping[str, Any], where: str) -> None:
        """Outside the DPO preset, a row needs a tagged phrase in at least one response."""
        if not self.weight_every_token and not any(
            TAG_OPEN in _text(row[k], f"{where} `{k}`") for k in ("chosen", "rejected")
        ):
            raise ValueError(
                f"{where}: neither response has a <mask>...</mask> tag, so FiRe-MPO has no span to reward; tag "
                "the edited phrases or use preset='dpo' (every response token weighted)"
            )

    def encode(self, row: Mapping[str, Any]) -> PreferenceExample:
        """One row as a :class:`PreferenceExample`; errors name the row's id."""
        rid = example_id(row)
        where = f"row {rid!r}"
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise ValueError(f"{where}: missing column `{key}` (TRL preference format: prompt, chosen, rejected)")
        self.check_tags(row, where)
        images = list(row.get("images") or ([row["image"]] if row.get("image") is not None else []))
        corrupted = list(row.get("corrupted_images") or [])
        if len(images) > 1 or len(corrupted) > 1:
            raise ValueError(f"{where}: one image per row is supported; got {len(images)} images, {len(corrupted)} corrupted")
        image = images[0] if images else None
        if corrupted and image is None:
            raise ValueError(f"{where}: `corrupted_images` given without `images`")
        prompt_ids, vision = self._prompt(row["prompt"], image, where)
        corrupted_vision = None
        if corrupted:
            corrupted_ids, corrupted_vision = self._prompt(row["prompt"], corrupted[0], where)
            if corrupted_ids != prompt_ids:
                raise ValueError(f"{where}: the corrupted image gives another prompt than the clean one (its size differs)")
        rows = []
        for side in ("chosen", "rejected"):
            response = self._response(row[side], f"{where} `{side}`")
            ids, labels, weights = response_row(prompt_ids, response, self.ignore_index)
            if self.max_length is not None and ids.shape[0] > self.max_length:
                raise ValueError(
                    f"{where}: prompt + {side} is {ids.shape[0]} tokens, over max_length={self.max_length}; raise "
                    "max_length (truncating would drop tagged tokens or EOS)"
                )
            rows += [ids, labels, weights]
        return PreferenceExample(rid, *rows, images=vision, corrupted_images=corrupted_vision)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, PreferenceBatch]:
        batch = self.pad([self.encode(row) for row in rows])
        if self.corrupted_pass and batch.corrupted_images is None:
            batch.corrupted_images = dict(batch.images)
            batch.has_corrupted_image = torch.zeros(batch.num_examples, dtype=torch.bool)
        return {"batch": batch}


def _has_column(dataset: Any, name: str) -> bool:
    return name in (getattr(dataset, "column_names", None) or [])


def _fsdp_on_cpu_ranks(accelerator: Any) -> None:
    """Turn on the FSDP plugin of an ``accelerate launch`` with an FSDP config on CPU ranks.

    accelerate's process state applies the FSDP plugin to GPU-type ranks only: CPU ranks launched with
    ``fsdp2.yaml`` would come up as plain DDP, unsharded, without a word. Setting the plugin and the
    distributed type as accelerate does for GPU ranks runs its own FSDP2 code on CPU ranks (gloo): the
    sharding in ``prepare``, the gathered state dict on save, the sharded checkpoints on resume. Both states
    are set because accelerate copies the process state's type into every ``AcceleratorState()`` it creates.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
            or state.distributed_type != DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables, as accelerate builds it
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def release_deepspeed_shared_memory() -> None:
    """Unlink this rank's DeepSpeed all-reduce buffer from ``/dev/shm`` once every rank has mapped its peers'.

    When all ranks of a DeepSpeed launch share one machine, DeepSpeed's communication backend creates a
    shared-memory file per rank (66 MB, named after the rendezvous address, port and rank) for its inference
    all-reduce, maps its peers' files, and never unlinks its own: every launch left ranks x 66 MB of RAM behind
    in ``/dev/shm`` for as long as the machine runs, and a machine that runs many launches (a test suite,
    repeated demos, a sweep) runs out of memory. A name only serves the peers' opening the file while the
    backend starts, which the barrier waits out; the mappings outlive the name, and the memory goes back when
    the last rank exits. ``firempo-train`` calls it right after ``deepspeed.init_distributed``; a script of
    one's own launched by the ``deepspeed`` launcher on CPU ranks calls it there too. Every rank must call it
    (the barrier); calling it again, or without DeepSpeed, does nothing else.
    """
    if not torch.distributed.is_initialized():
        return
    name = "_".join(("deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(torch.distributed.get_rank())))
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    Path("/dev/shm", name).unlink(missing_ok=True)


def _wrap_only_layers_present(plugin: Any, model: nn.Module) -> None:
    """Transformer-layer wrap without named classes takes every class of the model's ``_no_split_modules``,
    and accelerate stops at one the model lacks: vision-language classes name their towers' text-side
    classes too (Gemma 3, PaliGemma and Llava list ``SiglipTextEmbeddings`` / ``CLIPTextEmbeddings``, which
    only the vision tower's sibling text model has). The classes are then those of the list that the model
    holds; classes a launch names are left as they are."""
    if plugin.transformer_cls_names_to_wrap is not None or "transformer" not in str(plugin.auto_wrap_policy):
        return
    listed = getattr(unwrap_model(model), "_no_split_modules", None) or []
    present = {type(module).__name__ for module in model.modules()}
    plugin.transformer_cls_names_to_wrap = sorted(name for name in listed if name in present) or None


class FiReMPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` computing the FiRe-MPO loss (or a preset of it) with the fused kernels.

    Constructed exactly like ``DPOTrainer`` (``model``, ``ref_model``, ``args`` = :class:`FiReMPOConfig`,
    ``train_dataset``, ``eval_dataset``, ``processing_class``, ``peft_config``, ``callbacks``...). Per batch the
    reference runs without a graph (or is looked up in the precomputed store), then the policy runs the clean
    pair and, when the loss has a visual term and the data has a ``corrupted_images`` column, the corrupted
    pair; the head and the loss run inside the policy's forward.
    """

    _tag_names = ["trl", "dpo", "firempo"]
    _name = "FiRe-MPO"

    def __init__(
        self,
        model: str | nn.Module,
        ref_model: nn.Module | None = None,
        args: FiReMPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = FiReMPOConfig(output_dir="firempo-output")
        if not isinstance(args, FiReMPOConfig):
            raise TypeError(f"FiReMPOTrainer: `args` must be a FiReMPOConfig; got {type(args).__name__}")
        self.loss_fn = args.loss()
        self.reference_mode = self._resolve_reference_mode(args, model, ref_model, peft_config)
        peft = peft_config is not None or (isinstance(model, nn.Module) and is_peft_model(model))
        copied_reference = ref_model is None and not (self.reference_mode == "precomputed" and peft)
        if self.reference_mode != ADAPTERS_DISABLED and copied_reference:
            if not isinstance(model, nn.Module) or any(hasattr(p, "ds_id") for p in model.parameters()):
                raise ValueError(
                    "FiReMPOTrainer: reference_mode='model' needs `ref_model` (the policy is not an in-memory model "
                    "that can be copied)"
                )
            ref_model = copy.deepcopy(model).eval()  # the policy's starting point, frozen
        if ref_model is not None:
            ref_model.requires_grad_(False)
        if processing_class is None:
            from transformers import AutoProcessor

            source = model if isinstance(model, str) else unwrap_model(model).config._name_or_path
            processing_class = AutoProcessor.from_pretrained(source, trust_remote_code=args.trust_remote_code)
        self._corrupted_pass = self.loss_fn.needs_corrupted_pass and _has_column(train_dataset, "corrupted_images")
        if data_collator is None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            data_collator = FiReMPOCollator(
                processing_class, weight_every_token=args.weights_every_response_token,
                corrupted_pass=self._corrupted_pass, max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None,
            )
        if isinstance(data_collator, FiReMPOCollator):
            for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
                for split, part in (dataset.items() if isinstance(dataset, Mapping) else [(name, dataset)]):
                    if part is not None:
                        _check_rows(part, data_collator, split)
        self._firempo_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(
            model, ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, peft_config=peft_config, **kwargs,
        )
        add_firempo_forward(self.model)
        if self.ref_model is not None:
            add_firempo_forward(self.ref_model)
        if self.reference_mode == "precomputed":
            self._build_store([dataset for part in (train_dataset, eval_dataset) if part is not None
                               for dataset in (part.values() if isinstance(part, Mapping) else [part])])
            self.ref_model = None  # a reference model only served the reference pass
        self.reference: Reference = self._build_reference()

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        _fsdp_on_cpu_ranks(self.accelerator)
        self.is_fsdp_enabled = getattr(self.accelerator.state, "fsdp_plugin", None) is not None
        if self.is_fsdp_enabled:
            _wrap_only_layers_present(self.accelerator.state.fsdp_plugin, self.model)

    # -- reference ------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_reference_mode(args: FiReMPOConfig, model: Any, ref_model: Any, peft_config: Any) -> str:
        mode = args.reference_mode
        peft = peft_config is not None or (isinstance(model, nn.Module) and is_peft_model(model))
        if mode == "auto":
            mode = "model" if ref_model is not None else (ADAPTERS_DISABLED if peft else "model")
        if mode == ADAPTERS_DISABLED and not peft:
            raise ValueError(
                "FiReMPOTrainer: reference_mode='adapters_disabled' needs a peft policy (pass `peft_config` or a "
                "PeftModel)"
            )
        if mode == ADAPTERS_DISABLED and ref_model is not None:
            raise ValueError("FiReMPOTrainer: reference_mode='adapters_disabled' takes no `ref_model`")
        return mode

    def _build_reference(self) -> Reference:
        if self.reference_mode == "model":
            return FrozenModelReference(self.ref_model)
        if self.reference_mode == ADAPTERS_DISABLED:
            return AdaptersDisabledReference()
        from .precompute import PrecomputedStoreReference

        return PrecomputedStoreReference(self._open_store())

    def _live_reference(self) -> tuple[Reference, nn.Module]:
        """The reference that the precompute pass runs (before any training step)."""
        if self.ref_model is not None:
            return FrozenModelReference(self.ref_model), self.ref_model
        if is_peft_model(self.model):
            return AdaptersDisabledReference(), self.model
        return FrozenModelReference(self.model), self.model

    @property
    def precomputed_reference_dir(self) -> Path:
        """Where the precomputed reference store lives."""
        return Path(self.args.precomputed_reference_dir or Path(self.args.output_dir) / "reference")

    def _open_store(self):
        from .precompute import PrecomputedReferenceStore

        store = PrecomputedReferenceStore(self.precomputed_reference_dir)
        store.check_compatible(
            temperature=self.loss_fn.temperature, ignore_index=self.loss_fn.ignore_index,
            needs_hidden=self.loss_fn.needs_reference_hidden, needs_corrupted=self._corrupted_pass,
        )
        return store

    def _build_store(self, datasets: list[Any]) -> None:
        """Build the precomputed reference store of ``datasets`` (one store for all) before training, or check
        that the one there serves them: every example in it, built by this run's reference model and head, for
        this loss's settings. A store that does not is refused by name, or replaced with
        ``overwrite_precomputed_reference``; an unfinished one needs that flag too."""
        from .precompute import PrecomputedReferenceStore, precompute_reference

        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        directory = self.precomputed_reference_dir
        overwrite = self.args.overwrite_precomputed_reference
        if (directory / "index.json").is_file():
            try:
                store = PrecomputedReferenceStore(directory)
            except ValueError as e:  # another format
                problems = [str(e)]
            else:
                source = store.source_mismatches(*self._live_reference())
                problems = [
                    *store.data_mismatches([example_id(row) for ds in datasets for row in _text_rows(ds)]),
                    *([f"built from another reference model: {'; '.join(source)}"] if source else []),
                    *store.setting_mismatches(
                        temperature=self.loss_fn.temperature, ignore_index=self.loss_fn.ignore_index,
                        needs_hidden=self.loss_fn.needs_reference_hidden, needs_corrupted=self._corrupted_pass),
                ]
            if not problems:
                return
            if not overwrite:
                raise ValueError(
                    f"FiReMPOTrainer: the precomputed reference in {directory} does not serve this run: "
                    f"{'; '.join(problems)}. It is kept as it is: set precomputed_reference_dir to another folder, "
                    "or rebuild it in place with overwrite_precomputed_reference=True (firempo-train "
                    "--overwrite-reference-store)"
                )
        reference, model = self._live_reference()
        if self.is_deepspeed_enabled and any(hasattr(p, "ds_id") for p in unwrap_model(model).parameters()):
            # ZeRO-3 partitioned the weights when the model was built: run the pass through an inference
            # engine, which gathers them layer by layer, as TRL's own precompute does.
            from trl.models import prepare_deepspeed

            model = prepare_deepspeed(model, self.accelerator)
            if reference.mode == "model":
                reference = FrozenModelReference(model)
        collator = self.data_collator
        loaders = [torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, collate_fn=lambda rows: collator(rows)["batch"],
            sampler=torch.utils.data.distributed.DistributedSampler(
                range(len(dataset)), num_replicas=self.accelerator.num_processes,
                rank=self.accelerator.process_index, shuffle=False),
        ) for dataset in datasets]
        device = self.accelerator.device
        if not self.is_deepspeed_enabled:
            unwrap_model(model).to(device)
        precompute_reference(
            reference, itertools.chain(*loaders), directory, policy=model, overwrite=overwrite,
            temperature=self.loss_fn.temperature, ignore_index=self.loss_fn.ignore_index,
            keep_hidden=self.loss_fn.needs_reference_hidden,
            include_corrupted=self.loss_fn.needs_corrupted_pass, rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes, device=device,
            progress=not bool(os.environ.get("TQDM_DISABLE")), shared_prefix=self.args.shared_prefix,
        )

    # -- data -----------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        # Rows stay text (and images) until the collator turns tags into span weights; they were checked in
        # __init__ (or are checked by `evaluate` through the collator).
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(_COLUMNS)

    # -- loss and metrics -----------------------------------------------------------------------------

    def compute_loss(
        self, model: nn.Module, inputs: Mapping[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ):
        """The FiRe-MPO loss of one micro-batch (mean over its examples, as DPOTrainer's), metrics recorded."""
        batch = inputs["batch"]
        out = compute_firempo_loss(model, self.reference, batch, self.loss_fn, corrupted_pass=self._corrupted_pass,
                                   shared_prefix=self.args.shared_prefix)
        self._record(out.metrics)
        return (out.loss, out) if return_outputs else out.loss

    def _record(self, metrics: Mapping[str, torch.Tensor]) -> None:
        mode = "train" if self.model.training else "eval"
        names = sorted(metrics)
        values = torch.stack([metrics[n].detach().to(torch.float32).reshape(()) for n in names])
        gathered = self.accelerator.gather(values[None].to(self.accelerator.device)).reshape(-1, len(names)).cpu()
        for i, name in enumerate(names):
            column = gathered[:, i]
            # span_tokens counts tokens: summed over ranks; the rest are per-example means: averaged.
            value = column.sum() if name == "span_tokens" else column.nanmean()
            if torch.isfinite(value):
                self._firempo_metrics[mode][name].append(float(value))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # transformers writes a checkpoint's weights in the checkpoint layout that from_pretrained converts from
        # (Qwen2-VL's ``model.layers.*`` for ``model.language_model.layers.*``, ...) but resumes by reading them
        # back with a plain non-strict load_state_dict: every converted key is missed with a warning and a
        # one-process or DDP run resumes from its starting weights. Checkpoints are therefore written in the
        # model's own layout (from_pretrained reads both); the final model keeps transformers' checkpoint layout.
        unwrapped = unwrap_model(self.model)
        unwrapped.save_pretrained = functools.partial(type(unwrapped).save_pretrained, unwrapped,
                                                      save_original_format=False)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del unwrapped.save_pretrained

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        ours = {name: sum(v) / len(v) for name, v in self._firempo_metrics[mode].items() if v}
        if mode == "eval":
            ours = {f"eval_{name}": value for name, value in ours.items()}
        logs.update(ours)
        self._firempo_metrics[mode].clear()
        super().log(logs, start_time)

    def prediction_step(self, model: nn.Module, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def _text_rows(dataset: Any):
    """The rows of ``dataset`` without decoding their images (ids and tags need only the text)."""
    keep = [c for c in ("id", "prompt", "chosen", "rejected") if _has_column(dataset, c)]
    if hasattr(dataset, "select_columns") and keep:
        return dataset.select_columns(keep)
    return dataset


def _check_rows(dataset: Any, collator: FiReMPOCollator, name: str) -> None:
    """Every row's responses tokenise with their tags, checked before training; all problems in one error."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(_text_rows(dataset)):
        rid = example_id(row)
        if rid in seen and row.get("id") is not None:
            problems.append(f"row {index}: id {rid!r} repeats row {seen[rid]} (ids key the reference and errors)")
        seen.setdefault(rid, index)
        try:
            collator.check_tags(row, "row")
            for side in ("chosen", "rejected"):
                collator._response(row[side], f"`{side}`")
        except (TagError, SpanAlignmentError, ValueError, TypeError, KeyError) as e:
            problems.append(f"row {index} (id {rid!r}): {e}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"FiReMPOTrainer: {len(problems)} bad row(s) in {name}:\n  {shown}")

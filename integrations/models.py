"""Model adapters: last hidden states without logits, and the output head, for Hugging Face models.

The fused loss needs what a model computes on the way to its logits (the input of the output head) and
the head itself; it must never see ``[rows, T, V]`` logits. An adapter knows, for one model family, which
inner module returns those hidden states and which per-token vision inputs that module wants::

    adapter = get_adapter(model)                       # model may be wrapped by peft
    hidden = adapter.hidden_states(model, input_ids, attention_mask, images)   # [R, T, d]
    weight, bias = adapter.head(model)                 # [V, d], [V] or None

Registered (matched by class name, so a transformers release without one of them is fine): Llava,
LlavaNext, LlavaOnevision, InternVL, Mistral 3, Idefics3, SmolVLM, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5,
Gemma 3 (MedGemma), Gemma 4 and PaliGemma (1 and 2), all through one
:class:`ImageTextAdapter` whose per-family differences are a few class attributes and hooks (docs/families.md);
as a fallback, any text model with ``get_output_embeddings()`` whose backbone returns ``last_hidden_state``.
To support another class, subclass :class:`ImageTextAdapter` (or :class:`ModelAdapter`) and decorate it with
``@register_adapter("TheModelClassName")``.

Per-token inputs are derived from ``input_ids`` where the ids say it all (Gemma 3's ``token_type_ids``, Qwen's
``mm_token_type_ids``, M-RoPE positions); PaliGemma's prefix/suffix ``token_type_ids`` depend on where the
prompt ends, which the collated batch carries (``PreferenceBatch.prompt_lengths``) and the adapter receives as
``prompt_lengths``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = [
    "ModelAdapter",
    "CausalLMAdapter",
    "LlavaAdapter",
    "QwenVLAdapter",
    "ImageTextAdapter",
    "Gemma3Adapter",
    "Gemma4Adapter",
    "Idefics3Adapter",
    "PaliGemmaAdapter",
    "register_adapter",
    "get_adapter",
    "unwrap_model",
    "without_engine",
    "registered_adapters",
]

_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(*class_names: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator: use this adapter for models whose class (or a base class) has one of these names."""
    if not class_names or not all(isinstance(n, str) and n for n in class_names):
        raise TypeError(f"register_adapter: expected one or more class names (str); got {class_names!r}")

    def decorate(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
        if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, ModelAdapter)):
            raise TypeError(f"register_adapter: {adapter_cls!r} must subclass ModelAdapter")
        for name in class_names:
            _REGISTRY[name] = adapter_cls
        return adapter_cls

    return decorate


def registered_adapters() -> dict[str, str]:
    """Model class name -> adapter class name, for every registered adapter."""
    return {k: v.__name__ for k, v in sorted(_REGISTRY.items())}


def without_engine(model: nn.Module) -> nn.Module:
    """``model`` without the DeepSpeed engine or DistributedDataParallel wrapper around it, if any (a peft
    model inside stays a peft model)."""
    wrapped = type(model).__name__ == "DeepSpeedEngine" or isinstance(model, nn.parallel.DistributedDataParallel)
    return model.module if wrapped else model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``peft`` (PeftModel), DeepSpeed engine and DistributedDataParallel
    wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        elif (inner := without_engine(model)) is not model:
            model = inner
        else:
            return model
    return model


# Config attributes that make the logits something other than ``hidden @ W.T + b``; the fused op would
# silently compute another distribution, so such models are refused (attribute -> value meaning "off").
# ``final_logit_softcapping`` is not among them: the adapter reads it (:meth:`ModelAdapter.logit_softcap`) and
# the loss applies the same cap, where the installed loss takes one.
_LOGIT_TRANSFORMS = {"logit_scale": 1.0, "logits_scaling": 1.0}


def loss_takes_softcap() -> bool:
    """Whether the installed :class:`~firempo_kernels.losses.FiReMPOLoss` applies a logit soft-cap
    (``cap * tanh(s / cap)``, its ``softcap`` hyperparameter)."""
    import inspect

    from firempo_kernels.losses import FiReMPOLoss

    return "softcap" in inspect.signature(FiReMPOLoss.__init__).parameters


def _text_configs(config) -> list:
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    return configs


class ModelAdapter:
    """How to get last hidden states and the output head of one model family.

    Subclasses override :meth:`backbone` and, if the backbone needs per-token vision inputs derived from the
    token ids, :meth:`extra_inputs`. ``model`` arguments may be peft- or DeepSpeed-wrapped.
    """

    #: Whether the family accepts vision inputs at all.
    takes_images: bool = True

    def check(self, model: nn.Module) -> None:
        """Raise if the model cannot be served (called once by :func:`get_adapter`)."""
        base = unwrap_model(model)
        cap = self.logit_softcap(model)
        if cap is not None and not loss_takes_softcap():
            raise ValueError(
                f"{type(base).__name__}: the config sets `final_logit_softcapping={cap}`, so its logits are "
                "cap * tanh(s / cap); the installed FiRe-MPO loss takes no `softcap` and cannot reproduce them"
            )
        for cfg in _text_configs(base.config):
            for attr, neutral in _LOGIT_TRANSFORMS.items():
                value = getattr(cfg, attr, neutral)
                if value is not None and value != neutral:
                    raise ValueError(
                        f"{type(base).__name__}: the config sets `{attr}={value}`, so its logits are not "
                        "hidden @ W.T + b; the fused FiRe-MPO loss cannot reproduce them. Override "
                        f"{type(self).__name__}.check() only once the loss supports that transform."
                    )
        self.head(model)

    def backbone(self, model: nn.Module) -> nn.Module:
        """The inner module whose output ``last_hidden_state`` feeds the head."""
        raise NotImplementedError

    def extra_inputs(
        self, model: nn.Module, input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-token inputs the backbone needs besides ids, mask and images ([R, T] tensors keyed by the
        forward's argument names), from ``input_ids`` [R, T] and, for families that need to know where each
        row's prompt ends, ``prompt_lengths`` [R] int64."""
        return {}

    def logit_softcap(self, model: nn.Module) -> float | None:
        """The model's ``final_logit_softcapping`` (logits = cap * tanh(s / cap)), or None when it has none."""
        for cfg in _text_configs(unwrap_model(model).config):
            cap = getattr(cfg, "final_logit_softcapping", None)
            if cap is not None:
                if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
                    raise ValueError(
                        f"{type(unwrap_model(model)).__name__}: `final_logit_softcapping` must be a positive "
                        f"number or None; got {cap!r}"
                    )
                return float(cap)
        return None

    def attention_blocks(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """[R, T] int64 block ids of tokens that attend each other in both directions (the same id >= 0; -1
        for causal tokens), on top of the causal mask; None when the family's attention is causal everywhere.
        The packed mask of :mod:`.packing` adds these blocks."""
        return None

    def can_pack(self, model: nn.Module) -> bool:
        """Whether every layer sees the tokens only through the attention mask, so that a packed row (one
        prompt, two responses under a mask) computes what the two rows compute; recurrent layers do not."""
        return True

    #: The layer types whose attention adds :meth:`attention_blocks` (None: every layer's).
    bidirectional_layer_types: tuple[str, ...] | None = None

    #: Whether the backbone takes ``attention_mask`` as ``{"full_attention": m, "sliding_attention": m'}``
    #: (one 4-D mask per layer type): the packed forward of a model with sliding-window layers needs it when
    #: a row is longer than the window.
    mask_per_layer_type: bool = False

    def position_ids(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        images: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The positions the model gives the tokens of right-padded rows: [R, T] (0, 1, ... per row)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    def head(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [V, d], bias [V] or None)`` of the output head.

        Read this inside the forward of the module DeepSpeed wraps: under ZeRO-3 the attribute access is what
        gathers the partitioned weight and registers it for the backward.
        """
        base = unwrap_model(model)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if head is None:
            raise TypeError(
                f"{type(base).__name__} has no output head (get_output_embeddings() returned None); "
                "FiRe-MPO needs a causal language-model head"
            )
        head = _resolve_head_module(head)
        weight = head.weight
        bias = getattr(head, "bias", None)
        if not isinstance(weight, torch.Tensor) or (bias is not None and not isinstance(bias, torch.Tensor)):
            raise TypeError(f"{type(base).__name__}: the output head must expose tensor `weight` and `bias`")
        return weight, bias

    def hidden_states(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | Mapping[str, torch.Tensor],
        images: Mapping[str, torch.Tensor] | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states, exactly what the model multiplies by its head.

        Args:
            model: the Hugging Face model (optionally peft/DeepSpeed-wrapped).
            input_ids: [R, T] int64, right-padded.
            attention_mask: [R, T] 0/1; or a [R, 1, T, T] mask (boolean, or additive float for eager
                attention: the packed rows of :mod:`.packing`), with ``position_ids``; or, for an adapter
                with :attr:`mask_per_layer_type`, a dict of such masks keyed by layer type.
            images: vision inputs for the image placeholders of these R rows, in row order (e.g.
                ``pixel_values``, ``image_grid_thw``); empty or None for text only.
            position_ids: the positions (as :meth:`position_ids` gives them), or None: the model's own.
            prompt_lengths: [R] int64, the prompt tokens of each row (image placeholders included), or None;
                PaliGemma needs them (its prefix attends both ways).

        Returns:
            [R, T, d] in the model's compute dtype.
        """
        images = dict(images or {})
        if images and not self.takes_images:
            raise ValueError(
                f"{type(self).__name__} runs text-only models but got vision inputs {sorted(images)}; register an "
                f"adapter for {type(unwrap_model(model)).__name__} (see firempo_kernels.integrations.models)"
            )
        positions = {} if position_ids is None else {"position_ids": position_ids}
        out = self.backbone(model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **positions,
            **images,
            **self.extra_inputs(model, input_ids, prompt_lengths),
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden


def _resolve_head_module(head: nn.Module) -> nn.Module:
    """The module whose ``weight``/``bias`` are the effective head, seeing through peft's wrappers."""
    kind = type(head).__name__
    if kind == "ModulesToSaveWrapper":  # peft: a trainable copy per adapter, the original when disabled
        if getattr(head, "disable_adapters", False) or head.active_adapter not in head.modules_to_save:
            return head.original_module
        active = head.active_adapter
        return head.modules_to_save[active if isinstance(active, str) else active[0]]
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise TypeError(
            f"the output head is a peft {kind} layer (LoRA on lm_head): its effective weight is W + BA, which the "
            "fused loss does not form. Leave lm_head out of `target_modules` (or list it in `modules_to_save`)."
        )
    return head


class CausalLMAdapter(ModelAdapter):
    """Any text model whose ``base_model`` returns ``last_hidden_state`` and that has an output head."""

    takes_images = False

    def backbone(self, model: nn.Module) -> nn.Module:
        base = unwrap_model(model)
        inner = getattr(base, "base_model", None)
        if inner is None or inner is base:
            raise TypeError(
                f"{type(base).__name__} exposes no backbone (base_model is the model itself), so hidden states "
                "cannot be taken before the head; register an adapter for it"
            )
        return inner


class ImageTextAdapter(ModelAdapter):
    """Image-text models whose inner ``model.model`` takes the processor's outputs and returns
    ``last_hidden_state``. What differs between families is set by class attributes and small hooks:

    * :attr:`token_type_input`: the name under which the forward takes the per-token modality
      (``token_type_ids`` for Gemma 3, ``mm_token_type_ids`` for Qwen-VL), derived from the placeholder ids of
      the config by :meth:`token_types` (0 text, 1 image, 2 video, 3 audio);
    * :attr:`bidirectional_images`: the tokens of one image attend each other both ways (Gemma 3);
    * :attr:`first_position`: the position of a row's first token (PaliGemma counts from 1);
    * :meth:`position_ids`, :meth:`extra_inputs`, :meth:`attention_blocks` for anything else.
    """

    token_type_input: str | None = None
    token_type_dtype: torch.dtype = torch.int64
    bidirectional_images: bool = False
    first_position: int = 0
    #: config attribute -> the token type its placeholder id gets
    modality_ids: tuple[tuple[str, int], ...] = (("image_token_id", 1), ("video_token_id", 2), ("audio_token_id", 3))

    def backbone(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model).model

    def token_types(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """[R, T]: 0 on text, 1 on image placeholders, 2 on video, 3 on audio ones (ids from the config)."""
        config = unwrap_model(model).config
        types = torch.zeros_like(input_ids, dtype=self.token_type_dtype)
        for attr, kind in self.modality_ids:
            token = getattr(config, attr, None)
            if token is not None:
                types[input_ids == token] = kind
        return types

    def extra_inputs(
        self, model: nn.Module, input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if self.token_type_input is None:
            return {}
        return {self.token_type_input: self.token_types(model, input_ids)}

    def position_ids(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        images: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return super().position_ids(model, input_ids, attention_mask, images) + self.first_position

    def attention_blocks(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        if not self.bidirectional_images:
            return None
        # One block per run of consecutive image placeholders, as the model groups them.
        image = (self.token_types(model, input_ids) == 1) & attention_mask.bool()
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.where(image, starts.long().cumsum(1) - 1, -1)


@register_adapter(
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "InternVLForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
)
class LlavaAdapter(ImageTextAdapter):
    """Llava and its kin: ``model.model`` merges the projected image features into the placeholder tokens,
    and every input is the processor's as it is. LlavaNext and LlavaOnevision take their anyres tiles as
    ``pixel_values`` [images, tiles, C, H, W] with ``image_sizes`` (and OneVision's ``batch_num_images``);
    InternVL its tiles as ``pixel_values`` [tiles of all images, C, H, W]; Mistral 3 (Pixtral vision) each
    image as ``pixel_values`` [images, C, H, W] zero-padded to the largest, its size in ``image_sizes``."""


@register_adapter("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
class Idefics3Adapter(ImageTextAdapter):
    """Idefics3 and SmolVLM: ``pixel_values`` [rows, images, C, H, W] (the sub-images of a split image and
    its global image; an all-zero image means none) with ``pixel_attention_mask`` [rows, images, H, W]."""


@register_adapter(
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration",
)
class QwenVLAdapter(ImageTextAdapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5: M-RoPE positions need ``mm_token_type_ids`` (0 text, 1 image,
    2 video), which is derived here from the placeholder token ids of the config. Qwen3.5's gated-delta-net
    layers carry a recurrent state along the row, which a packed row would pass from the chosen response to
    the rejected one: it runs unpacked (:meth:`can_pack`)."""

    def can_pack(self, model: nn.Module) -> bool:
        text = unwrap_model(model).config.get_text_config()
        return "linear_attention" not in (getattr(text, "layer_types", None) or ())

    token_type_input = "mm_token_type_ids"
    token_type_dtype = torch.int32
    modality_ids = (("image_token_id", 1), ("video_token_id", 2))

    def position_ids(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        images: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """M-RoPE positions [3, R, T] (temporal, height, width) from the model's own ``get_rope_index``."""
        images = dict(images or {})
        if "image_grid_thw" not in images:
            return ModelAdapter.position_ids(self, model, input_ids, attention_mask)[None].expand(3, -1, -1)
        backbone = self.backbone(model)
        positions, _ = backbone.get_rope_index(
            input_ids, image_grid_thw=images["image_grid_thw"], attention_mask=attention_mask,
            **self.extra_inputs(model, input_ids),
        )
        return positions


@register_adapter("Gemma3ForConditionalGeneration")
class Gemma3Adapter(ImageTextAdapter):
    """Gemma 3 (MedGemma): the tokens of one image attend each other both ways, which the model reads from
    ``token_type_ids`` (1 on image placeholders, derived here); sliding-window and global layers take one
    mask each, so a packed forward hands it one per layer type."""

    token_type_input = "token_type_ids"
    modality_ids = (("image_token_id", 1),)
    bidirectional_images = True
    mask_per_layer_type = True


@register_adapter("Gemma4ForConditionalGeneration")
class Gemma4Adapter(Gemma3Adapter):
    """Gemma 4: as Gemma 3, with ``mm_token_type_ids`` (1 image, 2 video, 3 audio); the tokens of one image
    (or video) attend each other both ways in the sliding-window layers (the global ones stay causal) where the
    text config says ``use_bidirectional_attention="vision"``. Per-layer token inputs are derived by the model
    from the ids."""

    token_type_input = "mm_token_type_ids"
    modality_ids = (("image_token_id", 1), ("video_token_id", 2), ("audio_token_id", 3))
    bidirectional_layer_types = ("sliding_attention",)  # its global layers stay causal

    def attention_blocks(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        text = unwrap_model(model).config.get_text_config()
        if getattr(text, "use_bidirectional_attention", None) != "vision":
            return None
        types = self.token_types(model, input_ids)
        vision = ((types == 1) | (types == 2)) & attention_mask.bool()
        starts = vision & ~torch.nn.functional.pad(vision, (1, 0))[:, :-1]
        return torch.where(vision, starts.long().cumsum(1) - 1, -1)

    def can_pack(self, model: nn.Module) -> bool:
        # Attending the whole row in both directions ("all") is no prefix-sharing mask.
        text = unwrap_model(model).config.get_text_config()
        return getattr(text, "use_bidirectional_attention", None) != "all"


@register_adapter("PaliGemmaForConditionalGeneration")
class PaliGemmaAdapter(ImageTextAdapter):
    """PaliGemma 1 and 2: the prefix (image, ``<bos>``, prompt, newline) attends itself both ways and the
    answer causally, which the model reads from ``token_type_ids`` (0 prefix, 1 answer). Where the prompt ends
    is not in the ids, so it comes from the batch (``prompt_lengths``). Positions count from 1."""

    token_type_input = "token_type_ids"
    first_position = 1

    def extra_inputs(
        self, model: nn.Module, input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if prompt_lengths is None:
            return {}
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        return {"token_type_ids": (columns[None, :] >= prompt_lengths.to(input_ids.device)[:, None]).long()}

    def attention_blocks(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        _require_prompt_lengths(model, prompt_lengths)
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        prefix = (columns[None, :] < prompt_lengths.to(input_ids.device)[:, None]) & attention_mask.bool()
        return torch.where(prefix, 0, -1)

    def hidden_states(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | Mapping[str, torch.Tensor],
        images: Mapping[str, torch.Tensor] | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`ModelAdapter.hidden_states`; ``prompt_lengths`` [R] int64 is required with a [R, T]
        ``attention_mask`` (a packed 4-D mask holds the prefix block already).

        Raises:
            ValueError: ``prompt_lengths`` is None with a [R, T] mask.
            TypeError: ``prompt_lengths`` is not a 1-D integer tensor.
        """
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            _require_prompt_lengths(model, prompt_lengths)
        return super().hidden_states(model, input_ids, attention_mask, images, position_ids=position_ids,
                                     prompt_lengths=prompt_lengths)


def _require_prompt_lengths(model: nn.Module, prompt_lengths: torch.Tensor | None) -> None:
    if prompt_lengths is None:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__}: `prompt_lengths` ([R] int64, the prompt tokens of each row) "
            "is required: the prompt attends itself both ways and the answer causally, and the token ids do not "
            "say where the prompt ends; got None"
        )
    if not isinstance(prompt_lengths, torch.Tensor) or prompt_lengths.dim() != 1 or prompt_lengths.is_floating_point():
        raise TypeError(f"`prompt_lengths` must be a 1-D integer tensor [R]; got {prompt_lengths!r}")


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model`` (peft- or DeepSpeed-wrapped models are unwrapped first).

    Raises:
        TypeError: the class is neither registered nor a text model with a backbone and an output head; the
            message says how to register one.
        ValueError: the model transforms its logits in a way the fused loss cannot reproduce.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_adapter: `model` must be a torch.nn.Module; got {type(model).__name__}")
    base = unwrap_model(model)
    adapter: ModelAdapter | None = None
    for cls in type(base).__mro__:
        if cls.__name__ in _REGISTRY:
            adapter = _REGISTRY[cls.__name__]()
            break
    else:
        has_head = callable(getattr(base, "get_output_embeddings", None)) and base.get_output_embeddings() is not None
        inner = getattr(base, "base_model", None)
        if has_head and inner is not None and inner is not base and hasattr(base, "config"):
            adapter = CausalLMAdapter()
    if adapter is not None:
        adapter.check(model)
        return adapter
    raise TypeError(
        f"get_adapter: no adapter for {type(base).__name__}. Supported: {', '.join(sorted(_REGISTRY))} (any text "
        "model with get_output_embeddings() and a base_model). To add one, subclass "
        "firempo_kernels.integrations.models.ModelAdapter (override backbone() and, for per-token vision "
        f"inputs, extra_inputs()) and decorate it with @register_adapter({type(base).__name__!r})."
    )

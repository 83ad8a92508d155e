"""Model adapters: last hidden states without logits, and the output head, for Hugging Face models.

The fused loss needs what a model computes on the way to its logits (the input of the output head) and
the head itself; it must never see ``[rows, T, V]`` logits. An adapter knows, for one model family, which
inner module returns those hidden states and which per-token vision inputs that module wants::

    adapter = get_adapter(model)                       # model may be wrapped by peft
    hidden = adapter.hidden_states(model, input_ids, attention_mask, images)   # [R, T, d]
    weight, bias = adapter.head(model)                 # [V, d], [V] or None

Registered: Llava, Qwen2-VL, Qwen2.5-VL, Qwen3-VL (matched by class name, so a transformers release
without one of them is fine) and, as a fallback, any text model with ``get_output_embeddings()`` whose
backbone returns ``last_hidden_state``. To support another class, subclass :class:`ModelAdapter` and
decorate it with ``@register_adapter("TheModelClassName")``.
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
    "register_adapter",
    "get_adapter",
    "unwrap_model",
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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``peft`` (PeftModel) and DeepSpeed engine wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        elif type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        else:
            return model
    return model


# Config attributes that make the logits something other than ``hidden @ W.T + b``; the fused op would
# silently compute another distribution, so such models are refused (attribute -> value meaning "off").
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


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
        configs = [base.config]
        if hasattr(base.config, "get_text_config"):
            configs.append(base.config.get_text_config())
        for cfg in configs:
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

    def extra_inputs(self, model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs the backbone needs besides ids, mask and images."""
        return {}

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
        attention_mask: torch.Tensor,
        images: Mapping[str, torch.Tensor] | None = None,
        *,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states, exactly what the model multiplies by its head.

        Args:
            model: the Hugging Face model (optionally peft/DeepSpeed-wrapped).
            input_ids: [R, T] int64, right-padded.
            attention_mask: [R, T] 0/1; or a [R, 1, T, T] mask (boolean, or additive float for eager
                attention: the packed rows of :mod:`.packing`), with ``position_ids``.
            images: vision inputs for the image placeholders of these R rows, in row order (e.g.
                ``pixel_values``, ``image_grid_thw``); empty or None for text only.
            position_ids: the positions (as :meth:`position_ids` gives them), or None: the model's own.

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
            **self.extra_inputs(model, input_ids),
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


@register_adapter("LlavaForConditionalGeneration")
class LlavaAdapter(ModelAdapter):
    """Llava: ``model.model`` merges the projected image features into the placeholder tokens."""

    def backbone(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model).model


@register_adapter(
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
)
class QwenVLAdapter(ModelAdapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: M-RoPE positions need ``mm_token_type_ids`` (0 text, 1 image,
    2 video), which is derived here from the placeholder token ids of the config."""

    def backbone(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model).model

    def extra_inputs(self, model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        config = unwrap_model(model).config
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == config.image_token_id] = 1
        video = getattr(config, "video_token_id", None)
        if video is not None:
            types[input_ids == video] = 2
        return {"mm_token_type_ids": types}

    def position_ids(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        images: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """M-RoPE positions [3, R, T] (temporal, height, width) from the model's own ``get_rope_index``."""
        images = dict(images or {})
        if "image_grid_thw" not in images:
            return super().position_ids(model, input_ids, attention_mask)[None].expand(3, -1, -1)
        backbone = self.backbone(model)
        positions, _ = backbone.get_rope_index(
            input_ids, image_grid_thw=images["image_grid_thw"], attention_mask=attention_mask,
            **self.extra_inputs(model, input_ids),
        )
        return positions


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

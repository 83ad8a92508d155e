"""The run config of ``firempo-train``, the demo and the reference pass: typed sections, one strict loader.

A run config is a YAML or JSON mapping of sections (see ``integrations/configs/example_run.yaml``, the paper's
LoRA setting, and ``smoke.yaml``, a tiny random model that runs anywhere)::

    run = load_run_config("run.yaml", ["training.learning_rate=5e-7", "deepspeed=zero3_offload"])
    run.training.learning_rate, run.resolve_path(run.data.path), run.to_dict()

Sections and keys (a missing key takes the default shown):

- ``model``: the policy.

  - ``name_or_path``: local folder or hub id; or ``tiny``: a random model of a family in
    :data:`~firempo_kernels.integrations.smoke.TINY_FAMILIES` (for smoke runs; it wins over ``name_or_path``,
    so ``model.tiny=llava`` turns a real config into a smoke run). One of the two is required.
  - ``seed`` (0): the weights of a ``tiny`` model.
  - ``class`` (auto): a transformers class name; auto picks the image-text-to-text or causal-LM auto class.
  - ``attn_implementation`` (auto): flash_attention_2 when flash-attn is installed and a GPU is present,
    else sdpa; any other value goes to transformers as is.
  - ``freeze_vision`` (true): the vision tower and projector are not trained.
  - ``train_lm_head`` (true): with tied embeddings the input embeddings follow the head.
  - ``trust_remote_code`` (false).

- ``lora``: LoRA on the policy; the base model, head included, is then frozen.

  - ``enabled`` (false; true when the section has keys but no ``enabled``, so ``lora.r=8`` alone turns it on).
  - ``r`` (16), ``alpha`` (32), ``dropout`` (0.05).
  - ``target_modules`` (null: the attention and MLP projections of the language model): a list of module
    names or one regular expression.
  - ``modules_to_save`` (null): modules trained in full and saved beside the adapter.

- ``reference``: the frozen reference of the loss.

  - ``mode`` (auto): ``model`` (a frozen model), ``adapters_disabled`` (the policy with its LoRA adapters off;
    needs LoRA), ``precomputed`` (stored by ``firempo-train --precompute-reference``); auto is
    adapters_disabled with LoRA, else model.
  - ``name_or_path`` / ``tiny`` / ``class`` / ``seed`` (null: the policy's): another reference model.
  - ``precomputed_dir`` (null: beside ``data.path``, ``<data without suffix>.reference``).

- ``loss``: ``preset`` (firempo) = firempo | rrpo | mask_dpo | dpo, and any of ``beta``, ``alpha``,
  ``gamma``, ``lambda_``, ``visual_pairing``, ``temperature`` (null: the preset's value).

- ``data``: one source (``synthetic`` wins over ``dataset``, which wins over ``path``, so a smoke override
  needs no deletion):

  - ``path``: preference records JSONL, with ``prompt_template`` (null: the processor's chat template),
    ``use_corrupted`` (true), ``on_error`` (raise | skip), ``boundary`` (error | expand: a tag that cuts a
    token), ``processor`` (null: ``model.name_or_path``).
  - ``dataset``: ``"package.module:factory"`` (``:factory`` defaults to ``build_dataset``), called with
    ``kwargs`` (and ``model_config`` when it takes one); it returns a Dataset of ``PreferenceExample`` or
    ``(dataset, collate_fn)``.
  - ``synthetic``: the arguments of :func:`~firempo_kernels.integrations.smoke.synthetic_examples`
    (``num_examples`` required): random examples for smoke runs.
  - ``pad_to_multiple_of`` (null), ``pad_token_id`` (null: the processor's, else the model's, else 0).

- ``deepspeed`` (zero3): ``zero3`` or ``zero3_offload`` (shipped in ``integrations/configs``), a DeepSpeed
  JSON path, or null for no DeepSpeed; its "auto" fields are filled from ``training``.

- ``training``: the trainer options: ``output_dir`` (runs/firempo), ``epochs``
  (1), ``max_steps`` (null: the epochs), ``learning_rate`` (1e-6), ``weight_decay`` (0), ``adam_betas``
  ([0.9, 0.999]), ``adam_eps`` (1e-8), ``warmup_ratio`` (0), ``min_lr_ratio`` (0; cosine schedule),
  ``micro_batch_size`` (1, per rank), ``gradient_accumulation_steps`` (1), ``max_grad_norm`` (1; 0: no
  clipping), ``seed`` (42), ``shuffle`` (true), ``precision`` (auto: bf16 on GPU, fp32 on CPU | bf16 |
  fp32), ``gradient_checkpointing`` (true), ``save_steps`` (null: at the end only), ``save_total_limit``
  (null: keep all), ``resume_from`` (null | latest | a checkpoint directory), ``logging_steps`` (1),
  ``tensorboard`` (auto: when installed | true | false), ``progress_bar`` (true), ``num_workers`` (0),
  ``save_final_model`` (true).

Overrides are ``section.key=value`` (``deepspeed=value`` for the deepspeed section, ``data.synthetic.seed=3``
for a nested key) with the value read as YAML: numbers, true / false, lists, null.

The loader is strict, because a misspelt key or a quoted ``"false"`` would otherwise train the wrong run
silently: unknown sections and keys, values of the wrong type (booleans must be YAML true / false; ``yes``,
``"false"`` and 0 / 1 are refused; an int is accepted for a float, a boolean never counts as a number) and
values out of range raise :class:`RunConfigError` (a ``ValueError``) that lists every problem of the file,
one line each, by dotted key, with what was expected and what came. YAML is read with ``1e-6`` as a float and
only true / false as booleans, and a key given twice is refused.

Input paths (model, data, processor, precomputed reference, DeepSpeed JSON) are looked up beside the config
file first, then as given (:meth:`RunConfig.resolve_path`); ``training.output_dir`` is relative to the working
directory.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from firempo_kernels.losses import LOSS_PRESETS, VISUAL_PAIRINGS

__all__ = [
    "SECTIONS", "SHIPPED_DEEPSPEED_CONFIGS", "REFERENCE_MODES", "RunConfigError",
    "ModelSection", "LoraSection", "ReferenceSection", "LossSection", "DataSection", "TrainingSection",
    "RunConfig", "load_run_config", "run_config_from_dict", "apply_overrides",
]

SECTIONS: tuple[str, ...] = ("model", "lora", "reference", "loss", "data", "deepspeed", "training")
"""The sections of a run config, in the order :meth:`RunConfig.to_dict` writes them."""

SHIPPED_DEEPSPEED_CONFIGS: tuple[str, ...] = ("zero3", "zero3_offload")
"""DeepSpeed configs shipped in ``integrations/configs`` (``<name>.json``), named without a path."""

REFERENCE_MODES: tuple[str, ...] = ("auto", "model", "adapters_disabled", "precomputed")

_DEFAULT_DEEPSPEED = "zero3"


class RunConfigError(ValueError):
    """A run config that cannot be used; ``problems`` holds one line per problem, each led by its dotted key."""

    def __init__(self, problems: Sequence[str], source: str | os.PathLike | None = None) -> None:
        self.problems: list[str] = list(problems)
        self.source: str | None = None if source is None else str(source)
        where = f"run config {self.source}" if self.source else "run config"
        count = f"{len(self.problems)} problem{'' if len(self.problems) == 1 else 's'}"
        super().__init__(f"invalid {where} ({count}):\n" + "\n".join(f"  {p}" for p in self.problems))

    def __reduce__(self):
        # Rebuilt from its parts, not from the formatted message (e.g. when a launcher pickles it across ranks).
        return (type(self), (self.problems, self.source))


# ---------------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"


def _yaml_loader():
    """PyYAML's safe loader with three changes for configs written by hand.

    - ``1e-6`` reads as a float: YAML 1.1 wants ``1.0e-6``, so learning rates written the usual way would
      arrive as strings.
    - Only true / false (any case) are booleans: YAML 1.1 also reads yes / no / on / off as booleans, which
      would let a boolean key take ``yes`` and a string key turn ``no`` into false; here they stay strings,
      which a boolean key refuses.
    - A key given twice is an error: PyYAML keeps the last one, so a second ``training:`` section would
      silently replace the first.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: set[str] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    continue  # a non-string key is refused later, as an unknown key
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    # The class-level table is shared with SafeLoader; this copy keeps the changes to this loader.
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    Loader.add_implicit_resolver(
        _FLOAT_TAG,
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.nan)$", re.X | re.I),
        list("-+0123456789."),
    )
    return Loader


_LOADER = None


def _parse_yaml(text: str) -> Any:
    global _LOADER
    import yaml

    if _LOADER is None:  # built once: overrides parse one value each
        _LOADER = _yaml_loader()
    return yaml.load(text, Loader=_LOADER)


def _json_object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise ValueError(f"found the key {key!r} twice")
        mapping[key] = value
    return mapping


# ---------------------------------------------------------------------------------------------------
# Value rules
# ---------------------------------------------------------------------------------------------------

# A rule checks one value: it returns the value in its stored form (an int given for a float becomes a
# float, a list of betas a tuple) or appends a problem line naming `key` and returns the value unchanged.
_Rule = Callable[[Any, str, list[str]], Any]


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _refuse(problems: list[str], key: str, expected: str, value: Any) -> Any:
    problems.append(f"{key}: expected {expected}; got {_got(value)}")
    return value


class _Check:
    """A rule from a predicate, an optional conversion and the words for what it expects."""

    def __init__(self, expected: str, accept: Callable[[Any], bool], convert: Callable[[Any], Any] | None = None,
                 *, nullable: bool = False) -> None:
        self.expected, self.accept, self.convert, self.nullable = expected, accept, convert, nullable

    def __call__(self, value: Any, key: str, problems: list[str]) -> Any:
        if value is None and self.nullable:
            return None
        if not self.accept(value):
            return _refuse(problems, key, self.expected + (", or null" if self.nullable else ""), value)
        return self.convert(value) if self.convert else value

    def or_null(self) -> _Check:
        return _Check(self.expected, self.accept, self.convert, nullable=True)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # Booleans are ints to Python; a `true` where a learning rate belongs is a mistake, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_from(low: int) -> _Check:
    return _Check(f"an integer >= {low}", lambda v: _is_int(v) and v >= low)


def _number(expected: str, within: Callable[[float], bool]) -> _Check:
    return _Check(expected, lambda v: _is_number(v) and within(v), float)


def _choice(options: Sequence[str]) -> _Check:
    return _Check("one of " + ", ".join(repr(o) for o in options), lambda v: isinstance(v, str) and v in options)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value)


_BOOL = _Check("true or false", lambda v: isinstance(v, bool))
_TEXT = _Check("a non-empty string", lambda v: isinstance(v, str) and v != "")
_INT = _Check("an integer", _is_int)
_POSITIVE = _number("a finite number > 0", lambda v: v > 0)
_NON_NEGATIVE = _number("a finite number >= 0", lambda v: v >= 0)
_FRACTION = _number("a number in [0, 1]", lambda v: 0 <= v <= 1)
_NAMES = _Check("a list of module names", _is_str_list, list)
_TARGETS = _Check(
    "a list of module names or one regular expression",
    lambda v: (isinstance(v, str) and v != "") or _is_str_list(v),
    lambda v: v if isinstance(v, str) else list(v),
)
_MAPPING = _Check("a mapping with string keys", lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
                  lambda v: copy.deepcopy(dict(v)))
_DATASET = _Check(
    "'package.module:factory' (':factory' defaults to build_dataset)",
    lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_]\w*)?", v) is not None,
)
_ADAM_BETAS = _Check(
    "two numbers in [0, 1), e.g. [0.9, 0.999]",
    lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
    lambda v: tuple(float(b) for b in v),
)
_TENSORBOARD = _Check("true, false or 'auto'", lambda v: isinstance(v, bool) or v == "auto")
_DEEPSPEED = _Check(
    "'zero3', 'zero3_offload' or a DeepSpeed JSON path",
    lambda v: isinstance(v, str) and v != "", nullable=True,
)


def _tiny_family(value: Any, key: str, problems: list[str]) -> Any:
    if value is None:
        return None
    # Imported here: the families live with the tiny models, which nothing else of this module needs.
    from .smoke import TINY_FAMILIES

    return _choice(TINY_FAMILIES).or_null()(value, key, problems)


def _synthetic(value: Any, key: str, problems: list[str]) -> Any:
    """The arguments of the smoke data generator (all but its first, the model), checked against its signature
    so a misspelt one fails here and not after the model is built: ``smoke.synthetic_rows`` where it exists,
    else ``smoke.synthetic_examples``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return _refuse(problems, key, "a mapping of synthetic-data arguments (num_examples, seed, ...), or null",
                       value)
    from . import smoke

    generator = getattr(smoke, "synthetic_rows", None) or smoke.synthetic_examples
    params = list(inspect.signature(generator).parameters.values())[1:]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)  # **kwargs: any name may be right
    by_name = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    # Annotations are strings under `from __future__ import annotations`; plain ones are checked, others not.
    simple = {"int": _INT, "str": _TEXT, "float": _NON_NEGATIVE, "bool": _BOOL}
    for name, item in value.items():
        if name in by_name:
            annotation = by_name[name].annotation
            rule = simple.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
            if rule is not None:
                rule(item, f"{key}.{name}", problems)
        elif not open_ended:
            problems.append(f"{key}.{name}: unknown key; known: {', '.join(sorted(by_name))}")
    for name, p in by_name.items():
        if p.default is inspect.Parameter.empty and name not in value:
            problems.append(f"{key}.{name}: required; not set")
    return copy.deepcopy(dict(value))


def _spec(rule: _Rule, default: Any = MISSING, *, factory: Callable[[], Any] | Any = MISSING,
          key: str | None = None) -> Any:
    """A section field: its rule, its default and, where it differs from the field name, its key in the file."""
    return field(default=default, default_factory=factory, metadata={"rule": rule, "key": key})


def _key(f) -> str:
    return f.metadata.get("key") or f.name


def _plain(value: Any) -> Any:
    """A JSON-able copy: tuples become lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------

_S = TypeVar("_S", bound="_Section")


@dataclass
class _Section:
    """Checks every field on construction (from a file or in code alike) and reads / writes the file's keys."""

    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in fields(self):
            setattr(self, f.name, f.metadata["rule"](getattr(self, f.name), f"{self.NAME}.{_key(f)}", problems))
        if problems:
            raise RunConfigError(problems)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys of this section in a run config file."""
        return tuple(_key(f) for f in fields(cls))

    @classmethod
    def _from_raw(cls: type[_S], raw: Any, problems: list[str]) -> _S | None:
        """The section from its mapping in a file; problems go to ``problems`` (all of them: unknown keys and
        bad values alike) and give None."""
        if raw is None:  # `lora:` with every key commented out
            raw = {}
        if not isinstance(raw, Mapping):
            problems.append(f"{cls.NAME}: expected a mapping of {cls.NAME} keys; got {_got(raw)}")
            return None
        names = {_key(f): f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = False
        for key, value in raw.items():
            if key in names:
                kwargs[names[key]] = value
            else:
                unknown = True
                problems.append(f"{cls.NAME}.{key}: unknown key; known: {', '.join(sorted(names))}")
        try:
            section = cls(**kwargs)
        except RunConfigError as e:
            problems.extend(e.problems)
            return None
        return None if unknown else section

    def to_dict(self) -> dict[str, Any]:
        """This section as it is written in a run config file (every key, JSON-able)."""
        return {_key(f): _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass
class ModelSection(_Section):
    """``model``: the policy (a checkpoint, or a tiny random model for smoke runs)."""

    NAME: ClassVar[str] = "model"

    name_or_path: str | None = _spec(_TEXT.or_null(), None)  #: local folder or hub id
    tiny: str | None = _spec(_tiny_family, None)  #: a tiny random model of this family; wins over name_or_path
    seed: int = _spec(_INT, 0)  #: the weights of a tiny model
    class_name: str = _spec(_TEXT, "auto", key="class")  #: a transformers class name, or auto
    attn_implementation: str = _spec(_TEXT, "auto")  #: auto: flash_attention_2 with flash-attn on a GPU, else sdpa
    freeze_vision: bool = _spec(_BOOL, True)  #: keep the vision tower and projector frozen
    train_lm_head: bool = _spec(_BOOL, True)
    trust_remote_code: bool = _spec(_BOOL, False)


@dataclass
class LoraSection(_Section):
    """``lora``: LoRA adapters on the policy (the base model, head included, is then frozen)."""

    NAME: ClassVar[str] = "lora"

    enabled: bool = _spec(_BOOL, False)
    r: int = _spec(_int_from(1), 16)
    alpha: float = _spec(_POSITIVE, 32.0)
    dropout: float = _spec(_number("a number in [0, 1)", lambda v: 0 <= v < 1), 0.05)
    #: null: the attention and MLP projections of the language model (the vision tower keeps no adapter)
    target_modules: list[str] | str | None = _spec(_TARGETS.or_null(), None)
    modules_to_save: list[str] | None = _spec(_NAMES.or_null(), None)

    @classmethod
    def _from_raw(cls, raw: Any, problems: list[str]) -> LoraSection | None:
        # Writing LoRA options means wanting LoRA: a section with keys but no `enabled` turns it on.
        if isinstance(raw, Mapping) and raw and "enabled" not in raw:
            raw = {**raw, "enabled": True}
        return super()._from_raw(raw, problems)


@dataclass
class ReferenceSection(_Section):
    """``reference``: where the reference log-probs come from; model keys left null are the policy's."""

    NAME: ClassVar[str] = "reference"

    mode: Literal["auto", "model", "adapters_disabled", "precomputed"] = _spec(_choice(REFERENCE_MODES), "auto")
    name_or_path: str | None = _spec(_TEXT.or_null(), None)
    tiny: str | None = _spec(_tiny_family, None)
    class_name: str | None = _spec(_TEXT.or_null(), None, key="class")
    seed: int | None = _spec(_INT.or_null(), None)
    precomputed_dir: str | None = _spec(_TEXT.or_null(), None)  #: null: beside data.path, <data>.reference


@dataclass
class LossSection(_Section):
    """``loss``: a preset of :data:`~firempo_kernels.losses.LOSS_PRESETS` and the values that replace its own
    (null: the preset's)."""

    NAME: ClassVar[str] = "loss"

    preset: Literal["firempo", "rrpo", "mask_dpo", "dpo"] = _spec(_choice(tuple(LOSS_PRESETS)), "firempo")
    beta: float | None = _spec(_POSITIVE.or_null(), None)
    alpha: float | None = _spec(_NON_NEGATIVE.or_null(), None)
    gamma: float | None = _spec(_NON_NEGATIVE.or_null(), None)
    lambda_: float | None = _spec(_FRACTION.or_null(), None)
    visual_pairing: str | None = _spec(_choice(VISUAL_PAIRINGS).or_null(), None)
    temperature: float | None = _spec(_POSITIVE.or_null(), None)

    def preset_overrides(self) -> dict[str, float | str]:
        """The values set here, for ``FiReMPOLoss.from_preset(self.preset, **self.preset_overrides())``."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "preset" and getattr(self, f.name) is not None}


@dataclass
class DataSection(_Section):
    """``data``: the preference examples; one source of ``path``, ``dataset`` or ``synthetic`` (see
    :meth:`source` for which one is used when several are set)."""

    NAME: ClassVar[str] = "data"

    path: str | None = _spec(_TEXT.or_null(), None)  #: preference records JSONL
    dataset: str | None = _spec(_DATASET.or_null(), None)  #: "package.module:factory"
    kwargs: dict[str, Any] = _spec(_MAPPING, factory=dict)  #: arguments of the dataset factory
    synthetic: dict[str, Any] | None = _spec(_synthetic, None)  #: arguments of smoke.synthetic_examples
    prompt_template: str | None = _spec(_TEXT.or_null(), None)
    use_corrupted: bool = _spec(_BOOL, True)
    on_error: Literal["raise", "skip"] = _spec(_choice(("raise", "skip")), "raise")
    boundary: Literal["error", "expand"] = _spec(_choice(("error", "expand")), "error")
    processor: str | None = _spec(_TEXT.or_null(), None)  #: null: model.name_or_path
    pad_to_multiple_of: int | None = _spec(_int_from(1).or_null(), None)
    pad_token_id: int | None = _spec(_int_from(0).or_null(), None)

    def source(self) -> Literal["synthetic", "dataset", "path"] | None:
        """The source used: ``synthetic`` before ``dataset`` before ``path``, so overriding a real config with
        ``data.synthetic.num_examples=4`` makes a smoke run of it."""
        if self.synthetic is not None:
            return "synthetic"
        if self.dataset is not None:
            return "dataset"
        if self.path is not None:
            return "path"
        return None


@dataclass
class TrainingSection(_Section):
    """``training``: the trainer options, turned into the ``TrainingArguments`` fields of a
    :class:`~firempo_kernels.integrations.trl.FiReMPOConfig` by :func:`~firempo_kernels.integrations.train.training_arguments`."""

    NAME: ClassVar[str] = "training"

    output_dir: str = _spec(_TEXT, "runs/firempo")  #: relative to the working directory
    epochs: int = _spec(_int_from(1), 1)
    max_steps: int | None = _spec(_int_from(1).or_null(), None)  #: null: the epochs decide
    learning_rate: float = _spec(_NON_NEGATIVE, 1e-6)
    weight_decay: float = _spec(_NON_NEGATIVE, 0.0)
    adam_betas: tuple[float, float] = _spec(_ADAM_BETAS, (0.9, 0.999))
    adam_eps: float = _spec(_NON_NEGATIVE, 1e-8)
    warmup_ratio: float = _spec(_FRACTION, 0.0)
    min_lr_ratio: float = _spec(_FRACTION, 0.0)
    micro_batch_size: int = _spec(_int_from(1), 1)  #: examples per rank per micro-batch
    gradient_accumulation_steps: int = _spec(_int_from(1), 1)
    max_grad_norm: float = _spec(_NON_NEGATIVE, 1.0)  #: 0 turns clipping off
    seed: int = _spec(_INT, 42)
    shuffle: bool = _spec(_BOOL, True)
    precision: Literal["auto", "bf16", "fp32"] = _spec(_choice(("auto", "bf16", "fp32")), "auto")
    gradient_checkpointing: bool = _spec(_BOOL, True)
    save_steps: int | None = _spec(_int_from(1).or_null(), None)  #: checkpoint every n steps (and at the end)
    save_total_limit: int | None = _spec(_int_from(1).or_null(), None)  #: keep only the newest n checkpoints
    resume_from: str | None = _spec(_TEXT.or_null(), None)  #: "latest" or a checkpoint directory
    #: an output_dir that already holds a run is refused unless resumed, or started over with this set
    overwrite_output_dir: bool = _spec(_BOOL, False)
    logging_steps: int = _spec(_int_from(1), 1)
    tensorboard: bool | Literal["auto"] = _spec(_TENSORBOARD, "auto")  #: auto: on if tensorboard is installed
    progress_bar: bool = _spec(_BOOL, True)
    num_workers: int = _spec(_int_from(0), 0)
    save_final_model: bool = _spec(_BOOL, True)
    #: chosen and rejected rows share the forward of their common prefix (image and question)
    shared_prefix: bool = _spec(_BOOL, True)


_SECTION_TYPES: dict[str, type[_Section]] = {
    "model": ModelSection, "lora": LoraSection, "reference": ReferenceSection, "loss": LossSection,
    "data": DataSection, "training": TrainingSection,
}


def _together_problems(model: ModelSection | None, lora: LoraSection | None, reference: ReferenceSection | None,
                       data: DataSection | None) -> list[str]:
    """What no single section can tell; a section that failed its own checks (None) is left out."""
    problems: list[str] = []
    if model is not None and model.name_or_path is None and model.tiny is None:
        problems.append("model.name_or_path: required (or model.tiny for a tiny random model); neither is set")
    if data is not None and data.source() is None:
        problems.append("data: expected one of data.path, data.dataset or data.synthetic; none is set")
    if reference is not None and reference.mode == "adapters_disabled" and lora is not None and not lora.enabled:
        problems.append("reference.mode: 'adapters_disabled' needs LoRA (lora.enabled: true); LoRA is off")
    if (reference is not None and reference.mode == "precomputed" and reference.precomputed_dir is None
            and data is not None and data.path is None):
        problems.append("reference.precomputed_dir: required for reference.mode 'precomputed' when data.path is "
                        "not set (the store defaults to beside data.path)")
    return problems


# ---------------------------------------------------------------------------------------------------
# The run config
# ---------------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    """A whole run: the sections, the DeepSpeed config and the folder input paths are looked up in first."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    loss: LossSection = field(default_factory=LossSection)
    data: DataSection = field(default_factory=DataSection)
    deepspeed: str | None = _DEFAULT_DEEPSPEED  #: zero3 | zero3_offload | a JSON path | None: no DeepSpeed
    training: TrainingSection = field(default_factory=TrainingSection)
    base_dir: Path = field(default_factory=Path.cwd)  #: the config file's folder (absolute)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name, kind in _SECTION_TYPES.items():
            if not isinstance(getattr(self, name), kind):
                _refuse(problems, name, f"a {kind.__name__}", getattr(self, name))
        self.deepspeed = _DEEPSPEED(self.deepspeed, "deepspeed", problems)
        if not isinstance(self.base_dir, (str, os.PathLike)):
            _refuse(problems, "base_dir", "a folder path", self.base_dir)
        if problems:
            raise RunConfigError(problems)
        self.base_dir = Path(self.base_dir).expanduser().resolve()
        problems = _together_problems(self.model, self.lora, self.reference, self.data)
        if problems:
            raise RunConfigError(problems)

    def resolve_path(self, value: str | os.PathLike | None) -> str | None:
        """An input path: beside the config file if it exists there, else as given (a hub id stays a hub id).

        Not for ``training.output_dir``, which is relative to the working directory.
        """
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute() and (self.base_dir / path).exists():
            return str(self.base_dir / path)
        return str(path)

    def processor_path(self) -> str | None:
        """Where the processor of ``data.path`` loads from: ``data.processor``, else ``model.name_or_path``."""
        return self.resolve_path(self.data.processor or self.model.name_or_path)

    def deepspeed_spec(self) -> str | None:
        """What to load the DeepSpeed config from: a shipped name as is, else the resolved JSON path; None
        for no DeepSpeed."""
        if self.deepspeed is None or self.deepspeed in SHIPPED_DEEPSPEED_CONFIGS:
            return self.deepspeed
        return self.resolve_path(self.deepspeed)

    def reference_mode(self) -> Literal["model", "adapters_disabled", "precomputed"]:
        """``reference.mode`` with auto decided: adapters_disabled with LoRA, else model."""
        if self.reference.mode == "auto":
            return "adapters_disabled" if self.lora.enabled else "model"
        return self.reference.mode  # type: ignore[return-value]

    def reference_model(self) -> ModelSection:
        """The model section of a separate reference model: the policy's, with the reference's keys on top.

        A reference that names its own model (``name_or_path`` or ``tiny``) replaces both of the policy's, so a
        tiny policy does not shadow a reference checkpoint; ``class`` then defaults to auto.
        """
        ref, model = self.reference, self.model
        own = ref.name_or_path is not None or ref.tiny is not None
        return replace(
            model,
            name_or_path=ref.name_or_path if own else model.name_or_path,
            tiny=ref.tiny if own else model.tiny,
            class_name=ref.class_name or ("auto" if own else model.class_name),
            seed=model.seed if ref.seed is None else ref.seed,
        )

    def precomputed_dir(self) -> str:
        """The precomputed-reference store: ``reference.precomputed_dir``, else beside ``data.path``
        (``data/prefs.jsonl`` -> ``data/prefs.reference``)."""
        if self.reference.precomputed_dir is not None:
            return self.resolve_path(self.reference.precomputed_dir)  # type: ignore[return-value]
        if self.data.path is not None:
            return str(Path(self.resolve_path(self.data.path)).with_suffix("")) + ".reference"  # type: ignore[arg-type]
        raise ValueError("reference.precomputed_dir: required when data.path is not set")

    def to_dict(self) -> dict[str, Any]:
        """Every section with every key, as a run config file holds them (JSON-able; ``base_dir`` is not part
        of it): ``run_config_from_dict(run.to_dict(), run.base_dir) == run``."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out[name] = self.deepspeed if name == "deepspeed" else getattr(self, name).to_dict()
        return out


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

def _apply_overrides(config: dict[str, Any], overrides: Sequence[str], problems: list[str]) -> None:
    import yaml

    if isinstance(overrides, str):  # a lone string would be read one character at a time
        overrides = [overrides]
    for item in overrides:
        if not isinstance(item, str):
            problems.append(f"override {item!r}: expected a string section.key=value")
            continue
        dotted, sep, text = item.partition("=")
        keys = [k.strip() for k in dotted.split(".")]
        if not sep or not all(keys):
            problems.append(f"override {item!r}: expected section.key=value (deepspeed=value for deepspeed)")
            continue
        if keys[0] not in SECTIONS:
            problems.append(f"{dotted.strip()}: unknown section {keys[0]!r} in override {item!r}; "
                            f"known: {', '.join(SECTIONS)}")
            continue
        try:
            value = _parse_yaml(text)
        except yaml.YAMLError as e:
            problems.append(f"{dotted.strip()}: the value of override {item!r} is not valid YAML "
                            f"({str(e).splitlines()[0]})")
            continue
        node = config
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                problems.append(f"{dotted.strip()}: override {item!r} sets a key inside "
                                f"{'.'.join(keys[:depth + 1])}, which is {_got(child)}, not a section")
                break
            node = child
        else:
            node[keys[-1]] = value


def apply_overrides(mapping: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of a raw run-config mapping with ``section.key=value`` overrides applied (values read as YAML);
    nothing else is checked here. Raises :class:`RunConfigError` listing every malformed override."""
    config = copy.deepcopy(dict(mapping))
    problems: list[str] = []
    _apply_overrides(config, overrides, problems)
    if problems:
        raise RunConfigError(problems)
    return config


def _build(raw: Any, base_dir: str | os.PathLike, overrides: Sequence[str], source: str | None) -> RunConfig:
    if not isinstance(raw, Mapping):
        raise RunConfigError([f"(top level): expected a mapping of sections ({', '.join(SECTIONS)}); "
                              f"got {_got(raw)}"], source)
    config = copy.deepcopy(dict(raw))  # the caller's mapping stays as it was
    problems: list[str] = []
    _apply_overrides(config, overrides, problems)
    for name in config:
        if name not in SECTIONS:
            problems.append(f"{name}: unknown section; known: {', '.join(SECTIONS)}")
    sections = {name: kind._from_raw(config.get(name), problems) for name, kind in _SECTION_TYPES.items()}
    deepspeed = _DEEPSPEED(config.get("deepspeed", _DEFAULT_DEEPSPEED), "deepspeed", problems)
    problems += _together_problems(sections["model"], sections["lora"], sections["reference"], sections["data"])
    if problems:
        raise RunConfigError(problems, source)
    return RunConfig(**sections, deepspeed=deepspeed, base_dir=Path(base_dir))  # type: ignore[arg-type]


def run_config_from_dict(mapping: Mapping[str, Any], base_dir: str | os.PathLike = ".",
                         overrides: Sequence[str] = ()) -> RunConfig:
    """A :class:`RunConfig` from a mapping of sections (e.g. ``RunConfig.to_dict()``), with ``overrides``
    applied first; relative input paths are looked up in ``base_dir`` first. Raises :class:`RunConfigError`
    listing every problem."""
    return _build(mapping, base_dir, overrides, None)


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config file (``.json``: JSON, anything else: YAML), apply ``section.key=value``
    ``overrides`` and check it all.

    Raises:
        FileNotFoundError: no file at ``path``.
        RunConfigError: (a ``ValueError``) the file does not parse, or one line per problem of the file and
            the overrides together.
    """
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no run config at {path}")
    text = path.read_text(encoding="utf-8")
    is_json = path.suffix.lower() == ".json"
    try:
        raw = json.loads(text, object_pairs_hook=_json_object_without_duplicates) if is_json else _parse_yaml(text)
    except (ValueError, yaml.YAMLError) as e:
        raise RunConfigError([f"(file): not valid {'JSON' if is_json else 'YAML'}: {e}"], path) from e
    if raw is None:  # an empty file: every problem of a missing model and data is reported below
        raw = {}
    return _build(raw, path.resolve().parent, overrides, str(path))

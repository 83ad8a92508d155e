"""The command line of ``firempo-train``: TRL's recipe format, read by :class:`trl.TrlParser`.

A recipe is a flat YAML mapping of the keys of three dataclasses, as ``trl dpo --config recipe.yaml`` reads
them: :class:`~.trl.FiReMPOConfig` (``DPOConfig``, hence ``TrainingArguments``, plus ``preset``, ``alpha``,
``gamma``, ``lambda_``, ``visual_pairing``, ``reference_mode``, ...), TRL's :class:`~trl.ModelConfig`
(``model_name_or_path``, ``dtype``, ``attn_implementation``, ``use_peft``, ``lora_r``, ...) and
:class:`FiReMPOScriptArguments` (the data, the models for smoke runs, the run folder). Every key means what
TRL and transformers document; ``--key value`` on the command line wins over the file.

Two things differ from ``TrlParser.parse_args_and_config``, both so that a mistake is one clear message:
the file's values go through the same argument types as the command line (TRL sets them as defaults, which
argparse never checks), and every unknown key and wrong value of the file and the command line is reported
together, each by its key, as a :class:`RecipeError` (a ``ValueError``: ``firempo-train`` prints it and
exits with code 2). ``deepspeed: zero1`` / ``zero2`` / ``zero3`` / ``zero3_offload`` name the DeepSpeed configs shipped beside this
module.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trl import ModelConfig, TrlParser

from .trl import FiReMPOConfig

__all__ = ["FiReMPOScriptArguments", "RecipeError", "RecipeParser", "SHIPPED_DEEPSPEED_CONFIGS", "parse_recipe",
           "recipe_argv", "OLD_KEYS"]

CONFIGS = Path(__file__).parent / "configs"
SHIPPED_DEEPSPEED_CONFIGS: tuple[str, ...] = ("zero1", "zero2", "zero3", "zero3_offload")
"""DeepSpeed configs shipped in ``integrations/configs`` (``<name>.json``), named without a path."""


class RecipeError(ValueError):
    """A recipe or command line that cannot be used; ``problems`` holds one line per problem, each led by its
    key."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems, self.source = list(problems), source
        where = f" (recipe {source} and the command line)" if source else ""
        super().__init__(f"{len(self.problems)} problem(s){where}: " + "; ".join(self.problems))

    def __reduce__(self):
        return (type(self), (self.problems, self.source))


@dataclass
class FiReMPOScriptArguments:
    """The keys of a recipe that are neither ``FiReMPOConfig``'s nor ``ModelConfig``'s: the data, tiny models for
    smoke runs, and how the run folder is treated. One data source: ``synthetic_examples`` before
    ``dataset_factory`` before ``data_path``, so a smoke override needs no deletion."""

    data_path: str | None = field(default=None, metadata={"help": "preference records (JSONL with <mask> tags)"})
    dataset_factory: str | None = field(
        default=None, metadata={"help": "'package.module:factory' returning the training Dataset (':build_dataset' "
                                        "when no factory is named); called with dataset_kwargs"})
    dataset_kwargs: dict | str | None = field(default=None, metadata={"help": "keyword arguments of dataset_factory"})
    synthetic_examples: int | None = field(default=None, metadata={"help": "random examples (smoke runs)"})
    synthetic_seed: int = field(default=0, metadata={"help": "seed of the random examples"})
    synthetic_corrupted_every: int = field(default=1, metadata={"help": "every n-th random example has a v'"})
    processor_name_or_path: str | None = field(default=None, metadata={"help": "default: model_name_or_path"})
    prompt_template: str | None = field(default=None, metadata={"help": "default: the chat template"})
    use_corrupted: bool = field(default=True, metadata={"help": "use the records' corrupted images (v')"})
    on_error: Literal["raise", "skip"] = field(default="raise", metadata={"help": "a bad record: raise or skip"})
    boundary: Literal["error", "expand"] = field(default="error", metadata={"help": "a token cut by a tag"})
    tiny_model: str | None = field(default=None, metadata={"help": "a tiny random model of this family (smoke "
                                                                   "runs); wins over model_name_or_path"})
    tiny_seed: int = field(default=0, metadata={"help": "the weights of the tiny model"})
    tiny_tie_word_embeddings: bool = field(default=False, metadata={
        "help": "the tiny model's head is its input embedding, as in Gemma-family checkpoints"})
    model_class: str = field(default="auto", metadata={"help": "a transformers class name, or auto"})
    reference_model_name_or_path: str | None = field(default=None, metadata={"help": "default: the policy's"})
    reference_tiny_seed: int | None = field(default=None, metadata={"help": "the weights of a tiny reference model "
                                                                            "(default: tiny_seed)"})
    freeze_vision: bool = field(default=True, metadata={"help": "keep the vision tower and projector frozen"})
    train_lm_head: bool = field(default=True, metadata={"help": "train the output head (not with use_peft)"})
    save_final_model: bool = field(default=True, metadata={"help": "save the model to <output_dir>/final"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start over in an output_dir that holds a run (its files are deleted)"})
    precompute_reference: bool = field(default=False, metadata={"help": "build the reference store and exit"})
    traceback: bool = field(default=False, metadata={"help": "show the traceback of an error"})

    def __post_init__(self) -> None:
        if isinstance(self.dataset_kwargs, str):
            try:
                self.dataset_kwargs = json.loads(self.dataset_kwargs)
            except ValueError as e:
                raise RecipeError([f"dataset_kwargs: expected a JSON object; got {self.dataset_kwargs!r} ({e})"])
        if self.dataset_kwargs is not None and not isinstance(self.dataset_kwargs, dict):
            raise RecipeError([f"dataset_kwargs: expected a mapping; got {self.dataset_kwargs!r}"])
        if self.dataset_factory is not None and not re.fullmatch(
                r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_]\w*)?", self.dataset_factory):
            raise RecipeError([f"dataset_factory: expected 'package.module:factory'; got {self.dataset_factory!r}"])
        if self.tiny_model is not None:
            from .smoke import TINY_FAMILIES

            if self.tiny_model not in TINY_FAMILIES:
                raise RecipeError([f"tiny_model: expected one of {', '.join(TINY_FAMILIES)}; got {self.tiny_model!r}"])

    def source(self) -> Literal["synthetic", "dataset", "path"] | None:
        """Which data source is used (see the class)."""
        if self.synthetic_examples is not None:
            return "synthetic"
        if self.dataset_factory is not None:
            return "dataset"
        return "path" if self.data_path is not None else None


# The sectioned run configs of earlier releases: each key, the recipe key(s) that replaced it and, where the
# value changes form, how.
OLD_KEYS: dict[str, tuple[str, str]] = {
    "model.name_or_path": ("model_name_or_path", ""), "model.tiny": ("tiny_model", ""), "model.seed": ("tiny_seed", ""),
    "model.class": ("model_class", ""), "model.attn_implementation": ("attn_implementation", "unset: auto"),
    "model.freeze_vision": ("freeze_vision", ""), "model.train_lm_head": ("train_lm_head", ""),
    "model.trust_remote_code": ("trust_remote_code", ""), "lora.enabled": ("use_peft", ""), "lora.r": ("lora_r", ""),
    "lora.alpha": ("lora_alpha", ""), "lora.dropout": ("lora_dropout", ""),
    "lora.target_modules": ("lora_target_modules", ""), "lora.modules_to_save": ("lora_modules_to_save", ""),
    "reference.mode": ("reference_mode", ""), "reference.name_or_path": ("reference_model_name_or_path", ""),
    "reference.seed": ("reference_tiny_seed", ""), "reference.precomputed_dir": ("precomputed_reference_dir", ""),
    "loss.preset": ("preset", ""), "loss.beta": ("beta", ""), "loss.alpha": ("alpha", ""),
    "loss.gamma": ("gamma", ""), "loss.lambda_": ("lambda_", ""), "loss.visual_pairing": ("visual_pairing", ""),
    "data.path": ("data_path", ""), "data.dataset": ("dataset_factory", ""), "data.kwargs": ("dataset_kwargs", ""),
    "data.synthetic": ("synthetic_examples, synthetic_seed, synthetic_corrupted_every", ""),
    "data.processor": ("processor_name_or_path", ""), "data.prompt_template": ("prompt_template", ""),
    "data.use_corrupted": ("use_corrupted", ""), "data.on_error": ("on_error", ""), "data.boundary": ("boundary", ""),
    "data.pad_to_multiple_of": ("pad_to_multiple_of", ""),
    "deepspeed": ("deepspeed", "no longer on by default; null: leave it out"),
    "training.output_dir": ("output_dir", ""), "training.epochs": ("num_train_epochs", ""),
    "training.max_steps": ("max_steps", ""), "training.learning_rate": ("learning_rate", ""),
    "training.weight_decay": ("weight_decay", ""), "training.adam_betas": ("adam_beta1, adam_beta2", ""),
    "training.adam_eps": ("adam_epsilon", ""), "training.warmup_ratio": ("warmup_steps", "below 1: a share of the run"),
    "training.min_lr_ratio": ("lr_scheduler_type, lr_scheduler_kwargs",
                              "cosine_with_min_lr and {min_lr_rate: ratio}"),
    "training.micro_batch_size": ("per_device_train_batch_size", ""),
    "training.gradient_accumulation_steps": ("gradient_accumulation_steps", ""),
    "training.max_grad_norm": ("max_grad_norm", ""), "training.seed": ("seed", ""),
    "training.shuffle": ("train_sampling_strategy", "random or sequential"), "training.precision": ("bf16", ""),
    "training.gradient_checkpointing": ("gradient_checkpointing", ""), "training.save_steps": ("save_steps", ""),
    "training.save_total_limit": ("save_total_limit", ""), "training.resume_from": ("resume_from_checkpoint", ""),
    "training.overwrite_output_dir": ("overwrite_output_dir", ""), "training.logging_steps": ("logging_steps", ""),
    "training.tensorboard": ("report_to", "tensorboard or none"),
    "training.progress_bar": ("disable_tqdm", "the opposite"), "training.num_workers": ("dataloader_num_workers", ""),
    "training.save_final_model": ("save_final_model", ""), "training.shared_prefix": ("shared_prefix", ""),
}
_SECTIONS = ("model", "lora", "reference", "loss", "data", "training")


def _old_config_message(config: Mapping[str, Any], source: str) -> str | None:
    """The new keys of a sectioned run config of an earlier release, or None if it is not one."""
    if not any(isinstance(config.get(s), Mapping) for s in _SECTIONS):
        return None
    found = [f"{s}.{k}" for s in _SECTIONS if isinstance(config.get(s), Mapping) for k in config[s]]
    found += ["deepspeed"] if "deepspeed" in config else []
    lines = []
    for key in found:
        new, note = OLD_KEYS.get(key, ("(no recipe key)", ""))
        lines.append(f"{key} -> {new}" + (f" ({note})" if note else ""))
    return (f"{source} is a sectioned run config of an earlier firempo-train; a recipe is flat, with TRL's keys "
            f"(docs/training.md). Its keys are now: " + "; ".join(lines))


def _yaml(text: str) -> Any:
    """YAML as TRL reads it (safe_load), except that ``1e-6`` is a float, as in JSON and Python: YAML 1.1 wants
    ``1.0e-6`` and would hand a learning rate written the usual way over as a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.nan)$", re.I),
        list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


class RecipeParser(TrlParser):
    """``TrlParser`` over ``(FiReMPOScriptArguments, FiReMPOConfig, ModelConfig)`` whose errors are one
    :class:`RecipeError` instead of a usage block and ``SystemExit``."""

    def __init__(self, prog: str = "firempo-train") -> None:
        super().__init__((FiReMPOScriptArguments, FiReMPOConfig, ModelConfig), prog=prog,
                         description="FiRe-MPO preference optimisation on TRL's DPOTrainer: a TRL DPO recipe "
                                     "(--config recipe.yaml) and --key value overrides.")

    def error(self, message: str):  # type: ignore[override]
        """One line naming the argument, raised rather than printed with the usage (``firempo-train`` exits 2)."""
        raise RecipeError([message])

    def action(self, option: str) -> argparse.Action | None:
        """The argument behind ``--option`` (either spelling), or None."""
        return self._option_string_actions.get(option)


def _check_value(action: argparse.Action, key: str, text: str, problems: list[str]) -> None:
    try:
        value = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = getattr(action.type, "__name__", "a value")
        kind = {"string_to_bool": "true or false", "int": "an integer", "float": "a number"}.get(kind, kind)
        problems.append(f"{key}: expected {kind}; got {text!r}")
        return
    if action.choices is not None and value not in action.choices:
        problems.append(f"{key}: expected one of {', '.join(map(str, action.choices))}; got {text!r}")


def _is_bool_action(action: argparse.Action) -> bool:
    return getattr(action.type, "__name__", "") == "string_to_bool" or action.nargs == 0


def _yaml_tokens(parser: RecipeParser, config: Mapping[str, Any], problems: list[str]) -> list[str]:
    """The recipe's keys as ``--key value`` tokens; a value whose YAML type cannot be the key's is refused here
    (``'false'`` for a boolean, ``'5'`` for a number), since as text it would pass."""
    tokens: list[str] = []
    for key, value in config.items():
        action = parser.action(f"--{key}") if isinstance(key, str) else None
        if action is None or key in ("config", "help"):
            problems.append(f"{key}: unknown key")
            continue
        if value is None:
            if action.default is not None:
                problems.append(f"{key}: expected a value; got null")
            continue
        if isinstance(value, list) and action.nargs != "+" and "list" in str(_field_type(key)) and len(value) == 1:
            value = value[0]  # e.g. report_to: [tensorboard], which the command line spells as one name
        values = list(value) if isinstance(value, list) and action.nargs == "+" else [value]
        for item in values:
            if _is_bool_action(action):
                ok = isinstance(item, bool)
            elif action.type in (int, float):
                ok = isinstance(item, (int, float)) and not isinstance(item, bool) and (
                    action.type is float or isinstance(item, int))
            elif isinstance(item, Mapping):
                ok = "dict" in str(_field_type(key))
            else:  # a string, or a number where the declared type also takes one (pad_to_multiple_of: int | str)
                declared = str(_field_type(key))
                ok = isinstance(item, str) or (isinstance(item, int) and not isinstance(item, bool) and "int" in declared
                                               ) or (isinstance(item, float) and "float" in declared)
            if not ok:
                problems.append(f"{key}: expected {_expected(action)}; got {item!r} ({type(item).__name__})")
                break
            _check_value(action, key, json.dumps(item) if isinstance(item, Mapping) else str(item), problems)
        else:
            tokens += [f"--{key}", *(json.dumps(v) if isinstance(v, Mapping) else str(v) for v in values)]
    return tokens


def _field_type(key: str) -> Any:
    """The declared type of a key (HfArgumentParser narrows ``Field.type`` in place, so the annotations)."""
    import typing

    for cls in (FiReMPOScriptArguments, FiReMPOConfig, ModelConfig):
        if key in cls.__dataclass_fields__:
            return typing.get_type_hints(cls).get(key)
    return None


def _expected(action: argparse.Action) -> str:
    if _is_bool_action(action):
        return "true or false"
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    return {int: "an integer", float: "a number"}.get(action.type, "a string")


def _check_tokens(parser: RecipeParser, tokens: Sequence[str], problems: list[str]) -> None:
    """Every ``--key value`` of ``tokens`` checked as argparse will read it, all problems collected."""
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--"):
            problems.append(f"{token}: expected --key value; got a value with no key")
            continue
        option, eq, inline = token.partition("=")
        action = parser.action(option)
        if action is None:
            problems.append(f"{option.removeprefix('--')}: unknown key")
            while i < len(tokens) and not tokens[i].startswith("--"):
                i += 1
            continue
        key = action.dest
        if eq:
            values = [inline]
        elif action.nargs == 0:
            values = []
        else:
            values = []
            while i < len(tokens) and not tokens[i].startswith("--") and (action.nargs == "+" or not values):
                values.append(tokens[i])
                i += 1
            if not values and action.nargs not in ("?",):
                problems.append(f"{key}: expected a value after {option}; got none")
        for text in values:
            _check_value(action, key, text, problems)


def _shipped_deepspeed(tokens: list[str]) -> list[str]:
    """``--deepspeed zero3`` -> the shipped JSON; a name that is a file where the run starts stays a path."""
    out = list(tokens)
    for i, token in enumerate(out):
        name = None
        if token == "--deepspeed" and i + 1 < len(out):
            name, at = out[i + 1], i + 1
        elif token.startswith("--deepspeed="):
            name, at = token.partition("=")[2], i
        if name in SHIPPED_DEEPSPEED_CONFIGS and not Path(name).is_file():
            path = str(CONFIGS / f"{name}.json")
            out[at] = path if at != i else f"--deepspeed={path}"
    return out


def recipe_argv(argv: Sequence[str], parser: RecipeParser | None = None) -> list[str]:
    """``argv`` with ``--config recipe.yaml`` replaced by the recipe's keys as ``--key value`` tokens ahead of
    the rest (so the command line wins), shipped DeepSpeed names resolved, and everything checked.

    Raises:
        FileNotFoundError: no recipe at the ``--config`` path.
        RecipeError: every unknown key and unreadable value of the recipe and the command line, by key; or a
            sectioned run config of an earlier release, with the keys that replaced its keys.
    """
    parser = parser or RecipeParser()
    argv = list(argv)
    problems: list[str] = []
    tokens: list[str] = []
    source = None
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        at = next(i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
        if argv[at] == "--config":
            if at + 1 >= len(argv):
                raise RecipeError(["config: expected a recipe path after --config"])
            source = argv.pop(at + 1)
        else:
            source = argv[at].partition("=")[2]
        argv.pop(at)
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--config: no recipe at {path}")
        import yaml

        try:
            config = _yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RecipeError([f"not valid YAML: {e}"], source) from None
        if not isinstance(config, Mapping):
            raise RecipeError([f"expected a mapping of recipe keys; got {type(config).__name__}"], source)
        old = _old_config_message(config, source)
        if old is not None:
            raise ValueError(old)
        env = config.get("env", {})
        if not isinstance(env, Mapping):
            problems.append(f"env: expected a mapping of environment variables; got {env!r}")
        else:
            for key, value in env.items():  # TRL's recipes may set environment variables
                os.environ[str(key)] = str(value)
        tokens = _yaml_tokens(parser, {k: v for k, v in config.items() if k != "env"}, problems)
    _check_tokens(parser, argv, problems)
    if problems:
        raise RecipeError(problems, source)
    return _shipped_deepspeed(tokens + argv)


def parse_recipe(argv: Sequence[str]) -> tuple[FiReMPOScriptArguments, FiReMPOConfig, ModelConfig]:
    """The three argument dataclasses of a ``firempo-train`` command line (see :func:`recipe_argv`)."""
    parser = RecipeParser()
    script, config, model = parser.parse_args_into_dataclasses(args=recipe_argv(argv, parser))
    return script, config, model

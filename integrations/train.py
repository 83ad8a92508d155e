"""``firempo-train``: FiRe-MPO training from a run config.

One process::

    firempo-train --config run.yaml [section.key=value ...]

Several GPUs / nodes (DeepSpeed's launcher; ``--hostfile`` for multi-node)::

    deepspeed --num_gpus 8 --module firempo_kernels.integrations.train --config run.yaml
    torchrun --nproc_per_node 8 -m firempo_kernels.integrations.train --config run.yaml

Reference pass for the precomputed-reference mode (writes safetensors shards beside the data, then exits)::

    firempo-train --config run.yaml --precompute-reference

Run config sections (YAML or JSON; see ``integrations/configs/example_run.yaml`` and ``smoke.yaml``):

- ``model``: ``name_or_path`` (local folder or hub id) or ``tiny`` (a random model of a family in
  :data:`~firempo_kernels.integrations.smoke.TINY_FAMILIES`, with ``seed``, for smoke runs); ``class``
  (transformers class name, default: auto), ``attn_implementation`` (auto: flash_attention_2 when flash-attn
  is installed and a GPU is present, else sdpa), ``freeze_vision`` (default true: vision tower and
  projector), ``train_lm_head`` (default true; with tied embeddings the input embeddings follow),
  ``trust_remote_code``.
- ``lora``: ``enabled``, ``r``, ``alpha``, ``dropout``, ``target_modules`` (default: the language model's
  attention and MLP projections), ``modules_to_save``. The base model, head included, is frozen.
- ``reference``: ``mode`` = auto | model | adapters_disabled | precomputed (auto: adapters_disabled with
  LoRA, else a frozen copy of the policy's checkpoint); ``name_or_path`` / ``tiny`` for another reference
  model; ``precomputed_dir`` (default: beside ``data.path``, ``<data>.reference``).
- ``loss``: ``preset`` (firempo, rrpo, mask_dpo, dpo) and any of ``beta``, ``alpha``, ``gamma``,
  ``lambda_``, ``visual_pairing``, ``temperature``.
- ``data``: ``path`` (preference records JSONL) with ``prompt_template``, ``use_corrupted``, ``on_error``,
  ``boundary``, ``processor``; or ``dataset: "package.module:factory"`` with ``kwargs`` (the factory returns
  a Dataset of ``PreferenceExample``, or ``(dataset, collate_fn)``); or ``synthetic`` (random examples, for
  smoke runs); ``pad_to_multiple_of``, ``pad_token_id``.
- ``deepspeed``: a JSON path or ``zero3`` / ``zero3_offload`` (shipped); "auto" fields come from ``training``.
- ``training``: :class:`~firempo_kernels.integrations.trainer.TrainerConfig` (lr 1e-6, 1 epoch, cosine, ...).

Overrides: ``section.key=value`` (``section=value`` for ``deepspeed``), values read as YAML. Input paths are
looked up beside the config file first; ``training.output_dir`` is relative to the working directory.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "load_run_config", "apply_overrides", "build_run", "choose_attn_implementation"]

_SECTIONS = ("model", "lora", "reference", "loss", "data", "deepspeed", "training")
_DEFAULT_LORA_TARGETS = (
    r"^(?!.*(?:vision_tower|vision_model|visual|multi_modal_projector|merger)).*"
    r"\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)
_VISION_PARAMS = ("vision_tower.", "vision_model.", "visual.", "multi_modal_projector.")


def _yaml_loader():
    """PyYAML's safe loader, reading ``1e-6`` as a float (YAML 1.1 wants ``1.0e-6``, so learning rates written
    the usual way would arrive as strings)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.nan)$", re.X | re.I),
        list("-+0123456789."),
    )
    return Loader


def _parse_yaml(text: str):
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


def load_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run config (YAML or JSON) and check its sections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"firempo-train: no run config at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        config = json.loads(text)
    else:
        config = _parse_yaml(text) or {}
    if not isinstance(config, dict):
        raise ValueError(f"firempo-train: {path} must hold a mapping of sections; got {type(config).__name__}")
    unknown = sorted(set(config) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"firempo-train: unknown section(s) {unknown} in {path}; known: {list(_SECTIONS)}")
    # Input paths (model, data, processor, precomputed reference, DeepSpeed JSON) are looked up beside the
    # config file first; the output directory is relative to the working directory.
    config["_base_dir"] = str(path.resolve().parent)
    return config


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` (or ``section=value``, e.g. ``deepspeed=zero3_offload``) overrides; values
    are parsed as YAML: numbers, booleans, lists, null."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        keys = dotted.split(".")
        if not sep or not all(keys):
            raise ValueError(f"firempo-train: override {item!r} must look like section.key=value")
        if keys[0] not in _SECTIONS:
            raise ValueError(f"firempo-train: override {item!r} names unknown section {keys[0]!r}; known: {list(_SECTIONS)}")
        node = config
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ValueError(
                    f"firempo-train: override {item!r}: `{'.'.join(keys[:depth + 1])}` is {child!r}, not a section"
                )
            node = child
        node[keys[-1]] = _parse_yaml(raw)
    return config


def _resolve_path(config: dict[str, Any], value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and (Path(config["_base_dir"]) / path).exists():
        return str(Path(config["_base_dir"]) / path)
    return str(path)


def choose_attn_implementation(requested: str, on_gpu: bool) -> tuple[str, str]:
    """``(implementation, reason)``: flash_attention_2 when flash-attn is installed and the model is on a GPU."""
    if requested != "auto":
        return requested, "as configured"
    if not on_gpu:
        return "sdpa", "no GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed"
    return "flash_attention_2", "flash-attn is installed"


def _load_hf_model(spec: dict[str, Any], path: str, dtype: torch.dtype, attn: str):
    import transformers

    kwargs = {"dtype": dtype, "attn_implementation": attn, "trust_remote_code": bool(spec.get("trust_remote_code"))}
    cls_name = spec.get("class")
    if cls_name and cls_name != "auto":
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            raise ValueError(f"firempo-train: model.class={cls_name!r} is not a transformers class")
        return cls.from_pretrained(path, **kwargs)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=kwargs["trust_remote_code"])
    for auto in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            return auto.from_pretrained(path, **kwargs)
    raise ValueError(
        f"firempo-train: {path} ({type(config).__name__}) is neither an image-text-to-text nor a causal LM model; "
        "set model.class"
    )


def _build_model(spec: dict[str, Any], config: dict[str, Any], dtype: torch.dtype, attn: str):
    from .smoke import tiny_model

    if spec.get("tiny"):
        return tiny_model(spec["tiny"], seed=int(spec.get("seed", 0)), dtype=dtype, attn_implementation=attn)
    path = _resolve_path(config, spec.get("name_or_path"))
    if not path:
        raise ValueError("firempo-train: model.name_or_path (or model.tiny) is required")
    return _load_hf_model(spec, path, dtype, attn)


def _freeze(policy, model_spec: dict[str, Any]) -> None:
    if model_spec.get("freeze_vision", True):
        for name, p in policy.named_parameters():
            if any(f".{v}" in f".{name}" for v in _VISION_PARAMS):
                p.requires_grad_(False)
    if not model_spec.get("train_lm_head", True):
        head = policy.get_output_embeddings()
        for p in head.parameters():
            p.requires_grad_(False)


def _apply_lora(policy, spec: dict[str, Any]):
    try:
        import peft
    except ImportError as e:
        raise ImportError("firempo-train: lora.enabled needs `peft` (pip install 'firempo-kernels[peft]')") from e
    known = {"enabled", "r", "alpha", "dropout", "target_modules", "modules_to_save"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"firempo-train: unknown lora key(s) {unknown}; known: {sorted(known)}")
    lora = peft.LoraConfig(
        r=int(spec.get("r", 16)),
        lora_alpha=float(spec.get("alpha", 32)),
        lora_dropout=float(spec.get("dropout", 0.05)),
        target_modules=spec.get("target_modules") or _DEFAULT_LORA_TARGETS,
        modules_to_save=spec.get("modules_to_save"),
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(policy, lora)


def _build_dataset(config: dict[str, Any], model_config, ignore_index: int):
    from .batch import PreferenceCollator

    spec = dict(config.get("data") or {})
    pad_multiple = spec.pop("pad_to_multiple_of", None)
    pad_token_id = spec.pop("pad_token_id", None)
    processor = None
    if "synthetic" in spec:
        from .smoke import synthetic_examples

        dataset = synthetic_examples(model_config, **(spec["synthetic"] or {}))
        collate = None
    elif "dataset" in spec:
        module_name, _, attr = str(spec["dataset"]).partition(":")
        factory = getattr(importlib.import_module(module_name), attr or "build_dataset")
        kwargs = dict(spec.get("kwargs") or {})
        params = inspect.signature(factory).parameters
        if "model_config" in params:
            kwargs["model_config"] = model_config
        built = factory(**kwargs)
        dataset, collate = built if isinstance(built, tuple) else (built, None)
    elif "path" in spec:
        from transformers import AutoProcessor

        from .data import PreferenceDataset, load_preference_records

        path = _resolve_path(config, spec["path"])
        processor_path = _resolve_path(config, spec.get("processor")) or _resolve_path(
            config, (config.get("model") or {}).get("name_or_path")
        )
        processor = AutoProcessor.from_pretrained(processor_path)
        records = load_preference_records(path, on_error=spec.get("on_error", "raise"))
        dataset = PreferenceDataset(
            records, processor, prompt_template=spec.get("prompt_template"),
            use_corrupted=spec.get("use_corrupted", True), boundary=spec.get("boundary", "error"),
            on_error=spec.get("on_error", "raise"), ignore_index=ignore_index,
        )
        collate = None
    else:
        raise ValueError("firempo-train: the data section needs `path`, `dataset` or `synthetic`")
    if collate is None:
        if pad_token_id is None:
            tok = getattr(processor, "tokenizer", processor)
            pad_token_id = getattr(tok, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(model_config.get_text_config(), "pad_token_id", None)
        # Padding is never attended to nor labelled, so any valid id serves when the model names none.
        collate = PreferenceCollator(int(pad_token_id or 0), ignore_index=ignore_index, pad_to_multiple_of=pad_multiple)
    return dataset, collate, processor


def _default_precomputed_dir(config: dict[str, Any]) -> str:
    ref = config.get("reference") or {}
    if ref.get("precomputed_dir"):
        return _resolve_path(config, ref["precomputed_dir"])
    data = config.get("data") or {}
    if data.get("path"):
        p = Path(_resolve_path(config, data["path"]))
        return str(p.with_suffix("")) + ".reference"
    raise ValueError("firempo-train: reference.precomputed_dir is required when the data has no `path`")


def build_run(config: dict[str, Any], *, rank: int, log, precompute: bool = False) -> dict[str, Any]:
    """Models, loss, data and trainer options of a run config (without starting DeepSpeed). ``precompute``:
    build what the reference pass needs (no precomputed store is opened)."""
    from firempo_kernels.losses import FiReMPOLoss

    from .trainer import ADAPTERS_DISABLED, FiReMPOModule, TrainerConfig

    training = TrainerConfig.from_dict(dict(config.get("training") or {}))
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if training.bf16() else torch.float32
    model_spec = dict(config.get("model") or {})
    attn, why = choose_attn_implementation(model_spec.get("attn_implementation", "auto"), on_gpu)
    if rank == 0:
        log(f"attention: {attn} ({why}); compute dtype: {str(dtype).removeprefix('torch.')}")

    loss_spec = dict(config.get("loss") or {})
    preset = loss_spec.pop("preset", "firempo")
    loss_fn = FiReMPOLoss.from_preset(preset, **loss_spec)

    torch.manual_seed(training.seed)
    policy = _build_model(model_spec, config, dtype, attn)
    _freeze(policy, model_spec)
    lora_spec = dict(config.get("lora") or {})
    use_lora = bool(lora_spec.get("enabled", bool(lora_spec)))
    if use_lora:
        policy = _apply_lora(policy, lora_spec)

    ref_spec = dict(config.get("reference") or {})
    mode = ref_spec.get("mode", "auto")
    if mode == "auto":
        mode = ADAPTERS_DISABLED if use_lora else "model"
    separate = {k: v for k, v in ref_spec.items() if k in ("name_or_path", "tiny", "class", "seed")}
    reference: Any
    reference_head = None
    store = None
    if mode == "model" or (precompute and separate):
        reference = _build_model({**model_spec, **separate}, config, dtype, attn)
    elif mode == ADAPTERS_DISABLED or (mode == "precomputed" and precompute):
        reference = mode
    elif mode == "precomputed":
        from .models import get_adapter
        from .precompute import PrecomputedReferenceStore

        reference = mode
        store = PrecomputedReferenceStore(_default_precomputed_dir(config))
        store.check_compatible(temperature=loss_fn.temperature, ignore_index=loss_fn.ignore_index,
                               needs_hidden=loss_fn.alpha > 0, needs_corrupted=loss_fn.gamma > 0)
        head_trains = any(t is not None and t.requires_grad for t in get_adapter(policy).head(policy))
        if loss_fn.alpha > 0 and (head_trains or store.metadata.get("reference") != "policy"):
            # The KL needs the reference head; it is the policy's own only if the store came from this
            # policy and the head stays frozen.
            reference_head = store.head()
    else:
        raise ValueError(
            f"firempo-train: reference.mode must be auto, model, {ADAPTERS_DISABLED} or precomputed; got {mode!r}"
        )
    if precompute:
        if isinstance(reference, str):  # the reference pass runs the initial policy (adapters disabled)
            reference = policy
        dataset, collate, _ = _build_dataset(config, _unwrapped_config(policy), loss_fn.ignore_index)
        return {"reference": reference, "is_policy": reference is policy, "dataset": dataset,
                "collate": collate, "training": training, "loss_fn": loss_fn}
    module = FiReMPOModule(policy, loss_fn, reference, reference_head=reference_head)
    dataset, collate, processor = _build_dataset(config, _unwrapped_config(policy), loss_fn.ignore_index)
    return {"module": module, "dataset": dataset, "collate": collate, "training": training,
            "loss_fn": loss_fn, "mode": mode, "store": store, "processor": processor}


def _unwrapped_config(model):
    from .models import unwrap_model

    return unwrap_model(model).config


def _run_precompute(config: dict[str, Any], run: dict[str, Any], rank: int, world_size: int, log) -> None:
    from .precompute import precompute_reference

    directory = _default_precomputed_dir(config)
    reference, loss_fn = run["reference"], run["loss_fn"]
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    reference.to(device)
    sampler = torch.utils.data.distributed.DistributedSampler(
        run["dataset"], num_replicas=world_size, rank=rank, shuffle=False
    )
    loader = torch.utils.data.DataLoader(
        run["dataset"], batch_size=run["training"].micro_batch_size, sampler=sampler, collate_fn=run["collate"],
        num_workers=run["training"].num_workers,
    )
    precompute_reference(
        reference, loader, directory, temperature=loss_fn.temperature, ignore_index=loss_fn.ignore_index,
        keep_hidden=loss_fn.alpha > 0, include_corrupted=loss_fn.gamma > 0, rank=rank, world_size=world_size,
        device=device, metadata={"reference": "policy" if run["is_policy"] else "model"},
    )
    log(f"precomputed reference written to {directory}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``firempo-train``."""
    parser = argparse.ArgumentParser(
        prog="firempo-train",
        description="FiRe-MPO preference optimisation of Hugging Face vision-language models under DeepSpeed.",
    )
    parser.add_argument("--config", required=True, help="run config (YAML or JSON)")
    parser.add_argument("--precompute-reference", action="store_true",
                        help="run the reference over the data, store it beside the data, and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.learning_rate=5e-7")
    args = parser.parse_args(argv)

    config = apply_overrides(load_run_config(args.config), args.overrides)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from .trainer import FiReMPOTrainer, build_deepspeed_config, init_distributed, load_deepspeed_config

    rank, world_size = init_distributed()

    def log(message: str) -> None:
        if rank == 0:
            print(f"[firempo] {message}", file=sys.stderr, flush=True)

    try:
        from .trainer import SHIPPED_DEEPSPEED_CONFIGS, TrainerConfig

        training = TrainerConfig.from_dict(dict(config.get("training") or {}))
        ds_spec = config.get("deepspeed", "zero3")
        if isinstance(ds_spec, str) and ds_spec.removesuffix(".json") not in SHIPPED_DEEPSPEED_CONFIGS:
            ds_spec = _resolve_path(config, ds_spec)
        ds_config = build_deepspeed_config(
            load_deepspeed_config(ds_spec), training, world_size=world_size, bf16=training.bf16()
        )
        hf_ds = None
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage == 3 and not args.precompute_reference and not (config.get("model") or {}).get("tiny"):
            # Real checkpoints load straight into ZeRO-3 partitions instead of one full copy per rank (the
            # reference pass keeps a whole copy per rank, so it loads them plainly).
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive while the models load)
        run = build_run(config, rank=rank, log=log, precompute=args.precompute_reference)
        if args.precompute_reference:
            _run_precompute(config, run, rank, world_size, log)
            return 0
        trainer = FiReMPOTrainer(run["module"], run["dataset"], run["collate"], run["training"], ds_config,
                                 reference_store=run["store"])
        result = trainer.train()
        final = Path(run["training"].output_dir) / "final"
        if rank == 0 and run["processor"] is not None and run["training"].save_final_model:
            run["processor"].save_pretrained(str(final))  # the saved folder loads as a whole, processor included
        log(f"done: {result.global_step} steps; metrics in {Path(run['training'].output_dir) / 'metrics.jsonl'}")
        return 0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

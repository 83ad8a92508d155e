"""``firempo-train``: FiRe-MPO training from a run config, on :class:`~.trl.FiReMPOTrainer` (TRL's DPOTrainer).

One process::

    firempo-train --config run.yaml [section.key=value ...]

Several GPUs / nodes (DeepSpeed's launcher; ``--hostfile`` for multi-node)::

    deepspeed --num_gpus 8 --module firempo_kernels.integrations.train --config run.yaml
    torchrun --nproc_per_node 8 -m firempo_kernels.integrations.train --config run.yaml

Reference pass for the precomputed-reference mode (writes the store, then exits; a store already there that
another model, head, data or loss setting built is refused and kept, unless ``--overwrite-reference-store``)::

    firempo-train --config run.yaml --precompute-reference

The run config and its keys: :mod:`firempo_kernels.integrations.run_config`. This module only turns the
sections into the objects TRL and transformers take (a :class:`~.trl.FiReMPOConfig`, the models, the dataset,
a LoRA config); the loop, checkpoints and their rotation, resume, the schedule, DeepSpeed and logging are
theirs. Outputs in ``training.output_dir``: ``checkpoint-N/`` (transformers), ``trainer_state.json`` (every
logged row), ``final/`` (a Hugging Face model with its processor, or the LoRA adapter).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .cli import check_writable_dir, run_command
from .run_config import RunConfig, load_run_config
from .run_dir import check_new_run, record_run, resume_checkpoint

__all__ = [
    "main", "build_trainer", "training_arguments", "choose_attn_implementation", "deepspeed_config_path",
    "head_placement",
]

_DEFAULT_LORA_TARGETS = (
    r"^(?!.*(?:vision_tower|vision_model|visual|multi_modal_projector|merger|connector|embed_vision)).*"
    r"\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)
# Vision towers and the modules that carry their features into the language model, in every served family
# (Idefics3's connector, Gemma 4's embed_vision, LLaVA-NeXT's and OneVision's image_newline).
_VISION_PARAMS = ("vision_tower.", "vision_model.", "visual.", "multi_modal_projector.", "connector.", "embed_vision.",
                  "image_newline")
_CONFIGS = Path(__file__).parent / "configs"


def choose_attn_implementation(requested: str, on_gpu: bool) -> tuple[str, str]:
    """``(implementation, reason)``: flash_attention_2 when flash-attn is installed and the model is on a GPU."""
    if requested != "auto":
        return requested, "as configured"
    if not on_gpu:
        return "sdpa", "no GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed"
    return "flash_attention_2", "flash-attn is installed"


def deepspeed_config_path(run: RunConfig) -> str | None:
    """The DeepSpeed JSON of the run: a shipped name (``zero3``, ``zero3_offload``) or the resolved path."""
    spec = run.deepspeed_spec()
    if spec is None:
        return None
    shipped = _CONFIGS / f"{spec.removesuffix('.json')}.json"
    return str(shipped) if not Path(spec).is_file() and shipped.is_file() else spec


def _warmup_steps(ratio: float) -> float:
    """transformers' ``warmup_steps`` for a warm-up over ``ratio`` of the run: it reads a value below 1 as that
    share of the steps and 1 or more as a step count, so a whole-run warm-up (ratio 1) is the largest float
    below 1, whose share ceil(N * (1 - 2^-53)) of any run of N < 2^52 steps is N."""
    return math.nextafter(1.0, 0.0) if ratio >= 1.0 else float(ratio)


def training_arguments(run: RunConfig, **overrides: Any):
    """The :class:`~.trl.FiReMPOConfig` of a run config (the ``training`` and ``loss`` sections, the
    reference mode and store, DeepSpeed). Create it before loading the models: under ZeRO-3 transformers then
    loads checkpoints straight into partitions."""
    from .trl import FiReMPOConfig

    t, loss = run.training, run.loss
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu if t.precision == "auto" else t.precision == "bf16"
    report = ["tensorboard"] if t.tensorboard is True or (
        t.tensorboard == "auto" and importlib.util.find_spec("tensorboard") is not None) else "none"
    mode = run.reference_mode()
    kwargs: dict[str, Any] = dict(
        output_dir=t.output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1],
        adam_epsilon=t.adam_eps,
        warmup_steps=_warmup_steps(t.warmup_ratio),
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="random" if t.shuffle else "sequential",
        bf16=bf16,
        use_cpu=not on_gpu,
        gradient_checkpointing=t.gradient_checkpointing,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        report_to=report,
        disable_tqdm=not t.progress_bar,
        dataloader_num_workers=t.num_workers,
        deepspeed=deepspeed_config_path(run),
        max_length=None,
        preset=loss.preset,
        reference_mode=mode,
        precomputed_reference_dir=run.precomputed_dir() if mode == "precomputed" else None,
        shared_prefix=t.shared_prefix,
        **loss.preset_overrides(),
    )
    if kwargs.pop("temperature", 1.0) != 1.0:
        raise ValueError("loss.temperature: the trainer scores at temperature 1 (TRL's convention); remove the key")
    kwargs.update(overrides)
    return FiReMPOConfig(**kwargs)


def _load_hf_model(run: RunConfig, spec, dtype: torch.dtype, attn: str):
    import transformers

    from .smoke import tiny_model

    if spec.tiny:
        return tiny_model(spec.tiny, seed=spec.seed, dtype=dtype, attn_implementation=attn)
    path = run.resolve_path(spec.name_or_path)
    if not path:
        raise ValueError("model.name_or_path (or model.tiny) is required")
    kwargs = {"dtype": dtype, "attn_implementation": attn, "trust_remote_code": spec.trust_remote_code}
    if spec.class_name and spec.class_name != "auto":
        cls = getattr(transformers, spec.class_name, None)
        if cls is None:
            raise ValueError(f"model.class={spec.class_name!r} is not a transformers class")
        return cls.from_pretrained(path, **kwargs)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    for auto in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            return auto.from_pretrained(path, **kwargs)
    raise ValueError(
        f"{path} ({type(config).__name__}) is neither an image-text-to-text nor a causal LM model; set model.class"
    )


def _freeze(policy, run: RunConfig) -> None:
    if run.model.freeze_vision:
        for name, p in policy.named_parameters():
            if any(f".{v}" in f".{name}" for v in _VISION_PARAMS):
                p.requires_grad_(False)
    if not run.model.train_lm_head or run.lora.enabled:
        for p in policy.get_output_embeddings().parameters():
            p.requires_grad_(False)


def _lora_config(run: RunConfig):
    if not run.lora.enabled:
        return None
    try:
        import peft
    except ImportError as e:
        raise ImportError("lora.enabled needs `peft` (pip install 'firempo-kernels[peft]')") from e
    return peft.LoraConfig(
        r=run.lora.r, lora_alpha=run.lora.alpha, lora_dropout=run.lora.dropout,
        target_modules=run.lora.target_modules or _DEFAULT_LORA_TARGETS,
        modules_to_save=run.lora.modules_to_save, task_type="CAUSAL_LM",
    )


def _processor(run: RunConfig):
    from transformers import AutoProcessor

    from .smoke import tiny_processor

    if run.data.processor is None and run.model.tiny:
        return tiny_processor(run.model.tiny)
    path = run.processor_path()
    if path is None:
        raise ValueError("data.processor (or model.name_or_path) is required to tokenise the data")
    return AutoProcessor.from_pretrained(path, trust_remote_code=run.model.trust_remote_code)


def _dataset(run: RunConfig, processor, model_config):
    """The training rows in TRL's preference format (a ``datasets.Dataset``)."""
    data = run.data
    source = data.source()
    if source == "synthetic":
        from .smoke import synthetic_rows

        dataset = synthetic_rows(run.model.tiny or "llama", **data.synthetic)
    elif source == "dataset":
        module_name, _, attr = data.dataset.partition(":")
        factory = getattr(importlib.import_module(module_name), attr or "build_dataset")
        kwargs = dict(data.kwargs)
        params = inspect.signature(factory).parameters
        if "model_config" in params:
            kwargs["model_config"] = model_config
        if "processor" in params:
            kwargs["processor"] = processor
        dataset = factory(**kwargs)
    else:
        from .data import load_preference_dataset

        dataset = load_preference_dataset(run.resolve_path(data.path), on_error=data.on_error,
                                          prompt_template=data.prompt_template)
    if not data.use_corrupted and "corrupted_images" in dataset.column_names:
        dataset = dataset.remove_columns("corrupted_images")
    return dataset


def head_placement(model: torch.nn.Module) -> str:
    """How the output head is held: whole, or partitioned by ZeRO-3 (and then how much of it this rank keeps)."""
    from .models import get_adapter, unwrap_model

    weight, _ = get_adapter(model).head(unwrap_model(model))
    if not hasattr(weight, "ds_id"):
        return "whole on every rank (no ZeRO-3)"
    if getattr(weight, "ds_persist", False):
        return "whole on every rank (ZeRO-3 keeps tensors under stage3_param_persistence_threshold)"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return (f"partitioned by ZeRO-3 over {world} rank(s): this rank holds {weight.ds_tensor.numel()} of "
            f"{weight.ds_numel} values; gathered inside the policy's forward")


def _head_placement_callback(log):
    from transformers import TrainerCallback

    class HeadPlacement(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                log(f"output head: {head_placement(model)}")

    return HeadPlacement()


def build_trainer(run: RunConfig, *, log=print, precompute: bool = False, overwrite_store: bool = False):
    """The :class:`~.trl.FiReMPOTrainer` of a run config (models built, data loaded, nothing trained yet).
    ``precompute``: the reference store is built during construction (TRL's precompute step);
    ``overwrite_store``: a store there that does not serve the run is rebuilt instead of refused."""
    from .models import unwrap_model
    from .trl import FiReMPOCollator, FiReMPOTrainer

    args = training_arguments(run, overwrite_precomputed_reference=overwrite_store,
                              **({"reference_mode": "precomputed"} if precompute else {}))
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    attn, why = choose_attn_implementation(run.model.attn_implementation, on_gpu)
    log(f"attention: {attn} ({why}); compute dtype: {str(dtype).removeprefix('torch.')}")
    torch.manual_seed(run.training.seed)
    policy = _load_hf_model(run, run.model, dtype, attn)
    _freeze(policy, run)
    ref_model = None
    mode = args.reference_mode
    separate = run.reference.name_or_path is not None or run.reference.tiny is not None
    if mode == "model" or (mode == "precomputed" and (separate or not run.lora.enabled)):
        # Without LoRA the reference is the policy's starting point: loaded again rather than copied, since
        # under ZeRO-3 the policy is partitioned as it loads.
        ref_model = _load_hf_model(run, run.reference_model(), dtype, attn)
    processor = _processor(run)
    dataset = _dataset(run, processor, unwrap_model(policy).config)
    collator = FiReMPOCollator(
        processor, weight_every_token=args.weights_every_response_token,
        corrupted_pass=args.loss().needs_corrupted_pass and "corrupted_images" in dataset.column_names,
        boundary=run.data.boundary, pad_to_multiple_of=run.data.pad_to_multiple_of,
    )
    trainer = FiReMPOTrainer(policy, ref_model=ref_model, args=args, data_collator=collator, train_dataset=dataset,
                             processing_class=processor, peft_config=_lora_config(run),
                             callbacks=[_head_placement_callback(log)])
    from .forward import loss_for_model

    log(f"reference: {trainer.reference.mode}; loss: {loss_for_model(trainer.loss_fn, policy)!r}")
    return trainer


def _single_process_group() -> None:
    """Run directly (no launcher), DeepSpeed still needs a process group: a one-rank one on a free local port
    (it would otherwise try MPI discovery)."""
    import socket

    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``firempo-train``."""
    parser = argparse.ArgumentParser(
        prog="firempo-train",
        description="FiRe-MPO preference optimisation of Hugging Face vision-language models (TRL + DeepSpeed).",
    )
    parser.add_argument("--config", required=True, help="run config (YAML or JSON)")
    parser.add_argument("--precompute-reference", action="store_true",
                        help="run the reference over the data, store it, and exit")
    parser.add_argument("--overwrite-reference-store", action="store_true",
                        help="rebuild a precomputed reference store that another model, data or loss setting built "
                             "(without it such a store is refused and kept)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.learning_rate=5e-7")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = int(os.environ.get("RANK", "0"))
    # transformers and accelerate record DeepSpeed in the environment (ACCELERATE_USE_DEEPSPEED, ...) and so
    # does the one-rank group below: an in-process caller gets its environment back as it was.
    environment = dict(os.environ)
    finished = False
    started = False  # past the checks that every rank makes alike (config, output folder, checkpoint)

    def log(message: str) -> None:
        if rank == 0:
            print(f"[firempo] {message}", file=sys.stderr, flush=True)

    def body() -> int:
        nonlocal finished, started
        run = load_run_config(args.config, args.overrides)
        if not args.precompute_reference:
            check_writable_dir(run.training.output_dir, "training.output_dir")
            check_new_run(run, is_main=rank == 0, log=log)
        resume = None if args.precompute_reference else resume_checkpoint(run, log)
        started = True
        if run.deepspeed is not None:
            _single_process_group()
            import deepspeed

            # Before any model is built: under ZeRO-3 transformers builds models inside deepspeed.zero.Init,
            # which sizes its partitions by the process group it finds.
            deepspeed.init_distributed(verbose=False)
        trainer = build_trainer(run, log=log, precompute=args.precompute_reference,
                                overwrite_store=args.overwrite_reference_store)
        if args.precompute_reference:
            log(f"precomputed reference written to {trainer.precomputed_reference_dir}")
            finished = True
            return 0
        if trainer.is_world_process_zero():
            record_run(run)
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_state()
        if run.training.save_final_model:
            final = Path(run.training.output_dir) / "final"
            trainer.save_model(str(final))
            if trainer.is_world_process_zero():
                trainer.processing_class.save_pretrained(str(final))
        log(f"done: {result.global_step} steps; logged rows in {Path(run.training.output_dir) / 'trainer_state.json'}")
        finished = True
        return 0

    try:
        # Every rank that fails says so: an error on one rank only (its data shard, its device) must not be lost.
        return run_command("firempo-train", body, debug=args.debug, where=f" (rank {rank})" if rank else "",
                           quiet=lambda: rank != 0 and not started)
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # models built later in this process are plain ones again
        if torch.distributed.is_initialized():
            if finished:  # after a failure the other ranks may be inside a collective: no barrier, just leave
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)

if __name__ == "__main__":
    sys.exit(main())

"""``firempo-train``: FiRe-MPO training from a TRL DPO recipe, on :class:`~.trl.FiReMPOTrainer` (TRL's DPOTrainer).

One process (``--key value`` overrides win over the recipe)::

    firempo-train --config recipe.yaml [--learning_rate 5e-7 ...]

Several processes, with any of the usual launchers (TRL's accelerate configs included)::

    accelerate launch --config_file trl/accelerate_configs/zero3.yaml -m firempo_kernels.integrations.train \
        --config recipe.yaml
    deepspeed --num_gpus 8 --module firempo_kernels.integrations.train --config recipe.yaml --deepspeed zero3
    torchrun --nproc_per_node 8 -m firempo_kernels.integrations.train --config recipe.yaml --deepspeed zero3

Reference pass for the precomputed-reference mode (writes the store, then exits; a store already there that
another model, head, data or loss setting built is refused and kept, unless ``--overwrite-reference-store``)::

    firempo-train --config recipe.yaml --precompute_reference

The recipe and its keys: :mod:`.recipe` and docs/training.md. This module only builds what TRL's trainer takes
from the parsed arguments (the models, the dataset, the collator, a LoRA config); the loop, checkpoints and
their rotation, resume, the schedule, DeepSpeed and logging are TRL's and transformers'. Outputs in
``output_dir``: ``checkpoint-N/`` (transformers), ``trainer_state.json`` (every logged row), ``final/`` (a
Hugging Face model with its processor, or the LoRA adapter).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import torch

from .cli import check_writable_dir, free_port, run_command
from .recipe import SHIPPED_DEEPSPEED_CONFIGS, FiReMPOScriptArguments, RecipeParser, recipe_argv
from .run_dir import check_new_run, record_run, resume_checkpoint, run_record

__all__ = ["main", "build_trainer", "choose_attn_implementation", "head_placement"]

_DEFAULT_LORA_TARGETS = (
    r"^(?!.*(?:vision_tower|vision_model|visual|multi_modal_projector|merger|connector|embed_vision)).*"
    r"\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)
# Vision towers and the modules that carry their features into the language model, in every served family
# (Idefics3's connector, Gemma 4's embed_vision, LLaVA-NeXT's and OneVision's image_newline).
_VISION_PARAMS = ("vision_tower.", "vision_model.", "visual.", "multi_modal_projector.", "connector.", "embed_vision.",
                  "image_newline")


def choose_attn_implementation(requested: str | None, on_gpu: bool) -> tuple[str, str]:
    """``(implementation, reason)`` for ``attn_implementation`` (None or ``auto``: flash_attention_2 when
    flash-attn is installed and the model is on a GPU, else sdpa)."""
    if requested not in (None, "auto"):
        return requested, "as configured"
    if not on_gpu:
        return "sdpa", "no GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed"
    return "flash_attention_2", "flash-attn is installed"


def _load_model(name_or_path: str | None, tiny: str | None, seed: int, model_class: str, dtype, attn: str,
                trust_remote_code: bool, tie_tiny: bool = False):
    import transformers

    from .smoke import tiny_model

    if tiny:
        return tiny_model(tiny, seed=seed, dtype=torch.float32 if dtype == "auto" else dtype, attn_implementation=attn,
                          tie_word_embeddings=tie_tiny)
    if not name_or_path:
        raise ValueError("model_name_or_path: required (or tiny_model for a tiny random model); neither is set")
    kwargs = {"dtype": dtype, "attn_implementation": attn, "trust_remote_code": trust_remote_code}
    if model_class != "auto":
        cls = getattr(transformers, model_class, None)
        if cls is None:
            raise ValueError(f"model_class: expected a transformers class name or auto; got {model_class!r}")
        return cls.from_pretrained(name_or_path, **kwargs)
    config = transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    for auto in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            return auto.from_pretrained(name_or_path, **kwargs)
    raise ValueError(f"model_name_or_path: {name_or_path} ({type(config).__name__}) is neither an image-text-to-text "
                     "nor a causal LM model; set model_class")


def _freeze(policy: torch.nn.Module, freeze_vision: bool, train_head: bool) -> None:
    if freeze_vision:
        for name, p in policy.named_parameters():
            if any(f".{v}" in f".{name}" for v in _VISION_PARAMS):
                p.requires_grad_(False)
    if not train_head:
        for p in policy.get_output_embeddings().parameters():
            p.requires_grad_(False)


def _lora_config(model_args):
    """TRL's LoRA config of the ``lora_*`` keys; with no ``lora_target_modules``, the attention and MLP
    projections of the language model (the vision tower keeps no adapter)."""
    if not model_args.use_peft:
        return None
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if model_args.lora_target_modules is None:
        config.target_modules = _DEFAULT_LORA_TARGETS
    return config


def _processor(script: FiReMPOScriptArguments, model_args, trust_remote_code: bool):
    from transformers import AutoProcessor

    from .smoke import tiny_processor

    if script.processor_name_or_path is None and script.tiny_model:
        return tiny_processor(script.tiny_model)
    path = script.processor_name_or_path or model_args.model_name_or_path
    if path is None:
        raise ValueError("processor_name_or_path (or model_name_or_path) is required to tokenise the data")
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def _dataset(script: FiReMPOScriptArguments, processor, model_config):
    """The training rows in TRL's preference format (a ``datasets.Dataset``)."""
    source = script.source()
    if source == "synthetic":
        from .smoke import synthetic_rows

        dataset = synthetic_rows(script.tiny_model or "llama", script.synthetic_examples, seed=script.synthetic_seed,
                                 corrupted_every=script.synthetic_corrupted_every)
    elif source == "dataset":
        module_name, _, attr = script.dataset_factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr or "build_dataset")
        kwargs = dict(script.dataset_kwargs or {})
        params = inspect.signature(factory).parameters
        if "model_config" in params:
            kwargs["model_config"] = model_config
        if "processor" in params:
            kwargs["processor"] = processor
        dataset = factory(**kwargs)
    elif source == "path":
        from .data import load_preference_dataset

        dataset = load_preference_dataset(script.data_path, on_error=script.on_error,
                                          prompt_template=script.prompt_template)
    else:
        raise ValueError("data_path: required (or dataset_factory, or synthetic_examples for random data); none is set")
    if not script.use_corrupted and "corrupted_images" in dataset.column_names:
        dataset = dataset.remove_columns("corrupted_images")
    return dataset


def head_placement(model: torch.nn.Module) -> str:
    """How the output head is held: whole, partitioned by ZeRO-3 or sharded by FSDP2 (and then how much of it this
    rank keeps)."""
    from .blocks import is_sharded_tensor
    from .models import get_adapter, unwrap_model

    weight, _ = get_adapter(model).head(unwrap_model(model))
    if is_sharded_tensor(weight):
        return (f"sharded by FSDP2 over {weight.device_mesh.size()} rank(s): this rank holds "
                f"{weight.to_local().numel()} of {weight.numel()} values; gathered for the loss inside the forward")
    if not hasattr(weight, "ds_id"):
        return "whole on every rank (no ZeRO-3)"
    if getattr(weight, "ds_persist", False):
        return "whole on every rank (ZeRO-3 keeps tensors under stage3_param_persistence_threshold)"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return (f"partitioned by ZeRO-3 over {world} rank(s): this rank holds {weight.ds_tensor.numel()} of "
            f"{weight.ds_numel} values; gathered inside the policy's forward")


def engine(trainer) -> str:
    """The engine that runs ``trainer`` as accelerate set it up: DeepSpeed's ZeRO stage (and offload), FSDP's
    version, DDP or one process, with the number of ranks."""
    state = trainer.accelerator.state
    if trainer.is_deepspeed_enabled:
        zero = state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        offload = any(zero.get(part, {}).get("device", "none") not in (None, "none")
                      for part in ("offload_param", "offload_optimizer"))
        name = f"DeepSpeed ZeRO-{zero.get('stage', 0)}" + (" with offload" if offload else "")
    elif trainer.is_fsdp_enabled:
        name = f"FSDP{state.fsdp_plugin.fsdp_version}"
    elif state.num_processes > 1:
        name = "DDP"
    else:
        return "one process"
    return f"{name} over {state.num_processes} ranks"


def _head_placement_callback(log):
    from transformers import TrainerCallback

    class HeadPlacement(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                log(f"output head: {head_placement(model)}")

    return HeadPlacement()


def build_trainer(script: FiReMPOScriptArguments, args, model_args, *, log=print):
    """The :class:`~.trl.FiReMPOTrainer` of parsed recipe arguments (models built, data loaded, nothing trained
    yet); with ``script.precompute_reference`` the reference store is built during construction."""
    from .forward import loss_for_model
    from .models import unwrap_model
    from .trl import FiReMPOCollator, FiReMPOTrainer

    if script.precompute_reference:
        args.reference_mode = "precomputed"
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    attn, why = choose_attn_implementation(model_args.attn_implementation, torch.cuda.is_available())
    log(f"attention: {attn} ({why}); model dtype: {str(dtype or 'auto').removeprefix('torch.')}")
    torch.manual_seed(args.seed)
    load = dict(model_class=script.model_class, dtype=dtype or "auto", attn=attn,
                trust_remote_code=args.trust_remote_code, tie_tiny=script.tiny_tie_word_embeddings)
    policy = _load_model(model_args.model_name_or_path, script.tiny_model, script.tiny_seed, **load)
    _freeze(policy, script.freeze_vision, script.train_lm_head and not model_args.use_peft)
    ref_model = None
    mode, lora = args.reference_mode, model_args.use_peft
    separate = script.reference_model_name_or_path is not None or script.reference_tiny_seed is not None
    if mode == "model" or (mode == "auto" and not lora) or (mode == "precomputed" and (separate or not lora)):
        # Without LoRA the reference is the policy's starting point: loaded again rather than copied, since
        # under ZeRO-3 the policy is partitioned as it loads.
        if script.reference_model_name_or_path is not None:
            ref_model = _load_model(script.reference_model_name_or_path, None, 0, **{**load, "model_class": "auto"})
        else:
            seed = script.tiny_seed if script.reference_tiny_seed is None else script.reference_tiny_seed
            ref_model = _load_model(model_args.model_name_or_path, script.tiny_model, seed, **load)
    processor = _processor(script, model_args, args.trust_remote_code)
    dataset = _dataset(script, processor, unwrap_model(policy).config)
    collator = FiReMPOCollator(
        processor, weight_every_token=args.weights_every_response_token, max_length=args.max_length,
        corrupted_pass=args.loss().needs_corrupted_pass and "corrupted_images" in dataset.column_names,
        boundary=script.boundary, pad_to_multiple_of=args.pad_to_multiple_of,
    )
    trainer = FiReMPOTrainer(policy, ref_model=ref_model, args=args, data_collator=collator, train_dataset=dataset,
                             processing_class=processor, peft_config=_lora_config(model_args),
                             callbacks=[_head_placement_callback(log)])
    log(f"reference: {trainer.reference.mode}; loss: {loss_for_model(trainer.loss_fn, policy)!r}")
    return trainer


def _single_process_group() -> None:
    """Run directly (no launcher), DeepSpeed still needs a process group: a one-rank one on a free local port
    (it would otherwise try MPI discovery)."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)


def _deepspeed_given(tokens: list[str]) -> str | None:
    """The value of the last ``--deepspeed`` of the command line, or None."""
    given = None
    for i, token in enumerate(tokens):
        if token == "--deepspeed" and i + 1 < len(tokens):
            given = tokens[i + 1]
        elif token.startswith("--deepspeed="):
            given = token.partition("=")[2]
    return given or None


def _accelerate_deepspeed_without_gpu(tokens: list[str]) -> list[str]:
    """``accelerate launch`` with a DeepSpeed config on a machine without a GPU: accelerate's process state
    has no CPU backend for DeepSpeed (each rank counts itself alone, so the batch sizes DeepSpeed checks
    disagree), so the launch's ZeRO settings go to transformers as a DeepSpeed config, as ``--deepspeed``
    does. With a GPU, accelerate's own DeepSpeed plugin runs as in TRL."""
    if (torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
            or _deepspeed_given(tokens)):
        return tokens
    config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not config:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        offload = any(os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none") not in ("", "none")
                      for what in ("PARAM", "OPTIMIZER"))
        config = f"zero{stage}" + ("_offload" if offload else "")
        if config not in SHIPPED_DEEPSPEED_CONFIGS:
            raise ValueError(f"accelerate launch: ZeRO stage {stage or '(none)'}{' with offload' if offload else ''} "
                             "without a GPU; firempo-train runs DeepSpeed on CPUs as one of the shipped configs "
                             f"{', '.join(SHIPPED_DEEPSPEED_CONFIGS)} (integrations/configs/accelerate/<name>.yaml), "
                             "or a launch's deepspeed_config_file")
    # The launch's settings now live in that config; accelerate refuses a config beside its own variables.
    for key in [k for k in os.environ if k.startswith("ACCELERATE_DEEPSPEED_") or k == "ACCELERATE_CONFIG_DS_FIELDS"]:
        del os.environ[key]
    return recipe_argv(["--deepspeed", config]) + tokens


def _traceback_asked(argv: list[str]) -> bool:
    """Whether the command line asks for the traceback: ``--traceback`` alone or followed by a true value,
    ``--traceback=<true value>``; the last one counts."""
    true, false = ("true", "1", "yes", "t", "y"), ("false", "0", "no", "f", "n")
    asked = False
    for i, token in enumerate(argv):
        if token == "--traceback":
            asked = not (i + 1 < len(argv) and argv[i + 1].lower() in false)
        elif token.startswith("--traceback="):
            asked = token.partition("=")[2].lower() in true
    return asked


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``firempo-train`` (``--help`` lists every key)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = {"on": _traceback_asked(argv)}  # the recipe's own value replaces it once the recipe is read
    rank = int(os.environ.get("RANK", "0"))
    # transformers and accelerate record DeepSpeed in the environment (ACCELERATE_USE_DEEPSPEED, ...) and so
    # does the one-rank group below: an in-process caller gets its environment back as it was.
    environment = dict(os.environ)
    finished = False
    started = False  # past the checks that every rank makes alike (recipe, output folder, checkpoint)

    def log(message: str) -> None:
        if rank == 0:
            print(f"[firempo] {message}", file=sys.stderr, flush=True)

    def body() -> int:
        nonlocal finished, started
        if "-h" in argv or "--help" in argv:
            RecipeParser().print_help()
            return 0
        tokens = _accelerate_deepspeed_without_gpu(recipe_argv(argv))
        if _deepspeed_given(tokens) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            _single_process_group()
            import deepspeed

            # Before the training arguments and any model: under ZeRO-3 transformers builds models inside
            # deepspeed.zero.Init, which sizes its partitions by the process group it finds.
            deepspeed.init_distributed(verbose=False)
            from .trl import release_deepspeed_shared_memory

            release_deepspeed_shared_memory()  # now, so that a run stopped by its arguments leaves none behind
        script, args, model_args = RecipeParser().parse_args_into_dataclasses(args=tokens)
        traceback["on"] = script.traceback
        record = run_record(script, args, model_args)
        if not script.precompute_reference:
            check_writable_dir(args.output_dir, "output_dir")
            check_new_run(args.output_dir, resume=args.resume_from_checkpoint, overwrite=script.overwrite_output_dir,
                          is_main=rank == 0, log=log)
        resume = None if script.precompute_reference else resume_checkpoint(
            args.resume_from_checkpoint, args.output_dir, record, log)
        started = True
        trainer = build_trainer(script, args, model_args, log=log)
        log(f"engine: {engine(trainer)}")
        if script.precompute_reference:
            log(f"precomputed reference written to {trainer.precomputed_reference_dir}")
            finished = True
            return 0
        if trainer.is_world_process_zero():
            record_run(args.output_dir, record)
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_state()
        if script.save_final_model:
            final = Path(args.output_dir) / "final"
            trainer.save_model(str(final))
            if trainer.is_world_process_zero():
                trainer.processing_class.save_pretrained(str(final))
        log(f"done: {result.global_step} steps; logged rows in {Path(args.output_dir) / 'trainer_state.json'}")
        finished = True
        return 0

    try:
        # Every rank that fails says so: an error on one rank only (its data shard, its device) must not be lost.
        return run_command("firempo-train", body, debug=lambda: traceback["on"],
                           where=f" (rank {rank})" if rank else "", quiet=lambda: rank != 0 and not started,
                           debug_flag="--traceback")
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

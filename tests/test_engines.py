"""Every shipped accelerate config (``integrations/configs/accelerate/<name>.yaml``: ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-3
with offload, FSDP2, DDP) launched by ``accelerate launch`` on two CPU ranks, against one process without any
engine, on the tiny smoke recipe: full fine-tuning with a frozen reference model (the final model reloaded by
``from_pretrained``), a LoRA policy whose reference is the policy with its adapters off (the adapter reloaded by
PEFT), a run resumed from the first run's step-1 checkpoint against the uninterrupted one, and a run whose
reference is the precomputed store, built by the launch itself, against the one process's live reference.

The setting and the tolerance are those of test_trainer_distributed.py (its module docstring says why): the
same four examples per optimizer step on both sides, Adam with eps = 1, 1e-5 relative per step for the loss and
per tensor for the final weights; a resumed run repeats the uninterrupted one's arithmetic exactly. Each
launch's log names the engine that ran it, so a launch that fell back to another engine (accelerate puts CPU
ranks of an FSDP config on DDP unless told otherwise) fails here.

``python tests/test_engines.py`` prints the README's engine table from :data:`TABLE` (``--tests``: the test
behind each cell); test_readme.py checks that the README carries it and that every test it names exists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_trainer_distributed import LORA, RTOL, Launches, assert_same_losses, assert_same_weights

ENGINES = {  # shipped config -> the engine its launch must log
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
    "zero3_offload": "DeepSpeed ZeRO-3 with offload",
    "fsdp2": "FSDP2",
    "ddp": "DDP",
}


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Launches:
    seed = int(torch.randint(0, 2**20, ()))
    print(f"data and model seed {seed}")  # shown with a failure report
    return Launches(tmp_path_factory.mktemp("engines"), seed)


def assert_engine(launches: Launches, name: str, config: str) -> None:
    assert f"engine: {ENGINES[config]} over 2 ranks" in launches.logs[name], launches.logs[name][-3000:]


def from_pretrained_state(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of the model that ``from_pretrained`` loads from ``directory``."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(directory), dtype=torch.float32)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def assert_same_model(run: Path, plain: Path, rel: float = RTOL) -> None:
    """The final models, each as ``from_pretrained`` loads it, agree tensor by tensor (norm-wise). Files
    written from a gathered FSDP2 state dict name the tensors in the model's own layout, a one-process
    save in the checkpoint layout transformers converts from; both load to the same model."""
    loaded, expected = from_pretrained_state(run / "final"), from_pretrained_state(plain / "final")
    assert loaded.keys() == expected.keys() and "lm_head.weight" in expected
    for name, tensor in expected.items():
        assert torch.isfinite(loaded[name]).all(), name
        assert (loaded[name] - tensor).norm() <= rel * tensor.norm(), name


@pytest.mark.slow
@pytest.mark.parametrize("config", list(ENGINES))
def test_full_fine_tuning_equals_one_process(launches, config):
    run, plain = launches.accelerate(config, config), launches.plain("plain")
    assert_engine(launches, config, config)
    if config == "fsdp2":
        assert "output head: sharded by FSDP2 over 2 rank(s)" in launches.logs[config]
    assert_same_losses(run, plain)
    assert_same_model(run, plain)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(ENGINES))
def test_lora_equals_one_process(launches, config):
    import peft

    from firempo_kernels.integrations.smoke import tiny_model

    name = f"{config}_lora"
    run, plain = launches.accelerate(name, config, *LORA), launches.plain("lora_plain", *LORA)
    assert_engine(launches, name, config)
    assert "reference: adapters_disabled" in launches.logs[name]
    assert_same_losses(run, plain)
    adapters = assert_same_weights(run, plain, "adapter_model.safetensors")
    assert any("lora_B" in key for key in adapters)
    assert not (run / "final" / "model.safetensors").exists()
    base = tiny_model("qwen2_vl", seed=launches.seed)
    loaded = peft.PeftModel.from_pretrained(base, str(run / "final"))
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    lora = {key: tensor for key, tensor in loaded.state_dict().items() if "lora_" in key}
    assert len(lora) == len(saved)
    for key, tensor in saved.items():  # peft names a saved tensor without the adapter's name
        match = [value for k, value in lora.items() if k.replace(".default", "") == key]
        assert len(match) == 1, key
        torch.testing.assert_close(match[0], tensor, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(ENGINES))
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(launches, config):
    uninterrupted = launches.accelerate(config, config)
    checkpoint = uninterrupted / "checkpoint-1"
    assert checkpoint.is_dir()
    resumed = launches.accelerate(f"{config}_resumed", config, "--resume_from_checkpoint", str(checkpoint))
    assert_engine(launches, f"{config}_resumed", config)
    assert_same_losses(resumed, uninterrupted, rel=0)
    assert_same_model(resumed, uninterrupted, rel=0)


def test_one_process_resume_from_a_checkpoint_equals_the_uninterrupted_run(launches):
    """transformers writes checkpoint weights in the layout from_pretrained converts from and resumes with a
    plain load_state_dict, which misses every converted key: FiReMPOTrainer writes checkpoints in the model's
    own layout, so that the resumed run continues from the checkpoint's weights, not the starting ones."""
    uninterrupted = launches.plain("plain")
    resumed = launches.plain("plain_resumed", "--resume_from_checkpoint", str(uninterrupted / "checkpoint-1"))
    assert "missing keys" not in launches.logs["plain_resumed"]
    assert_same_losses(resumed, uninterrupted, rel=0)
    assert_same_model(resumed, uninterrupted, rel=0)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(ENGINES))
def test_precomputed_reference_built_by_the_launch_equals_the_live_one(launches, config):
    """The launch builds the reference store (every rank its share of the examples) before training from it."""
    name = f"{config}_precomputed"
    store = launches.root / f"{name}_store"
    run = launches.accelerate(name, config, "--reference_mode", "precomputed",
                              "--precomputed_reference_dir", str(store))
    plain = launches.plain("plain")
    assert_engine(launches, name, config)
    assert "reference: precomputed" in launches.logs[name] and any(store.iterdir())
    assert_same_losses(run, plain)
    assert_same_model(run, plain)


@pytest.mark.slow
def test_fsdp2_tied_embeddings_and_gradient_checkpointing_equal_one_process(launches):
    """Gemma 3 ties its head to the input embeddings, which accelerate's FSDP2 plugin shards as one unit with the
    final norm; with gradient checkpointing on (non-reentrant) under FSDP2, off for the one process."""
    extra = ("--tiny_model", "gemma3", "--tiny_tie_word_embeddings", "true")
    run = launches.accelerate("fsdp2_gemma3", "fsdp2", *extra, "--gradient_checkpointing", "true")
    plain = launches.plain("gemma3_plain", *extra)
    assert_engine(launches, "fsdp2_gemma3", "fsdp2")
    assert "output head: sharded by FSDP2 over 2 rank(s)" in launches.logs["fsdp2_gemma3"]
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["text_config"]["tie_word_embeddings"] is True
    assert_same_losses(run, plain)
    assert_same_model(run, plain)


def test_the_shipped_zero3_config_is_trls_without_mixed_precision():
    """Users copy TRL's accelerate configs: the shipped ZeRO-3 one differs from TRL's only in precision (fp32
    here; TRL's says bf16)."""
    import trl
    import yaml

    ours = yaml.safe_load((Path(__file__).parents[1] / "integrations" / "configs" / "accelerate" /
                           "zero3.yaml").read_text())
    theirs = yaml.safe_load((Path(trl.__file__).parent / "accelerate_configs" / "zero3.yaml").read_text())
    differ = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}
    assert differ <= {"mixed_precision", "deepspeed_config", "enable_cpu_affinity"}, differ
    assert ours["mixed_precision"] == "no"
    assert ours["deepspeed_config"] == theirs["deepspeed_config"]


# engine row -> column -> the test that measures it (module::function[param]), a word shown as it is, or ""
# (not run)
COLUMNS = ("equal to one process", "LoRA", "resume", "precomputed reference")
TABLE: dict[str, dict[str, str]] = {
    **{f"`accelerate launch`, {ENGINES[c]} (`configs/accelerate/{c}.yaml`)": {
        "equal to one process": f"test_engines.py::test_full_fine_tuning_equals_one_process[{c}]",
        "LoRA": f"test_engines.py::test_lora_equals_one_process[{c}]",
        "resume": f"test_engines.py::test_resume_from_a_checkpoint_equals_the_uninterrupted_run[{c}]",
        "precomputed reference":
            f"test_engines.py::test_precomputed_reference_built_by_the_launch_equals_the_live_one[{c}]",
    } for c in ENGINES},
    "one process, no engine": {
        "equal to one process": "baseline", "LoRA": "baseline",
        "resume": "test_engines.py::test_one_process_resume_from_a_checkpoint_equals_the_uninterrupted_run",
        "precomputed reference": "test_trainer_cli.py::test_lora_training_live_and_precomputed_reference",
    },
    "`deepspeed` launcher, ZeRO-3, head partitioned": {
        "equal to one process": "test_trainer_distributed.py::test_zero3_two_ranks_equal_one_process_without_deepspeed",
        "LoRA": "test_trainer_distributed.py::test_zero3_two_ranks_lora_policy_equals_one_process",
        "resume": "test_trainer_distributed.py::test_zero3_resume_from_a_checkpoint_equals_the_uninterrupted_run",
        "precomputed reference":
            "test_trainer_distributed.py::test_zero3_precomputed_reference_built_by_the_launch_equals_the_live_one",
    },
    **{f"`deepspeed` launcher, {ENGINES[c]} (`configs/{c}.json`)": {
        "equal to one process":
            f"test_trainer_distributed.py::test_the_deepspeed_launcher_with_each_shipped_config_equals_one_process[{c}]",
        "LoRA": "", "resume": "", "precomputed reference": "",
    } for c in ("zero1", "zero2", "zero3_offload")},
    "two `torchrun --nnodes 2` node ranks, ZeRO-3": {
        "equal to one process": "test_trainer_distributed.py::test_two_node_ranks_on_one_machine_equal_one_process",
        "LoRA": "", "resume": "", "precomputed reference": "",
    },
}


def table() -> str:
    """The README's engine table: a mark per measured cell (2 CPU ranks against one process), "-" where no
    test runs it."""
    rows = ["| engine (2 CPU ranks) | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for engine, cells in TABLE.items():
        marks = ("yes" if "::" in cells[c] else cells[c] or "-" for c in COLUMNS)
        rows.append(f"| {engine} | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def cell_tests() -> str:
    """The test behind every ``yes`` of :func:`table`, one per line."""
    return "\n".join(f"{engine} | {column}: tests/{cells[column]}"
                     for engine, cells in TABLE.items() for column in COLUMNS if "::" in cells[column])


if __name__ == "__main__":
    sys.stdout.write((cell_tests() if sys.argv[1:] == ["--tests"] else table()) + "\n")

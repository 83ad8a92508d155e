"""``firempo-train`` end to end, each run its own one-rank process as from a shell, on the shipped smoke
config: LoRA training with the policy-without-adapters reference, then the reference pass and the same
training from the precomputed reference, which must log the same losses; plus the config plumbing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from firempo_kernels.integrations import train

SMOKE = Path(train.__file__).parent / "configs" / "smoke.yaml"
EXAMPLE = Path(train.__file__).parent / "configs" / "example_run.yaml"
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")


def run_cli(args):
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/firempo_torch_extensions")  # DeepSpeed's one-off op build
    env["FIREMPO_PROGRESS"] = "0"
    env["OMP_NUM_THREADS"] = "1"  # tiny matrices: a second thread only adds contention on a busy 2-core runner
    proc = subprocess.run([sys.executable, "-m", "firempo_kernels.integrations.train", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"firempo-train {' '.join(args)} failed:\n{proc.stderr[-6000:]}"
    return proc.stderr


def losses(directory):
    rows = [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}, rows


def test_lora_training_live_and_precomputed_reference(tmp_path):
    seed = int(torch.randint(0, 2**20, ()))
    common = [
        "--config", str(SMOKE), f"model.seed={seed}", f"data.synthetic.seed={seed}", "data.synthetic.num_examples=8",
        "lora.enabled=true", "lora.r=4", "lora.dropout=0.0", "model.train_lm_head=false",
        "training.micro_batch_size=2", "training.gradient_accumulation_steps=1", "training.max_steps=2",
        f"training.seed={seed}", "training.progress_bar=false",
        f"reference.precomputed_dir={tmp_path / 'store'}",
    ]
    log = run_cli(common + ["reference.mode=adapters_disabled", f"training.output_dir={tmp_path / 'live'}"])
    assert "attention: sdpa (no GPU)" in log and "reference: adapters_disabled" in log
    run_cli(common + ["reference.mode=precomputed", "--precompute-reference"])
    log = run_cli(common + ["reference.mode=precomputed", f"training.output_dir={tmp_path / 'stored'}"])
    assert "reference: precomputed" in log

    live, rows = losses(tmp_path / "live")
    stored, _ = losses(tmp_path / "stored")
    assert list(live) == [1, 2]
    for step in live:  # the same fp32 values reach the loss, split over two op calls: ~1e-7 relative
        assert stored[step] == pytest.approx(live[step], rel=1e-5)
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "kl/forward", "loss/visual", "lr"):
        assert key in rows[0]
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["metadata"]["reference"] == "policy" and index["metadata"]["num_examples"] == 8
    final = tmp_path / "live" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # a LoRA run saves its adapter only
    assert (tmp_path / "live" / "checkpoints" / "latest").read_text().strip() == "step-2"


def test_overrides_parse_yaml_values():
    config = train.load_run_config(SMOKE)
    train.apply_overrides(config, ["training.learning_rate=5e-7", "lora.enabled=true", "loss.visual_pairing=cross",
                                   "data.synthetic.num_examples=4", "training.adam_betas=[0.9, 0.95]"])
    assert config["training"]["learning_rate"] == 5e-7 and config["lora"] == {"enabled": True}
    assert config["loss"]["visual_pairing"] == "cross" and config["data"]["synthetic"]["num_examples"] == 4
    assert config["training"]["adam_betas"] == [0.9, 0.95]
    train.apply_overrides(config, ["deepspeed=zero3_offload"])
    assert config["deepspeed"] == "zero3_offload"
    with pytest.raises(ValueError, match="section.key=value"):
        train.apply_overrides(config, ["training.learning_rate"])
    with pytest.raises(ValueError, match="`deepspeed` is 'zero3_offload', not a section"):
        train.apply_overrides(config, ["deepspeed.stage=2"])
    with pytest.raises(ValueError, match="unknown section 'optimizer'"):
        train.apply_overrides(config, ["optimizer.lr=1"])


def test_run_configs_are_checked(tmp_path):
    assert set(train.load_run_config(EXAMPLE)) >= {"model", "lora", "loss", "data", "deepspeed", "training"}
    bad = tmp_path / "run.yaml"
    bad.write_text("model: {tiny: llava}\ntrainer: {}\n")
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trainer'\]"):
        train.load_run_config(bad)
    with pytest.raises(FileNotFoundError, match="no run config"):
        train.load_run_config(tmp_path / "missing.yaml")


def test_attention_is_chosen_automatically():
    assert train.choose_attn_implementation("auto", on_gpu=False) == ("sdpa", "no GPU")
    impl, why = train.choose_attn_implementation("auto", on_gpu=True)
    assert (impl, why) in {("flash_attention_2", "flash-attn is installed"), ("sdpa", "flash-attn is not installed")}
    assert train.choose_attn_implementation("eager", on_gpu=True) == ("eager", "as configured")

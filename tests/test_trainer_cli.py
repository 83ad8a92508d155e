"""``firempo-train`` end to end, each run its own one-rank process as from a shell, on the shipped smoke
recipe: LoRA training with the policy-without-adapters reference, then the reference pass and the same
training from the precomputed reference, which must log the same losses; a bad recipe is one clear message
and exit code 2 (the recipe's own checks are in test_run_config.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from firempo_kernels.integrations import train

SMOKE = Path(train.__file__).parent / "configs" / "smoke.yaml"
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")


def run_cli(args, expect=0):
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/firempo_torch_extensions")  # DeepSpeed's one-off op build
    env["TQDM_DISABLE"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # tiny matrices: a second thread only adds contention on a busy 2-core runner
    proc = subprocess.run([sys.executable, "-m", "firempo_kernels.integrations.train", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"firempo-train {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-6000:]}"
    return proc.stderr


def losses(directory):
    state = json.loads((Path(directory) / "trainer_state.json").read_text())
    rows = [row for row in state["log_history"] if "loss" in row and "train_loss" not in row]
    return {row["step"]: row["loss"] for row in rows}, rows


def test_lora_training_live_and_precomputed_reference(tmp_path):
    seed = int(torch.randint(0, 2**20, ()))
    common = [
        "--config", str(SMOKE), "--tiny_seed", str(seed), "--synthetic_seed", str(seed), "--synthetic_examples", "4",
        "--use_peft", "--lora_r", "4", "--lora_dropout", "0.0", "--train_lm_head", "false",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "2",
        "--seed", str(seed), "--disable_tqdm", "true", "--save_steps", "1", "--save_total_limit", "1",
        "--precomputed_reference_dir", str(tmp_path / "store"),
    ]
    log = run_cli(common + ["--reference_mode", "adapters_disabled", "--output_dir", str(tmp_path / "live")])
    assert "attention: sdpa (no GPU)" in log and "reference: adapters_disabled" in log
    run_cli(common + ["--reference_mode", "precomputed", "--precompute_reference", "--output_dir", str(tmp_path / "pre")])
    log = run_cli(common + ["--reference_mode", "precomputed", "--output_dir", str(tmp_path / "stored")])
    assert "reference: precomputed" in log

    live, rows = losses(tmp_path / "live")
    stored, _ = losses(tmp_path / "stored")
    assert list(live) == [1, 2]
    for step in live:  # the same fp32 values reach the loss, split over two op calls: ~1e-7 relative
        assert stored[step] == pytest.approx(live[step], rel=1e-5)
    # 2 steps of 2 examples are the 4 examples once, every second of which has a v': visual/margins is logged
    # at least once whatever the shuffle.
    logged = set().union(*rows)
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "kl/forward", "loss/visual",
                "visual/margins", "learning_rate"):
        assert key in logged, key
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["metadata"]["reference"] == "policy" and index["metadata"]["num_examples"] == 4
    final = tmp_path / "live" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # a LoRA run saves its adapter only
    # transformers rotates the checkpoints: only the newest of the two is kept.
    assert sorted(p.name for p in (tmp_path / "live").glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_bad_recipe_is_one_clear_message_and_exit_code_2(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("tiny_model: llava\ntrust_remote_code: 'false'\ntrainer: {}\nsynthetic_examples: 2\n")
    log = run_cli(["--config", str(bad)], expect=2)
    assert "trust_remote_code: expected true or false; got 'false' (str)" in log and "trainer: unknown key" in log
    assert log.count("firempo-train: error") == 1 and "Traceback" not in log and "usage:" not in log
    log = run_cli(["--config", str(tmp_path / "missing.yaml")], expect=2)
    assert "no recipe at" in log and "Traceback" not in log


def test_attention_is_chosen_automatically():
    assert train.choose_attn_implementation("auto", on_gpu=False) == ("sdpa", "no GPU")
    impl, why = train.choose_attn_implementation("auto", on_gpu=True)
    assert (impl, why) in {("flash_attention_2", "flash-attn is installed"), ("sdpa", "flash-attn is not installed")}
    assert train.choose_attn_implementation("eager", on_gpu=True) == ("eager", "as configured")


def test_a_store_of_another_model_is_refused_by_name_and_kept(tmp_path, capsys, monkeypatch):
    """A store built for one model, then a training run pointed at it with another: exit 2, the mismatch named,
    the first store byte for byte intact; --overwrite-reference-store rebuilds it for the second model."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    store = tmp_path / "store"

    def firempo_train(out, seed, *extra):
        return train.main(["--config", str(SMOKE), *extra, "--tiny_seed", str(seed), "--synthetic_examples", "2",
                           "--max_steps", "1", "--disable_tqdm", "true", "--gradient_checkpointing", "false",
                           "--reference_mode", "precomputed", "--precomputed_reference_dir", str(store),
                           "--output_dir", str(tmp_path / out)])

    assert firempo_train("pre", 1, "--precompute_reference") == 0
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    capsys.readouterr()
    assert firempo_train("run", 2) == 2
    err = capsys.readouterr().err
    assert "built from another reference model" in err and "output head weights" in err, err
    assert err.count("firempo-train: error") == 1 and "--overwrite-reference-store" in err
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    assert not (tmp_path / "run" / "trainer_state.json").exists()
    assert firempo_train("run", 2, "--overwrite-reference-store") == 0
    assert {p.name: p.read_bytes() for p in store.iterdir()} != before


@pytest.mark.parametrize("recipe_says, command_line, shown", [
    (None, [], False), (None, ["--traceback"], True), (None, ["--traceback", "false"], False),
    (None, ["--traceback=true"], True), ("true", [], True), ("true", ["--traceback", "false"], False),
    ("false", ["--traceback", "true"], True),
])
def test_the_traceback_is_shown_as_recipe_and_command_line_say(tmp_path, capsys, recipe_says, command_line, shown):
    """The command line wins over the recipe, as for every key; a user error is otherwise one message, exit 2."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SMOKE.read_text() + (f"\ntraceback: {recipe_says}\n" if recipe_says else ""))
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    argv = ["--config", str(recipe), "--output_dir", str(blocked / "run"), *command_line]
    if shown:
        with pytest.raises(ValueError, match="output_dir"):
            train.main(argv)
    else:
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("firempo-train: error") == 1 and "output_dir" in err

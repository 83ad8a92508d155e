"""The recipe of ``firempo-train`` (integrations/recipe.py): a TRL DPO recipe with ``preset: firempo`` parses
into ``FiReMPOConfig`` / ``ModelConfig`` / the script arguments with every key meaning what TRL and
transformers say, the command line wins over the file, every unknown key and wrong value of both is named in
one message, the shipped recipes parse, an old sectioned run config is answered with its new keys, and the
learning-rate schedule a recipe produces is transformers' own."""

import math
import types
from pathlib import Path

import pytest
import torch
import transformers

from firempo_kernels.integrations import recipe, train
from firempo_kernels.integrations.recipe import RecipeError, parse_recipe, recipe_argv

CONFIGS = Path(recipe.__file__).parent / "configs"
SMOKE = CONFIGS / "smoke.yaml"
EXAMPLE = CONFIGS / "example_run.yaml"

# What `trl dpo --config recipe.yaml` reads, plus FiRe-MPO's preset: the keys of TRL's documented recipes.
TRL_RECIPE = """\
model_name_or_path: Qwen/Qwen2-VL-2B-Instruct
dtype: bfloat16
attn_implementation: sdpa
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
data_path: prefs.jsonl
output_dir: runs/recipe
learning_rate: 5.0e-7
beta: 0.05
num_train_epochs: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
gradient_checkpointing: true
warmup_steps: 0.5
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs: {min_lr_rate: 0.1}
logging_steps: 5
save_steps: 100
report_to: [none]
bf16: false
preset: firempo
env:
  FIREMPO_RECIPE_CHECK: "1"
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems(argv):
    with pytest.raises(RecipeError) as info:
        recipe_argv(argv)
    return info.value.problems


def test_a_trl_dpo_recipe_means_what_trl_says(tmp_path, monkeypatch):
    monkeypatch.delenv("FIREMPO_RECIPE_CHECK", raising=False)
    script, args, model = parse_recipe(["--config", write(tmp_path, TRL_RECIPE)])
    assert model.model_name_or_path == "Qwen/Qwen2-VL-2B-Instruct" and model.dtype == "bfloat16"
    assert model.use_peft and (model.lora_r, model.lora_alpha) == (32, 16)
    assert model.lora_target_modules == ["q_proj", "v_proj"] and model.attn_implementation == "sdpa"
    assert script.data_path == "prefs.jsonl" and script.source() == "path"
    assert args.learning_rate == 5e-7 and args.beta == 0.05 and args.num_train_epochs == 2
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 8)
    assert args.warmup_steps == 0.5 and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.report_to in ([], ["none"], "none")
    # preset fills the FiRe-MPO weights the recipe leaves out (the paper's values)
    assert (args.preset, args.alpha, args.gamma, args.lambda_) == ("firempo", 0.01, 0.1, 0.5)
    assert args.bf16 is False and args.output_dir == "runs/recipe"
    import os

    assert os.environ["FIREMPO_RECIPE_CHECK"] == "1"  # TRL's `env:` section


def test_the_command_line_wins_over_the_recipe(tmp_path):
    path = write(tmp_path, TRL_RECIPE)
    script, args, model = parse_recipe(["--config", path, "--learning_rate", "1e-5", "--lora_r=8", "--use_peft", "false",
                                        "--preset", "rrpo", "--tiny_model", "llava", "--synthetic_examples", "3"])
    assert args.learning_rate == 1e-5 and model.lora_r == 8 and not model.use_peft
    assert (args.preset, args.gamma, args.lambda_) == ("rrpo", 0.0, 1.0)
    assert script.tiny_model == "llava" and script.source() == "synthetic"  # a real recipe made a smoke run
    # the recipe's position on the line does not matter: it always comes first
    _, args, _ = parse_recipe(["--learning_rate", "2e-5", "--config", path])
    assert args.learning_rate == 2e-5


def test_every_mistake_of_the_recipe_and_the_command_line_is_named_in_one_message(tmp_path):
    path = write(tmp_path, 'learning_rate: "1e-5"\nuse_peft: "false"\nlora_r: 2.5\nlearnig_rate: 1\n'
                           "preset: ipo\ntrust_remote_code: 1\nbeta: true\nlora_target_modules: q_proj\n")
    found = problems(["--config", path, "--lr", "3", "--bf16", "maybe", "--per_device_train_batch_size", "1.5",
                      "--visual_pairing", "mirror", "--max_steps"])
    assert found == [
        "learning_rate: expected a number; got '1e-5' (str)",  # quoted: a string, as in TRL's YAML
        "use_peft: expected true or false; got 'false' (str)",
        "lora_r: expected an integer; got 2.5 (float)",
        "learnig_rate: unknown key",
        "preset: expected one of firempo, rrpo, mask_dpo, dpo; got 'ipo'",
        "trust_remote_code: expected true or false; got 1 (int)",
        "beta: expected a number; got True (bool)",
        "lr: unknown key",
        "bf16: expected true or false; got 'maybe'",
        "per_device_train_batch_size: expected an integer; got '1.5'",
        "visual_pairing: expected one of reversed, same_response, cross; got 'mirror'",
        "max_steps: expected a value after --max_steps; got none",
    ]
    # a list where one value belongs, a null where a value is needed
    assert problems(["--config", write(tmp_path, "learning_rate: [1, 2]\nseed: null\n", "b.yaml")]) == [
        "learning_rate: expected a number; got [1, 2] (list)", "seed: expected a value; got null"]


def test_cli_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    path = write(tmp_path, "tiny_model: llava\nsynthetic_examples: 2\nlearnig_rate: 1\n")
    assert train.main(["--config", path, "--shuffle", "x", "--bf16", "maybe"]) == 2
    err = capsys.readouterr().err
    assert err.count("firempo-train: error") == 1 and "usage:" not in err and "Traceback" not in err
    assert "learnig_rate: unknown key" in err and "shuffle: unknown key" in err and "bf16: expected true" in err
    assert train.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config: no recipe at" in capsys.readouterr().err
    # a value that only the dataclass itself can judge: still one message, exit code 2, nothing written
    ok = write(tmp_path, "tiny_model: llava\nsynthetic_examples: 2\nbf16: false\n", "ok.yaml")
    assert train.main(["--config", ok, "--loss_type", "ipo", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("firempo-train: error") == 1 and "loss_type" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_old_sectioned_run_config_is_answered_with_its_new_keys(tmp_path, capsys):
    old = write(tmp_path, "model: {tiny: llava}\ndata: {synthetic: {num_examples: 2}}\ndeepspeed: zero3\n"
                          "training: {warmup_ratio: 0.1, epochs: 2, micro_batch_size: 4, resume_from: latest}\n"
                          "lora: {r: 8}\n")
    assert train.main(["--config", old]) == 2
    err = capsys.readouterr().err
    for pair in ("model.tiny -> tiny_model", "training.warmup_ratio -> warmup_steps (below 1: a share of the run)",
                 "training.epochs -> num_train_epochs", "training.micro_batch_size -> per_device_train_batch_size",
                 "training.resume_from -> resume_from_checkpoint", "lora.r -> lora_r",
                 "data.synthetic -> synthetic_examples", "deepspeed -> deepspeed"):
        assert pair in err, pair
    assert err.count("firempo-train: error") == 1


def test_every_old_key_names_a_recipe_key():
    """The converter's table points at keys the parser knows (a renamed TRL key would otherwise go unseen)."""
    parser = recipe.RecipeParser()
    for old, (new, _) in recipe.OLD_KEYS.items():
        for name in new.split(", "):
            assert parser.action(f"--{name}") is not None, (old, name)


def test_the_shipped_recipes_parse():
    script, args, model = parse_recipe(["--config", str(SMOKE)])
    assert script.tiny_model == "qwen2_vl" and script.synthetic_examples == 16 and script.source() == "synthetic"
    assert args.reference_mode == "model" and (args.alpha, args.gamma) == (0.1, 0.5) and args.learning_rate == 1e-4
    assert args.deepspeed is None and args.bf16 is False and not model.use_peft

    tokens = recipe_argv(["--config", str(EXAMPLE)])
    assert tokens[tokens.index("--deepspeed") + 1] == str(CONFIGS / "zero3.json")  # the shipped name resolved
    script, args, model = parse_recipe(["--config", str(EXAMPLE), "--deepspeed", "", "--report_to", "none",
                                        "--bf16", "false"])
    assert model.model_name_or_path == "/models/HuatuoGPT-Vision-7B" and model.use_peft and model.lora_r == 16
    assert script.data_path == "data/preferences.jsonl" and args.pad_to_multiple_of == 8
    assert args.resume_from_checkpoint == "latest" and args.save_steps == 200 and args.learning_rate == 1e-6
    assert (args.preset, args.beta, args.lambda_, args.visual_pairing) == ("firempo", 0.1, 0.5, "reversed")
    assert recipe_argv(["--deepspeed", "zero3_offload"]) == ["--deepspeed", str(CONFIGS / "zero3_offload.json")]


@pytest.mark.parametrize("warmup_steps, min_lr_rate", [(0.0, 0.0), (0.3, 0.1), (0.5, 0.0), (0.999, 0.2), (3, 0.0)])
def test_the_schedule_of_a_recipe_is_transformers_own(tmp_path, warmup_steps, min_lr_rate):
    """The trainer's scheduler for a recipe (Trainer.create_scheduler on the parsed arguments) equals
    transformers' cosine-with-min-lr schedule warmed up over ceil(warmup_steps * N) of N steps below 1 and
    warmup_steps steps from 1 on: warmup_steps 0.5 is half the run."""
    steps = 12
    path = write(tmp_path, f"tiny_model: llava\nsynthetic_examples: 2\nlearning_rate: 1.0e-3\nmax_steps: {steps}\n"
                           f"warmup_steps: {warmup_steps}\nlr_scheduler_type: cosine_with_min_lr\n"
                           f"lr_scheduler_kwargs: {{min_lr_rate: {min_lr_rate}}}\nreport_to: none\nbf16: false\n")
    _, args, _ = parse_recipe(["--config", path])

    def rates(make_scheduler):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler, found = make_scheduler(optimizer), []
        for _ in range(steps):
            found.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return found

    trainer = types.SimpleNamespace(args=args, lr_scheduler=None)
    actual = rates(lambda opt: transformers.Trainer.create_scheduler(trainer, steps, opt))
    warmup = math.ceil(warmup_steps * steps) if warmup_steps < 1 else int(warmup_steps)
    expected = rates(lambda opt: transformers.get_scheduler(
        "cosine_with_min_lr", opt, num_warmup_steps=warmup, num_training_steps=steps,
        scheduler_specific_kwargs={"min_lr_rate": min_lr_rate}))
    assert actual == expected
    if warmup_steps == 0.5:  # half the run warms up: the rate rises over steps 0-5, then falls
        assert actual[:7] == sorted(actual[:7]) and actual[6] == pytest.approx(1e-3)


def test_the_demo_recipe_parses(tmp_path):
    from firempo_kernels.integrations import demo

    path = demo.write_run_config(tmp_path, tmp_path / "base", tmp_path / "pairs.jsonl", demo.QUICK)
    tokens = recipe_argv(["--config", str(path)])
    assert tokens[tokens.index("--deepspeed") + 1] == str(CONFIGS / "zero3.json")
    script, args, model = parse_recipe(["--config", str(path), "--deepspeed", ""])
    assert model.model_name_or_path == str(tmp_path / "base") and script.freeze_vision is False
    assert script.data_path == str(tmp_path / "pairs.jsonl") and args.reference_mode == "model"
    assert args.num_train_epochs == demo.QUICK.epochs and args.learning_rate == demo.QUICK.learning_rate
    assert args.warmup_steps == 0.05 and args.gradient_checkpointing is False and args.save_strategy == "no"

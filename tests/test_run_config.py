"""The typed run config: the shipped configs load, overrides apply, every kind of mistake is refused by its
dotted key (all of a file's mistakes in one message), paths resolve beside the config, to_dict round-trips."""

import copy
import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest

from firempo_kernels.integrations import run_config as rc
from firempo_kernels.integrations.run_config import (
    DataSection,
    LoraSection,
    ModelSection,
    RunConfig,
    RunConfigError,
    TrainingSection,
    apply_overrides,
    load_run_config,
    run_config_from_dict,
)

CONFIGS = Path(rc.__file__).parent / "configs"
SMOKE = CONFIGS / "smoke.yaml"
EXAMPLE = CONFIGS / "example_run.yaml"

# The smallest valid run: every case below changes one thing of it.
BASE = {"model": {"tiny": "llava"}, "data": {"synthetic": {"num_examples": 4}}}


def with_value(dotted, value, base=BASE):
    """BASE with ``dotted`` (section.key[.subkey]) set to ``value``; a lone section name replaces the section."""
    config = copy.deepcopy(base)
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return config


def refused(mapping, **kwargs):
    with pytest.raises(ValueError) as info:
        run_config_from_dict(mapping, **kwargs)
    assert isinstance(info.value, RunConfigError)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------
# Shipped configs and overrides
# ---------------------------------------------------------------------------------------------------

def test_shipped_configs_load():
    smoke = load_run_config(SMOKE)
    assert smoke.model.tiny == "qwen2_vl" and smoke.reference.mode == "model" and smoke.deepspeed == "zero3"
    assert smoke.loss.preset == "firempo" and smoke.loss.preset_overrides() == {"alpha": 0.1, "gamma": 0.5}
    assert smoke.data.source() == "synthetic" and smoke.data.synthetic["num_examples"] == 16
    assert smoke.training.learning_rate == 1e-4 and smoke.training.tensorboard is False
    assert not smoke.lora.enabled and smoke.base_dir == CONFIGS.resolve()

    example = load_run_config(EXAMPLE)
    assert example.model.name_or_path == "/models/HuatuoGPT-Vision-7B" and example.model.train_lm_head is False
    assert example.lora == LoraSection(enabled=True, r=16, alpha=32.0, dropout=0.05)
    assert example.reference_mode() == "adapters_disabled"  # auto with LoRA
    assert example.loss.visual_pairing == "reversed" and example.loss.lambda_ == 0.5
    assert example.data.source() == "path" and example.data.pad_to_multiple_of == 8
    assert example.training.learning_rate == 1e-6 and isinstance(example.training.learning_rate, float)
    assert example.training.resume_from == "latest" and example.training.save_steps == 200


def test_the_demo_run_config_loads(tmp_path):
    from firempo_kernels.integrations import demo

    path = demo.write_run_config(tmp_path, tmp_path / "base", tmp_path / "pairs.jsonl", demo.QUICK)
    run = load_run_config(path)
    assert run.model.freeze_vision is False and run.data.processor == str(tmp_path / "base")
    assert run.training.epochs == demo.QUICK.epochs and run.training.gradient_checkpointing is False


def test_overrides_apply():
    run = load_run_config(SMOKE, [
        "training.learning_rate=5e-7", "model.tiny=llava", "deepspeed=zero3_offload", "training.resume_from=latest",
        "reference.precomputed_dir=/tmp/store", "reference.mode=precomputed", "data.synthetic.seed=3",
        "training.adam_betas=[0.9, 0.95]", "training.max_steps=null", "lora.r=4",
    ])
    assert run.training.learning_rate == 5e-7 and run.model.tiny == "llava" and run.deepspeed == "zero3_offload"
    assert run.training.resume_from == "latest" and run.reference.mode == "precomputed"
    assert run.data.synthetic == {"num_examples": 16, "seed": 3, "corrupted_every": 2}
    assert run.training.adam_betas == (0.9, 0.95) and run.training.max_steps is None
    assert run.lora.enabled and run.lora.r == 4  # LoRA keys without `enabled` turn LoRA on
    assert load_run_config(SMOKE, ["deepspeed=null"]).deepspeed is None

    # A real config made a smoke run: tiny and synthetic win over name_or_path and path.
    example = load_run_config(
        EXAMPLE, ["model.tiny=llava", "data.synthetic.num_examples=2", "reference.mode=precomputed"]
    )
    assert example.model.tiny == "llava" and example.data.source() == "synthetic"
    assert example.precomputed_dir() == "data/preferences.reference"  # beside data.path, which is not on disk


@pytest.mark.parametrize("override, message", [
    ("training.learning_rate", "expected section.key=value"),
    ("deepspeed.stage=2", "deepspeed.stage: override 'deepspeed.stage=2' sets a key inside deepspeed, which is "
                          "'zero3'"),
    ("optimizer.lr=1", "optimizer.lr: unknown section 'optimizer'"),
    ("training.learning_rate=[1", "training.learning_rate: the value of override"),
    ("training.lr=1", "training.lr: unknown key; known: adam_betas, adam_eps,"),
    ("lora.enabled=yes", "lora.enabled: expected true or false; got 'yes' (str)"),
])
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(RunConfigError, match=re.escape(message)):
        load_run_config(SMOKE, [override])


def test_apply_overrides_copies():
    raw = {"model": {"tiny": "llava"}}
    out = apply_overrides(raw, ["model.seed=3", "data.synthetic.num_examples=2"])
    assert out == {"model": {"tiny": "llava", "seed": 3}, "data": {"synthetic": {"num_examples": 2}}}
    assert raw == {"model": {"tiny": "llava"}}
    run_config_from_dict(raw, overrides=["data.synthetic.num_examples=2"])
    assert raw == {"model": {"tiny": "llava"}}


# ---------------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------------

BAD = [
    # unknown section / keys: the known ones are listed
    ("trainer", {}, "trainer: unknown section; known: model, lora, reference, loss, data, deepspeed, training"),
    ("model.nmae_or_path", "x", "model.nmae_or_path: unknown key; known: attn_implementation, class, freeze_vision"),
    ("model.class_name", "X", "model.class_name: unknown key; known: attn_implementation, class,"),
    ("lora.rank", 8, "lora.rank: unknown key; known: alpha, dropout, enabled, modules_to_save, r, target_modules"),
    ("reference.modes", "model", "reference.modes: unknown key; known: class, mode, name_or_path,"),
    ("loss.betta", 0.1, "loss.betta: unknown key; known: alpha, beta, gamma, lambda_,"),
    ("data.paht", "x.jsonl", "data.paht: unknown key; known: boundary, dataset, kwargs,"),
    ("training.lr", 1e-6, "training.lr: unknown key; known: adam_betas, adam_eps, epochs,"),
    ("data.synthetic.num_exampels", 3, "data.synthetic.num_exampels: unknown key; known: corrupted_every,"),
    # booleans: only true / false
    ("model.trust_remote_code", "banana", "model.trust_remote_code: expected true or false; got 'banana' (str)"),
    ("model.trust_remote_code", "false", "model.trust_remote_code: expected true or false; got 'false' (str)"),
    ("model.trust_remote_code", "yes", "model.trust_remote_code: expected true or false; got 'yes' (str)"),
    ("model.trust_remote_code", 1, "model.trust_remote_code: expected true or false; got 1 (int)"),
    ("lora.enabled", 0, "lora.enabled: expected true or false; got 0 (int)"),
    ("data.use_corrupted", "true", "data.use_corrupted: expected true or false; got 'true' (str)"),
    ("training.shuffle", None, "training.shuffle: expected true or false; got None (NoneType)"),
    ("training.tensorboard", "yes", "training.tensorboard: expected true, false or 'auto'; got 'yes' (str)"),
    # numbers: a string or a boolean is no number
    ("training.learning_rate", "abc", "training.learning_rate: expected a finite number >= 0; got 'abc' (str)"),
    ("training.learning_rate", True, "training.learning_rate: expected a finite number >= 0; got True (bool)"),
    ("training.learning_rate", float("nan"), "training.learning_rate: expected a finite number >= 0; got nan"),
    ("training.epochs", -1, "training.epochs: expected an integer >= 1; got -1 (int)"),
    ("training.epochs", 1.5, "training.epochs: expected an integer >= 1; got 1.5 (float)"),
    ("training.warmup_ratio", 2, "training.warmup_ratio: expected a number in [0, 1]; got 2 (int)"),
    ("training.adam_betas", [0.9], "training.adam_betas: expected two numbers in [0, 1)"),
    ("training.num_workers", -1, "training.num_workers: expected an integer >= 0; got -1 (int)"),
    ("training.precision", "fp16", "training.precision: expected one of 'auto', 'bf16', 'fp32'; got 'fp16'"),
    ("model.seed", "0", "model.seed: expected an integer; got '0' (str)"),
    ("lora.dropout", 1.0, "lora.dropout: expected a number in [0, 1); got 1.0 (float)"),
    ("loss.lambda_", 1.5, "loss.lambda_: expected a number in [0, 1], or null; got 1.5 (float)"),
    ("loss.beta", 0, "loss.beta: expected a finite number > 0, or null; got 0 (int)"),
    ("data.pad_to_multiple_of", 0, "data.pad_to_multiple_of: expected an integer >= 1, or null; got 0 (int)"),
    ("data.synthetic.num_examples", "4", "data.synthetic.num_examples: expected an integer; got '4' (str)"),
    # strings and choices
    ("model.name_or_path", 3, "model.name_or_path: expected a non-empty string, or null; got 3 (int)"),
    ("model.tiny", "gpt9", "model.tiny: expected one of 'llama', 'llava',"),
    ("loss.preset", "ppo", "loss.preset: expected one of 'firempo', 'rrpo', 'mask_dpo', 'dpo'; got 'ppo' (str)"),
    ("loss.visual_pairing", "mirror", "loss.visual_pairing: expected one of 'reversed', 'same_response', 'cross'"),
    ("reference.mode", "frozen", "reference.mode: expected one of 'auto', 'model', 'adapters_disabled', 'precomputed'"),
    ("data.on_error", "ignore", "data.on_error: expected one of 'raise', 'skip'; got 'ignore' (str)"),
    ("data.boundary", "cut", "data.boundary: expected one of 'error', 'expand'; got 'cut' (str)"),
    ("data.dataset", "my module", "data.dataset: expected 'package.module:factory'"),
    ("deepspeed", {"stage": 3}, "deepspeed: expected 'zero3', 'zero3_offload' or a DeepSpeed JSON path"),
    ("deepspeed", 3, "deepspeed: expected 'zero3', 'zero3_offload' or a DeepSpeed JSON path, or null; got 3 (int)"),
    # shapes: a list where a mapping is needed and the other way round
    ("model", ["tiny", "llava"], "model: expected a mapping of model keys; got ['tiny', 'llava'] (list)"),
    ("training", "fast", "training: expected a mapping of training keys; got 'fast' (str)"),
    ("data.kwargs", [1, 2], "data.kwargs: expected a mapping with string keys; got [1, 2] (list)"),
    ("data.synthetic", [4], "data.synthetic: expected a mapping of synthetic-data arguments"),
    ("lora.target_modules", [1], "lora.target_modules: expected a list of module names or one regular expression"),
    # what no single section can tell
    ("model", {}, "model.name_or_path: required (or model.tiny for a tiny random model); neither is set"),
    ("data", {"use_corrupted": True}, "data: expected one of data.path, data.dataset or data.synthetic"),
    ("data.synthetic", {}, "data.synthetic.num_examples: required; not set"),
    ("reference.mode", "adapters_disabled", "reference.mode: 'adapters_disabled' needs LoRA (lora.enabled: true)"),
    ("reference.mode", "precomputed", "reference.precomputed_dir: required for reference.mode 'precomputed'"),
]


@pytest.mark.parametrize("dotted, value, message", BAD, ids=[f"{d}={v!r}" for d, v, _ in BAD])
def test_mistakes_are_refused_by_dotted_key(dotted, value, message):
    assert message in refused(with_value(dotted, value))


def test_all_problems_of_a_file_come_together(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {tiny: llava, trust_remote_code: yes}\n"
        "trainer: {}\n"
        "data: {path: prefs.jsonl, on_error: ignore}\n"
        "training: {learning_rate: abc, epochs: -1, lr: 1e-6}\n"
    )
    with pytest.raises(RunConfigError) as info:
        load_run_config(path, ["loss.preset=ppo"])
    lines = str(info.value).splitlines()
    assert lines[0] == f"invalid run config {path} (7 problems):"
    keys = [line.split(":")[0].strip() for line in lines[1:]]
    assert keys == ["trainer", "model.trust_remote_code", "loss.preset", "data.on_error", "training.lr",
                    "training.epochs", "training.learning_rate"]
    assert info.value.problems == [line.strip() for line in lines[1:]]
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.problems == info.value.problems


def test_yaml_reading(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {tiny: llava}\ndata: {synthetic: {num_examples: 2}}\ntraining: {learning_rate: 1e-6}\n")
    assert load_run_config(path).training.learning_rate == 1e-6  # YAML 1.1 would read a string
    path.write_text("model: {tiny: llava}\nmodel: {tiny: llama}\n")
    with pytest.raises(RunConfigError, match="found the key 'model' twice"):
        load_run_config(path)
    path.write_text("model: [tiny\n")
    with pytest.raises(RunConfigError, match="not valid YAML"):
        load_run_config(path)
    path.write_text("- model\n")
    with pytest.raises(RunConfigError, match=r"expected a mapping of sections .*got \['model'\] \(list\)"):
        load_run_config(path)
    json_path = tmp_path / "run.json"
    json_path.write_text('{"model": {"tiny": "llava"}, "model": {}}')
    with pytest.raises(RunConfigError, match="not valid JSON: found the key 'model' twice"):
        load_run_config(json_path)
    with pytest.raises(FileNotFoundError, match="no run config"):
        load_run_config(tmp_path / "missing.yaml")


def test_sections_check_themselves_when_built_in_code():
    assert TrainingSection(learning_rate=1).learning_rate == 1.0 and TrainingSection().adam_betas == (0.9, 0.999)
    with pytest.raises(RunConfigError, match=r"training\.epochs: expected an integer >= 1; got 0"):
        TrainingSection(epochs=0)
    with pytest.raises(RunConfigError, match=r"model\.name_or_path: required"):
        RunConfig()
    with pytest.raises(RunConfigError, match=r"data: expected a DataSection; got \{\}"):
        RunConfig(model=ModelSection(tiny="llava"), data={})


def test_to_dict_round_trips(tmp_path):
    full = {
        "model": {"name_or_path": "org/model", "class": "LlavaForConditionalGeneration", "seed": 3,
                  "attn_implementation": "sdpa", "freeze_vision": False, "trust_remote_code": True},
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
        "reference": {"mode": "model", "tiny": "llama", "seed": 7},
        "loss": {"preset": "rrpo", "beta": 1, "visual_pairing": "cross", "temperature": 0.5},
        "data": {"dataset": "my_pkg.data:build", "kwargs": {"split": "train", "n": [1, 2]}, "on_error": "skip",
                 "pad_token_id": 0},
        "deepspeed": None,
        "training": {"adam_betas": [0.8, 0.9], "tensorboard": True, "max_steps": 5},
    }
    for run in (load_run_config(SMOKE), load_run_config(EXAMPLE), run_config_from_dict(full, tmp_path)):
        plain = run.to_dict()
        assert list(plain) == list(rc.SECTIONS)
        assert json.loads(json.dumps(plain)) == plain
        assert run_config_from_dict(plain, run.base_dir) == run
        (tmp_path / "run.json").write_text(json.dumps(plain))
        assert load_run_config(tmp_path / "run.json").to_dict() == plain
    run = run_config_from_dict(full, tmp_path)
    assert run.to_dict()["model"]["class"] == "LlavaForConditionalGeneration" and run.loss.beta == 1.0
    assert run.lora.enabled and run.to_dict()["training"]["adam_betas"] == [0.8, 0.9]


def test_paths_resolve_beside_the_config(tmp_path, monkeypatch):
    folder = tmp_path / "cfg"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "prefs.jsonl").write_text("")
    (folder / "ds.json").write_text("{}")
    (folder / "run.yaml").write_text(
        "model: {name_or_path: org/hub-model}\n"
        "data: {path: data/prefs.jsonl}\n"
        "deepspeed: ds.json\n"
        "training: {output_dir: runs/x}\n"
    )
    monkeypatch.chdir(tmp_path)
    run = load_run_config("cfg/run.yaml")
    assert run.base_dir == folder.resolve()
    base = str(folder.resolve())
    assert run.resolve_path(run.data.path) == f"{base}/data/prefs.jsonl"  # exists beside the config
    assert run.resolve_path("data/elsewhere.jsonl") == "data/elsewhere.jsonl"  # not there: as given
    assert run.resolve_path("/abs/file") == "/abs/file" and run.resolve_path(None) is None
    assert run.processor_path() == "org/hub-model"  # a hub id stays a hub id
    assert run.precomputed_dir() == f"{base}/data/prefs.reference"
    assert run.deepspeed_spec() == f"{base}/ds.json"
    assert run.training.output_dir == "runs/x"  # relative to the working directory, never resolved
    assert run_config_from_dict(run.to_dict(), folder, ["deepspeed=zero3"]).deepspeed_spec() == "zero3"
    with_store = run_config_from_dict(run.to_dict(), folder, ["reference.precomputed_dir=store"])
    assert with_store.precomputed_dir() == "store"
    no_path = run_config_from_dict(BASE)
    with pytest.raises(ValueError, match="reference.precomputed_dir: required"):
        no_path.precomputed_dir()


def test_reference_helpers():
    run = run_config_from_dict(BASE)
    assert run.reference_mode() == "model" and run.reference_model() == run.model
    run = run_config_from_dict(BASE, overrides=["lora.enabled=true", "reference.seed=5"])
    assert run.reference_mode() == "adapters_disabled"
    assert run.reference_model() == dataclasses.replace(run.model, seed=5)
    other = run_config_from_dict(BASE, overrides=["reference.name_or_path=org/ref", "model.class=X"])
    ref = other.reference_model()
    # The reference names its own model: the tiny policy does not shadow it, nor does the policy's class apply.
    assert (ref.name_or_path, ref.tiny, ref.class_name) == ("org/ref", None, "auto")


def test_loss_section_builds_the_loss():
    from firempo_kernels.losses import FiReMPOLoss

    loss = load_run_config(SMOKE, ["loss.preset=rrpo", "loss.temperature=2"]).loss
    built = FiReMPOLoss.from_preset(loss.preset, **loss.preset_overrides())
    assert (built.alpha, built.gamma, built.lambda_, built.temperature) == (0.1, 0.5, 1.0, 2.0)
    assert DataSection(path="x").source() == "path"


@pytest.mark.parametrize("warmup_ratio, min_lr_ratio", [(0.0, 0.0), (0.3, 0.1), (0.5, 0.0), (1.0, 0.2)])
def test_the_learning_rate_schedule_is_transformers_own_for_the_warmup_share(warmup_ratio, min_lr_ratio):
    """The trainer's scheduler for a run config (Trainer.create_scheduler on the arguments built from it) equals
    transformers' cosine-with-min-lr schedule warmed up over ceil(warmup_ratio * N) of N steps, step by step
    (warmup_ratio 1 is the whole run, not one step)."""
    import math
    import types

    import torch
    import transformers

    from firempo_kernels.integrations import train

    steps = 12
    run = run_config_from_dict(with_value("training", {"learning_rate": 1e-3, "warmup_ratio": warmup_ratio,
                                                       "min_lr_ratio": min_lr_ratio, "max_steps": steps}))
    args = train.training_arguments(run, deepspeed=None, report_to="none")

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
    expected = rates(lambda opt: transformers.get_scheduler(
        "cosine_with_min_lr", opt, num_warmup_steps=math.ceil(warmup_ratio * steps), num_training_steps=steps,
        scheduler_specific_kwargs={"min_lr_rate": min_lr_ratio}))
    assert actual == expected
    if warmup_ratio == 1.0:
        assert actual == sorted(actual) and actual[-1] == pytest.approx(1e-3 * (steps - 1) / steps)

"""ZeRO-3 training on two CPU ranks (gloo) against a single process without DeepSpeed.

One ``torchrun --nproc_per_node 2`` launch runs every scenario of ``scripts/distributed_train.py`` (the
DeepSpeed engines are the slow part to start, the tiny models are not); the tests below check what it saved.
Each step takes 2 ranks x 1 example x 2 accumulation steps, the plain run one batch of 4: so the trainable-
head comparison also shows that accumulation 2 x 2 equals a batch of 4.

Tolerance: 1e-5 relative, per step for the loss and per tensor (norm-wise) for the final weights. Both
sides run the same fp32 arithmetic except the order of the gradient sums (per rank, then reduce-scatter),
which moves the loss by ~1e-7 relative; Adam's normalised updates carry that rounding into the weights at
about lr x 1e-3 relative to a step, far below 1e-5.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from trainer_cases import make_policy, plain_run, relative_difference  # noqa: E402

RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def seed() -> int:
    value = int(torch.randint(0, 2**20, ()))
    print(f"data and model seed {value}")  # shown with the failure report
    return value


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, seed):
    out = tmp_path_factory.mktemp("zero3")
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/firempo_torch_extensions")  # DeepSpeed's one-off op build
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(SCRIPTS / "distributed_train.py"), str(out), str(seed)]
    proc = subprocess.run(cmd, cwd=SCRIPTS, env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        pytest.fail(f"2-rank run failed (seed {seed}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return out, torch.load(out / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def plain(seed):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spins against other processes on the runner
    try:
        return {name: plain_run(seed, frozen) for name, frozen in (("trainable", False), ("frozen", True))}
    finally:
        torch.set_num_threads(threads)


def assert_losses_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for step in expected:
        assert abs(got[step] - expected[step]) <= RTOL * abs(expected[step]), (step, got[step], expected[step])


def assert_weights_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    ranked = sorted(((relative_difference(got[k], expected[k]), k) for k in expected), reverse=True)
    assert ranked[0][0] <= RTOL, "relative differences: " + ", ".join(f"{k} {d:.2e}" for d, k in ranked[:4])


@pytest.mark.parametrize("variant", ["trainable", "frozen"])
def test_zero3_two_ranks_equal_one_process_without_deepspeed(distributed, plain, seed, variant):
    _, results = distributed
    run = results[variant]
    held, full, visible = run["head_partition"]
    assert visible == 0 and held == full // 2, "lm_head.weight must be partitioned over the two ranks"
    losses, state = plain[variant]
    assert len(losses) == 3
    assert_losses_equal(run["losses"], losses)
    assert_weights_equal(run["state"], state)
    initial = make_policy(seed).state_dict()
    head_moved = relative_difference(state["lm_head.weight"], initial["lm_head.weight"])
    if variant == "frozen":
        assert head_moved == 0.0
    else:
        assert head_moved > 100 * RTOL  # the comparison is between weights that really changed
    assert relative_difference(state["model.language_model.layers.0.mlp.up_proj.weight"],
                               initial["model.language_model.layers.0.mlp.up_proj.weight"]) > 100 * RTOL


def test_metrics_have_trl_names_and_reward_accuracy(distributed):
    history = distributed[1]["trainable"]["history"]
    assert [row["step"] for row in history] == [1, 2, 3]
    for key in ("loss", "lr", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "kl/forward", "kl/reverse", "loss/visual", "span_tokens"):
        assert key in history[0], key
    assert all(0.0 <= row["rewards/accuracies"] <= 1.0 for row in history)
    # The resumed run wrote into the same folder: it dropped the rows past its checkpoint, then appended.
    lines = (distributed[0] / "trainable" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_old_checkpoints_beyond_the_limit_are_removed(distributed):
    checkpoints = distributed[0] / "frozen" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step-3"]
    assert (checkpoints / "latest").read_text().strip() == "step-3"


def test_resume_continues_exactly(distributed):
    results = distributed[1]
    assert results["resume"]["start"] == 2
    assert results["resume"]["losses"] == {3: pytest.approx(results["trainable"]["losses"][3], rel=RTOL)}
    assert_weights_equal(results["resume"]["state"], results["trainable"]["state"])


def test_precomputed_reference_equals_live_reference(distributed):
    results = distributed[1]
    assert results["precomputed"]["store_size"] == 12
    assert_losses_equal(results["precomputed"]["losses"], results["trainable"]["losses"])
    assert_weights_equal(results["precomputed"]["state"], results["trainable"]["state"])


def test_final_model_is_saved_in_hugging_face_format(distributed):
    from transformers import Qwen2VLForConditionalGeneration

    out, results = distributed
    saved = Qwen2VLForConditionalGeneration.from_pretrained(out / "trainable" / "final")
    for name, value in saved.state_dict().items():
        assert torch.equal(value, results["trainable"]["state"][name]), name


def test_non_finite_loss_stops_every_rank_before_any_update(distributed):
    info = distributed[1]["nonfinite"]
    assert info["message"] is not None
    assert "optimizer step 1" in info["message"] and "rank 1: examples ['ex00001']" in info["message"]
    assert info["max_weight_change"] == 0.0

"""ZeRO-3 on two CPU ranks through the DeepSpeed launcher (``deepspeed --num_gpus 2 --module
firempo_kernels.integrations.train``) and through ``accelerate launch`` with TRL's ZeRO-3 accelerate config,
against one process without DeepSpeed, on the tiny smoke recipe:
full fine-tuning with a frozen reference model, a LoRA policy whose reference is the policy with its adapters
off, and a ZeRO-3 run resumed from its step-1 checkpoint against the uninterrupted one. The ZeRO-3 runs pack
each example's two rows on their shared prefix (the default), the one-process runs do not: the packed forward
trains like the unpacked one under ZeRO-3 too.

Both sides see the same four examples per optimizer step: 2 ranks x 1 example x 2 accumulation steps against
1 process x 2 examples x 2 accumulation steps (sequential sampling; accelerate hands consecutive micro-batches
to the ranks in turn). The DeepSpeed config keeps no tensor whole (persistence threshold 0), so the head is
really partitioned (the run's log says how much of it rank 0 holds) and reaches the loss only inside the
policy's forward.

Tolerance 1e-5 relative, per step for the loss and per tensor (norm-wise) for the final weights: both sides run
the same fp32 arithmetic but for the order of the gradient sums (per rank, then reduce-scatter) and the
padding of a micro-batch. Adam runs with eps = 1: for gradients far below 1 its step is then linear in the
gradient, so the weights differ by the gradients' own rounding (observed up to 1.1e-6). With the usual eps = 1e-8 Adam divides
each gradient by its own size, and a gradient that is rounding noise in exact arithmetic (a key bias, a
near-cancelling LoRA entry) becomes a full step whose size depends on the summation order: a property of
Adam, not of the distribution. A resumed run repeats the uninterrupted one's arithmetic exactly.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from firempo_kernels.integrations import train
from firempo_kernels.integrations.cli import free_port
from firempo_kernels.integrations.demo import deepspeed_launcher

pytestmark = pytest.mark.slow  # multi-rank launches, tens of seconds each
SMOKE = Path(train.__file__).parent / "configs" / "smoke.yaml"
ZERO3 = Path(train.__file__).parent / "configs" / "zero3.json"
ACCELERATE_CONFIGS = Path(train.__file__).parent / "configs" / "accelerate"
RTOL = 1e-5
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")
LORA = ["--use_peft", "--lora_r", "4", "--lora_dropout", "0.0", "--train_lm_head", "false",
        "--reference_mode", "adapters_disabled"]


def environment():
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/firempo_torch_extensions")  # DeepSpeed's one-off op build
    env["TQDM_DISABLE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def overrides(out: Path, seed: int, micro: int) -> list[str]:
    return [
        "--config", str(SMOKE), "--tiny_seed", str(seed), "--synthetic_seed", str(seed), "--synthetic_examples", "8",
        "--reference_mode", "model", "--reference_tiny_seed", str(seed + 1), "--freeze_vision", "true",
        "--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", "2", "--max_steps", "2",
        "--train_sampling_strategy", "sequential", "--seed", str(seed), "--learning_rate", "0.1",
        "--adam_epsilon", "1.0", "--max_grad_norm", "0", "--gradient_checkpointing", "false",
        "--disable_tqdm", "true", "--save_steps", "1", "--output_dir", str(out),
    ]


# A launch takes 20-90 s on two cores shared with another test worker; a hung one must not hold the suite.
LAUNCH_TIMEOUT_S = 480


def launch(commands: list[list[str]], what: str, port: int | None,
           timeout: float = LAUNCH_TIMEOUT_S) -> list[tuple[int, str]]:
    """Run ``commands`` side by side (one launch, or the node ranks of one) and return each one's exit code and
    output (stdout and stderr together).

    Each command runs in a session of its own: past ``timeout`` the launcher is killed with every rank it started,
    since a rank left waiting on a dead peer would hold memory and a core for the rest of the suite, and the
    test fails. A DeepSpeed all-reduce buffer that the launch left in ``/dev/shm`` (named after its rendezvous
    ``port``) fails the test too: each is 66 MB of memory until the machine restarts.
    """
    procs = [subprocess.Popen(cmd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd in commands]
    deadline = time.monotonic() + timeout
    outputs = None
    try:
        outputs = [proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for proc in procs]
    except subprocess.TimeoutExpired:
        pass
    finally:  # whatever ended the wait (its end, the timeout, the test's own timeout), no rank outlives it
        for proc in procs:
            _kill_with_every_process_under(proc)
    if outputs is None:
        tails = [_rest_of_output(proc) for proc in procs]
        _shm_left_by(port)
        pytest.fail(f"{what} ran past {timeout:.0f} s and was stopped with its ranks:\n"
                    + "\n".join(tail[-4000:] for tail in tails))
    left = _shm_left_by(port)
    assert not left, f"{what} left DeepSpeed all-reduce buffers in /dev/shm: {left}"
    return [(proc.returncode, output) for proc, output in zip(procs, outputs)]


def _rest_of_output(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=30)[0] or ""
    except subprocess.TimeoutExpired:  # a process out of reach still holds the pipe
        return "(its output stayed open after the kill)"


def _kill_with_every_process_under(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher, everything it started and everything in its session. torch's elastic agent (torchrun,
    ``accelerate launch``) starts each rank in a session of its own, so the launcher's session alone misses
    them; a rank whose parent already died is in no one's tree but still in a session."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    sessions = {proc.pid}
    for member in family:
        with contextlib.suppress(psutil.Error):
            sessions.add(os.getsid(member.pid))
            member.kill()
    for session in sessions:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(session, signal.SIGKILL)


def _shm_left_by(port: int | None) -> list[str]:
    """Remove the DeepSpeed all-reduce buffers of the launch that met at ``port``, and name them."""
    if port is None:
        return []
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    for path in left:
        path.unlink(missing_ok=True)
    return [path.name for path in left]


class Launches:
    """The runs of this module, each started the first time a test asks for it."""

    def __init__(self, root: Path, seed: int):
        self.root, self.seed, self.logs, self.failures = root, seed, {}, {}
        config = json.loads(ZERO3.read_text())
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
        self.ds_config = root / "zero3_partition_all.json"
        self.ds_config.write_text(json.dumps(config))

    def zero3(self, name: str, *extra: str) -> Path:
        """The DeepSpeed launcher with ZeRO-3 partitioning every tensor, the head included."""
        return self.deepspeed(name, self.ds_config, *extra)

    def deepspeed(self, name: str, config: Path, *extra: str) -> Path:
        port = free_port()
        return self._once(name, f"2-rank deepspeed launch {name}", port, [
            deepspeed_launcher() + ["--num_gpus", "2", "--master_port", str(port), "--module",
                                    "firempo_kernels.integrations.train", *overrides(self.root / name, self.seed, 1),
                                    *extra, "--deepspeed", str(config)]])

    def accelerate(self, name: str, config: str | Path, *extra: str) -> Path:
        """``accelerate launch --config_file config`` (a shipped config's name, or a path) on 2 ranks without
        mixed precision."""
        path = ACCELERATE_CONFIGS / f"{config}.yaml" if isinstance(config, str) else config
        port = free_port()
        return self._once(name, f"2-rank accelerate launch {name}", port, [
            [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(path),
             "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port),
             "-m", "firempo_kernels.integrations.train", *overrides(self.root / name, self.seed, 1), *extra]])

    def two_nodes(self, name: str) -> Path:
        """Two node ranks of one process each on this machine, as two ``torchrun --nnodes 2`` launches meeting at
        one rendezvous (what each node of a cluster runs, with the first node's address)."""
        port = free_port()
        return self._once(name, f"the two-node launch {name}", port, [
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "firempo_kernels.integrations.train", *overrides(self.root / name, self.seed, 1),
             "--deepspeed", str(self.ds_config)] for node in (0, 1)])

    def plain(self, name: str, *extra: str) -> Path:
        return self._once(name, f"one-process run {name}", None, [
            [sys.executable, "-m", "firempo_kernels.integrations.train", *overrides(self.root / name, self.seed, 2),
             *extra, "--shared_prefix", "false"]])

    def _once(self, name: str, what: str, port: int | None, commands: list[list[str]]) -> Path:
        """Launch ``commands`` the first time a test asks for the run ``name``; later tests read its log and
        output folder. A launch that failed fails each later test that asks for it, at once and without
        launching again: its folder holds part of a run, which a second launch would refuse to overwrite."""
        if name in self.failures:
            pytest.fail(f"{what} failed in an earlier test:\n{self.failures[name]}")
        if name not in self.logs:
            try:
                results = launch(commands, what, port)
                for node, (code, log) in enumerate(results):
                    if code != 0:
                        part = f" (node rank {node})" if len(results) > 1 else ""
                        pytest.fail(f"{what}{part} failed:\n{log[-9000:]}")
            except (pytest.fail.Exception, Exception) as failure:
                self.failures[name] = str(failure)[-6000:]
                raise
            self.logs[name] = "\n".join(log for _, log in results)
        return self.root / name


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Launches:
    seed = int(torch.randint(0, 2**20, ()))
    print(f"data and model seed {seed}")  # shown with a failure report
    return Launches(tmp_path_factory.mktemp("zero3"), seed)


def steps(directory: Path) -> dict[int, float]:
    state = json.loads((directory / "trainer_state.json").read_text())
    return {row["step"]: row["loss"] for row in state["log_history"] if "loss" in row and "train_loss" not in row}


def assert_same_losses(a: Path, b: Path, rel: float = RTOL) -> None:
    la, lb = steps(a), steps(b)
    assert list(la) == list(lb) == [1, 2]
    for step in lb:
        assert la[step] == pytest.approx(lb[step], rel=rel, abs=0), step


def assert_same_weights(a: Path, b: Path, file: str, rel: float = RTOL) -> dict[str, torch.Tensor]:
    wa, wb = load_file(str(a / "final" / file)), load_file(str(b / "final" / file))
    assert wa.keys() == wb.keys() and wb
    for name in wb:
        assert torch.isfinite(wa[name]).all(), name
        error = (wa[name].float() - wb[name].float()).norm().item()
        assert error <= rel * wb[name].float().norm().item(), name
    return wb


def assert_head_partitioned(log: str) -> None:
    assert "output head: partitioned by ZeRO-3 over 2 rank(s): this rank holds" in log, log[-3000:]


def test_zero3_two_ranks_equal_one_process_without_deepspeed(launches):
    zero3, plain = launches.zero3("zero3"), launches.plain("plain")
    assert_head_partitioned(launches.logs["zero3"])
    assert_same_losses(zero3, plain)
    weights = assert_same_weights(zero3, plain, "model.safetensors")
    assert "lm_head.weight" in weights
    row = next(r for r in json.loads((zero3 / "trainer_state.json").read_text())["log_history"] if "loss" in r)
    plain_row = next(r for r in json.loads((plain / "trainer_state.json").read_text())["log_history"] if "loss" in r)
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "kl/forward", "loss/visual",
                "visual/margins", "span_tokens"):  # gathered over both ranks: the same four examples
        assert row[key] == pytest.approx(plain_row[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("config", ["zero1", "zero2", "zero3_offload"])
def test_the_deepspeed_launcher_with_each_shipped_config_equals_one_process(launches, config):
    """``deepspeed --num_gpus 2 ... --deepspeed zero1|zero2|zero3_offload``: the other shipped DeepSpeed configs
    (ZeRO-3 itself is the partition-everything run above)."""
    path = Path(train.__file__).parent / "configs" / f"{config}.json"
    run, plain = launches.deepspeed(f"ds_{config}", path), launches.plain("plain")
    stage = config[4]
    assert f"engine: DeepSpeed ZeRO-{stage}{' with offload' if 'offload' in config else ''} over 2 ranks" \
        in launches.logs[f"ds_{config}"]
    assert_same_losses(run, plain)
    assert_same_weights(run, plain, "model.safetensors")


def test_two_node_ranks_on_one_machine_equal_one_process(launches):
    """``torchrun --nnodes 2 --node_rank 0|1`` launched twice, one process per node: ZeRO-3 across the two node
    ranks trains as one process does (losses and final weights)."""
    nodes, plain = launches.two_nodes("two_nodes"), launches.plain("plain")
    assert_head_partitioned(launches.logs["two_nodes"])
    assert_same_losses(nodes, plain)
    assert_same_weights(nodes, plain, "model.safetensors")


@pytest.mark.parametrize("family", ["gemma3", "paligemma2"])
def test_zero3_two_ranks_equal_one_process_for_other_families(launches, family):
    """Gemma 3 (MedGemma): its bidirectional image blocks and sliding-window layers in the packed ZeRO-3
    forward; PaliGemma 2: its soft-capped logits and the prompt lengths the batch carries; each against the
    unpacked forward of one process."""
    zero3, plain = launches.zero3(f"{family}_zero3", "--tiny_model", family), \
        launches.plain(f"{family}_plain", "--tiny_model", family)
    assert_head_partitioned(launches.logs[f"{family}_zero3"])
    assert_same_losses(zero3, plain)
    weights = assert_same_weights(zero3, plain, "model.safetensors")
    assert any(name.endswith("lm_head.weight") for name in weights)


def test_zero3_two_ranks_lora_policy_equals_one_process(launches):
    zero3, plain = launches.zero3("lora_zero3", *LORA), launches.plain("lora_plain", *LORA)
    assert_head_partitioned(launches.logs["lora_zero3"])
    assert "reference: adapters_disabled" in launches.logs["lora_zero3"]
    assert_same_losses(zero3, plain)
    adapters = assert_same_weights(zero3, plain, "adapter_model.safetensors")
    assert any("lora_B" in name for name in adapters)
    assert not (zero3 / "final" / "model.safetensors").exists()


def test_zero3_resume_from_a_checkpoint_equals_the_uninterrupted_run(launches):
    uninterrupted = launches.zero3("zero3")
    checkpoint = uninterrupted / "checkpoint-1"
    assert checkpoint.is_dir()
    resumed = launches.zero3("resumed", "--resume_from_checkpoint", str(checkpoint))
    assert_same_losses(resumed, uninterrupted, rel=0)
    assert_same_weights(resumed, uninterrupted, "model.safetensors", rel=0)


def test_zero3_precomputed_reference_built_by_the_launch_equals_the_live_one(launches):
    """The launch builds the store with the reference model partitioned (each rank its share of the examples),
    then trains from it."""
    store = launches.root / "zero3_store"
    run = launches.zero3("zero3_precomputed", "--reference_mode", "precomputed",
                         "--precomputed_reference_dir", str(store))
    plain = launches.plain("plain")
    assert "reference: precomputed" in launches.logs["zero3_precomputed"] and any(store.iterdir())
    assert_head_partitioned(launches.logs["zero3_precomputed"])
    assert_same_losses(run, plain)
    assert_same_weights(run, plain, "model.safetensors")


def test_a_recipe_error_on_two_ranks_is_one_message_without_traceback(launches):
    port = free_port()
    [(code, text)] = launch(
        [deepspeed_launcher() + ["--num_gpus", "2", "--master_port", str(port), "--module",
                                 "firempo_kernels.integrations.train", "--config", str(SMOKE), "--use_peft", "banana",
                                 "--output_dir", str(launches.root / "bad")]], "a launch with a bad recipe", port)
    assert code != 0
    assert text.count("firempo-train: error") == 1 and "use_peft: expected true or false" in text, text[-3000:]
    assert "Traceback" not in text


def test_a_launch_past_its_time_is_stopped_with_every_process_it_started(tmp_path):
    """A hung rank must not outlive its test: the launcher and the ranks it started go together."""
    pid_file = tmp_path / "rank.pid"
    launcher = ("import subprocess, sys, time; rank = subprocess.Popen([sys.executable, '-c', 'import time; "
                "time.sleep(300)'], start_new_session=True); "  # as torch's elastic agent starts its ranks
                f"open({str(pid_file)!r}, 'w').write(str(rank.pid)); time.sleep(300)")
    with pytest.raises(pytest.fail.Exception, match="ran past 5 s"):
        launch([[sys.executable, "-c", launcher]], "a hung launch", None, timeout=5)
    rank = Path("/proc", pid_file.read_text())
    for _ in range(50):  # a killed process lingers until its parent reaps it
        if not rank.exists() or "State:\tZ" in (rank / "status").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the rank {rank.name} still runs")


def test_a_failed_launch_fails_each_test_that_asks_for_it_again_without_launching(tmp_path, monkeypatch):
    launches = Launches(tmp_path, seed=0)
    with pytest.raises(pytest.fail.Exception, match="one-process run bad failed:(.|\n)*no_such_key"):
        launches.plain("bad", "--no_such_key", "1")

    def launch_again(*args, **kwargs):
        raise AssertionError("launched again")

    monkeypatch.setitem(globals(), "launch", launch_again)
    with pytest.raises(pytest.fail.Exception, match="failed in an earlier test:(.|\n)*no_such_key"):
        launches.plain("bad", "--no_such_key", "1")

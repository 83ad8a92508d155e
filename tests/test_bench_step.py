"""The whole-step benchmark's methods at a tiny size: each computes the objective it names."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_step  # noqa: E402


@pytest.fixture
def tiny_step(monkeypatch):
    monkeypatch.setattr(bench_step, "VOCAB", 600)
    monkeypatch.setattr(bench_step, "HIDDEN", 64)
    monkeypatch.setattr(bench_step, "LAYERS", 2)


def test_methods_compute_the_same_firempo_loss(tiny_step):
    policy, reference, batch, loss_fn = bench_step.build(24, 20)
    values = [bench_step.run_step(m, policy, reference, batch, loss_fn) for m in bench_step.METHODS]
    assert values[1] == pytest.approx(values[0], rel=1e-5) and values[2] == pytest.approx(values[0], rel=1e-5)


def test_trl_dpo_step_equals_our_dpo_preset(tiny_step):
    losses, grads = [], []
    for method in bench_step.DPO_METHODS:  # each on its own copy of the model, as the benchmark runs them
        setup = bench_step.build_dpo(24, 20, method)
        losses.append(bench_step.run_step(method, *setup))
        grads.append({n: p.grad for n, p in setup[0].named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6)


def test_table_and_plots_against_prefix_and_answer(tmp_path):
    def method(seconds, peak):
        return {"seconds": seconds, "peak_extra_mib": peak, "loss": 0.7}

    rows = [{"prefix": p, "answer": a, "load": 1.0, "packed": method(1.0, 100), "unpacked": method(2.0, 200),
             "precomputed": method(0.6, 80), **({"authors": method(9.0, 900)} if a == 32 else {})}
            for p, a in ((128, 32), (512, 32), (512, 64))]
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# R\n\n{bench_step.BEGIN}\nold\n{bench_step.END}\n")
    text = bench_step.write(rows, tmp_path, 3, md)
    assert "| 512 | 64 | 1.00 s | 2.00 s | 0.60 s | not run |" in text
    assert (tmp_path / "step_vs_prefix.png").is_file() and (tmp_path / "step_vs_answer.png").is_file()
    assert "old" not in md.read_text() and text in md.read_text()

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


@pytest.fixture
def tiny_gemma3(monkeypatch):
    # Rows (44 tokens, 64 packed) longer than the window, and a global layer beside a sliding one: the packed
    # forward hands Gemma 3 one mask per layer type.
    monkeypatch.setattr(bench_step, "GEMMA3_VOCAB", 600)
    monkeypatch.setattr(bench_step, "GEMMA3_HIDDEN", 64)
    monkeypatch.setattr(bench_step, "GEMMA3_LAYERS", 2)
    monkeypatch.setattr(bench_step, "GEMMA3_WINDOW", 8)
    monkeypatch.setattr(bench_step, "GEMMA3_PATTERN", 2)


def test_gemma3_methods_compute_the_same_firempo_loss(tiny_gemma3):
    policy, reference, batch, loss_fn = bench_step.build(24, 20, family="gemma3")
    config = policy.config.text_config
    assert type(policy.get_base_model()).__name__ == "Gemma3ForConditionalGeneration"
    assert config.layer_types == ["sliding_attention", "full_attention"] and policy.config.tie_word_embeddings
    assert not any("vision_tower" in n for n, p in policy.named_parameters() if p.requires_grad)
    assert batch.input_ids[0, :6].tolist() == [597, 599, 599, 599, 599, 596]  # boi, 4 image tokens, eoi
    losses, grads = [], []
    for method in bench_step.METHODS:
        losses.append(bench_step.run_step(method, policy, reference, batch, loss_fn))
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    for value in losses[1:]:
        assert value == pytest.approx(losses[0], rel=1e-5)
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-3, atol=1e-6)


def test_gemma3_block_has_markers_and_files_of_its_own(tmp_path):
    def method(seconds, peak):
        return {"seconds": seconds, "peak_extra_mib": peak, "loss": 0.7}

    rows = [{"prefix": p, "answer": 32, "load": 1.0, "packed": method(1.0, 100), "unpacked": method(2.0, 200),
             "precomputed": method(0.6, 80), "authors": method(9.0, 900)} for p in (256, 512)]
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# R\n\n{bench_step.BEGIN}\nqwen\n{bench_step.END}\n")
    text = bench_step.write(rows, tmp_path, 3, md, family="gemma3")
    assert "| 512 | 32 | 1.00 s | 2.00 s | 0.60 s | 9.00 s |" in text and "step_gemma3_vs_prefix.png" in text
    assert (tmp_path / "step_gemma3.json").is_file() and (tmp_path / "step_gemma3_vs_prefix.png").is_file()
    assert not (tmp_path / "step.json").exists()
    written = md.read_text()
    assert "qwen" in written and f"{bench_step.GEMMA3_BEGIN}\n{text}\n{bench_step.GEMMA3_END}" in written

"""Bad input to the fused ops fails early with an error that names the argument."""

import math

import pytest
import torch

import firempo_kernels as fk


def good(n=4, vocab=10, d=6):
    return dict(hidden=torch.randn(n, d), weight=torch.randn(vocab, d), ref_hidden=torch.randn(n, d),
                ref_weight=torch.randn(vocab, d), targets=torch.randint(0, vocab, (n,)))


def call(**overrides):
    args = good()
    kwargs = {k: overrides.pop(k) for k in ("bias", "ref_bias", "temperature", "ignore_index", "softcap")
              if k in overrides}
    args.update(overrides)
    return fk.fused_linear_token_kl(args["hidden"], args["weight"], args["ref_hidden"], args["ref_weight"],
                                    args["targets"], **kwargs)


CASES = [
    (dict(weight=torch.randn(10, 6, 1)), ValueError, "`weight` must have 2 dimension"),
    (dict(hidden=torch.randn(4, 5)), ValueError, "`hidden` last dimension"),
    (dict(ref_hidden=torch.randn(4, 5)), ValueError, "`ref_hidden` last dimension"),
    (dict(hidden=torch.randn(5, 6)), ValueError, "`hidden` must be shaped"),
    (dict(ref_hidden=torch.randn(3, 6)), ValueError, "`ref_hidden` must be shaped"),
    (dict(ref_weight=torch.randn(11, 6)), ValueError, "vocabulary size of `weight`"),
    (dict(hidden=torch.randn(4, 6).double()), TypeError, "`hidden` must have the dtype of `weight`"),
    (dict(hidden=torch.randint(0, 3, (4, 6)), weight=torch.randint(0, 3, (10, 6))), TypeError, "`weight` must be float32"),
    (dict(targets=torch.rand(4)), TypeError, "`targets` must be an integer tensor"),
    (dict(targets=torch.tensor([0, 1, 10, 2])), ValueError, r"`targets` must lie in \[0, 10\)"),
    (dict(targets=torch.tensor([0, -1, 3, 2])), ValueError, "got -1"),
    (dict(temperature=0.0), ValueError, r"`temperature` must lie in \[1e-06, 1e\+06\]"),
    (dict(temperature=1e-38), ValueError, "`temperature` must lie in"),  # 1 / tau would be 1e38: inf logits
    (dict(temperature=1e7), ValueError, "`temperature` must lie in"),
    (dict(temperature=-1.0), ValueError, "`temperature`"),
    (dict(temperature=math.inf), ValueError, "`temperature`"),
    (dict(temperature=math.nan), ValueError, "`temperature`"),
    (dict(temperature="1"), TypeError, "`temperature` must be a float"),
    (dict(bias=torch.randn(9)), ValueError, "`bias` must have shape"),
    (dict(bias=torch.tensor([0.0] * 9 + [-math.inf])), ValueError, "`bias` must be finite"),
    (dict(ref_bias=torch.tensor([math.nan] + [0.0] * 9)), ValueError, "`ref_bias` must be finite"),
    (dict(ref_bias=torch.randn(10).double()), TypeError, "`ref_bias` must have the dtype"),
    (dict(ref_weight=torch.randn(10, 6).numpy()), TypeError, "`ref_weight` must be a torch.Tensor"),
    (dict(ignore_index=1.5), TypeError, "`ignore_index` must be an int"),
    (dict(targets=torch.randint(0, 10, (4,), device="meta")), ValueError, "one device"),
    (dict(softcap=0.0), ValueError,
     r"`softcap` must be None \(no cap\) or a finite float > 0 in \[1e-06, 1e\+06\]"),
    (dict(softcap=-30.0), ValueError, "`softcap` must be None"),
    (dict(softcap=math.inf), ValueError, "`softcap`"),
    (dict(softcap=math.nan), ValueError, "`softcap`"),
    (dict(softcap=1e-7), ValueError, "`softcap`"),  # 1 / softcap would leave fp32's range in the kernels
    (dict(softcap=1e7), ValueError, "`softcap`"),
    (dict(softcap=True), TypeError, "`softcap` must be None or a float; got bool"),
    (dict(softcap="30"), TypeError, "`softcap` must be None or a float; got str"),
    (dict(softcap=torch.tensor(30.0)), TypeError, "`softcap` must be None or a float; got Tensor"),
]


@pytest.mark.parametrize("overrides,error,message", CASES)
def test_bad_input_raises(overrides, error, message):
    with pytest.raises(error, match=message):
        call(**overrides)


def test_ignore_index_is_not_range_checked():
    out = call(targets=torch.tensor([0, -100, 3, 9]))
    assert out.logp[1] == 0


def test_logprobs_validates_too():
    with pytest.raises(ValueError, match="`hidden` last dimension"):
        fk.fused_linear_logprobs(torch.randn(3, 5), torch.randn(8, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="fused_linear_logprobs: `softcap`"):
        fk.fused_linear_logprobs(torch.randn(3, 6), torch.randn(8, 6), torch.zeros(3, dtype=torch.long), softcap=0)


def test_integer_softcap_is_accepted():
    out = call(softcap=30)
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.interpreter
def test_backend_choice(monkeypatch):
    monkeypatch.setenv("FIREMPO_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FIREMPO_BACKEND must be one of"):
        call()
    monkeypatch.setenv("FIREMPO_BACKEND", "triton")
    with pytest.raises(TypeError, match="other dtypes run on FIREMPO_BACKEND=torch"):
        args = {k: v.double() if v.is_floating_point() else v for k, v in good().items()}
        fk.fused_linear_token_kl(*args.values())
    with pytest.raises(TypeError, match="one dtype for the policy and the reference"):
        args = good()
        fk.fused_linear_token_kl(args["hidden"], args["weight"], args["ref_hidden"].half(),
                                 args["ref_weight"].half(), args["targets"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"):
        call()

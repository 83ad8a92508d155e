"""Input checks shared by the public functions: every failure names the argument, what was expected and
what came, before any kernel runs."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(fn: str, name: str, x, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor; got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{fn}: `{name}` must have {ndim} dimension(s); got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(
            f"{fn}: `{name}` must have at least {min_ndim} dimension(s); got shape {tuple(x.shape)}"
        )


def check_float(fn: str, name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: `{name}` must be float32, bfloat16 or float16 (float64 on the torch backend); "
            f"got {x.dtype}"
        )


def check_same_dtype(fn: str, name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if x.dtype != other.dtype:
        raise TypeError(f"{fn}: `{name}` must have the dtype of `{other_name}` ({other.dtype}); got {x.dtype}")


def check_same_device(fn: str, named: dict[str, torch.Tensor | None]) -> torch.device:
    present = {k: v for k, v in named.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, dev in devices.items():
        if dev != first:
            raise ValueError(
                f"{fn}: all tensors must be on one device; `{first_name}` is on {first} but `{k}` is on {dev}"
            )
    return first


# Outside these bounds the scaled logits or the loss terms overflow float32 for ordinary inputs (1 / 1e-38
# is already 1e38; beta = 1e308 turns a reward margin into inf - inf), so they are refused rather than
# left to come out as inf or NaN. Every setting anyone trains with lies far inside.
TEMPERATURE_RANGE = (1e-6, 1e6)
MAX_LOSS_WEIGHT = 1e6


def check_in_range(fn: str, name: str, value, low: float, high: float) -> float:
    """``value`` as a float in ``[low, high]`` (a TypeError for non-numbers, a ValueError naming the range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: `{name}` must be a float; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{fn}: `{name}` must lie in [{low:g}, {high:g}]; got {value}")
    return value


def check_temperature(fn: str, temperature) -> float:
    return check_in_range(fn, "temperature", temperature, *TEMPERATURE_RANGE)


# A cap is a logit scale: outside these bounds cap / tau or 1 / cap leaves float32's comfortable range in the
# kernels (which take it as an fp32 scalar). Caps in use (Gemma 2: 30) lie far inside.
SOFTCAP_RANGE = (1e-6, 1e6)


def check_softcap(fn: str, softcap) -> float | None:
    """``softcap`` as a float in ``SOFTCAP_RANGE``, or None (no cap): a TypeError for anything that is not a
    real number (bool included), a ValueError for a non-finite, non-positive or out-of-range one."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{fn}: `softcap` must be None or a float; got {type(softcap).__name__}")
    value = float(softcap)
    low, high = SOFTCAP_RANGE
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(
            f"{fn}: `softcap` must be None (no cap) or a finite float > 0 in [{low:g}, {high:g}] "
            f"(the logits become softcap * tanh(logits / softcap)); got {value}"
        )
    return value


def check_targets(fn: str, name: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{fn}: `{name}` must be an integer tensor; got {targets.dtype}")
    if targets.numel() == 0:
        return
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(
            f"{fn}: `{name}` must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"got {first} ({int(bad.sum())} such entries)"
        )


def check_head(fn: str, weight_name: str, weight: torch.Tensor, bias_name: str, bias) -> None:
    check_tensor(fn, weight_name, weight, ndim=2)
    check_float(fn, weight_name, weight)
    if bias is not None:
        check_tensor(fn, bias_name, bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{fn}: `{bias_name}` must have shape [V] = [{weight.shape[0]}] like `{weight_name}`; "
                f"got {tuple(bias.shape)}"
            )
        check_same_dtype(fn, bias_name, bias, weight_name, weight)
        if bias.numel() and not bool(torch.isfinite(bias).all()):
            # A -inf entry (a masked vocabulary entry) makes p log p a 0 * inf: the KL would be NaN.
            raise ValueError(f"{fn}: `{bias_name}` must be finite; got {int((~torch.isfinite(bias)).sum())} "
                             "non-finite entries (mask vocabulary entries with targets, not with -inf)")


def check_hidden(fn: str, name: str, hidden, weight_name: str, weight: torch.Tensor, targets: torch.Tensor) -> None:
    check_tensor(fn, name, hidden, min_ndim=1)
    check_float(fn, name, hidden)
    check_same_dtype(fn, name, hidden, weight_name, weight)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{fn}: `{name}` last dimension must equal `{weight_name}`.shape[1] = {weight.shape[1]}; "
            f"got {hidden.shape[-1]} (shape {tuple(hidden.shape)})"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"{fn}: `{name}` must be shaped [*targets.shape, d] = [{', '.join(map(str, targets.shape))}, d]; "
            f"got {tuple(hidden.shape)}"
        )

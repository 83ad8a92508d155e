"""What is measured: the inputs of one benchmark case and every implementation that runs on them.

Three workloads, each a scalar objective that one training step would backpropagate:

- ``logprobs``: ``sum_t log p(y_t)`` over N tokens (the op ``fused_linear_logprobs``);
- ``token_kl``: ``sum_t [log p(y_t) + (KL(q || p) + KL(p || q)) / 2]`` over N tokens with the full-vocabulary
  KL to a reference (the op ``fused_linear_token_kl``); every output gets a gradient;
- ``loss``: one FiRe-MPO loss (paper defaults) over ``4 * B`` rows of T positions: (v, y+), (v, y-),
  (v', y+), (v', y-), policy and reference hidden states, a span of weighted tokens in each response.

Every method of a workload computes the same number from the same inputs (tests/test_benchmarks.py holds
them together); they differ only in how. The methods:

- ``fused``: this library;
- ``naive``: what the FiRe-MPO authors' public code does: full logits at every position (of all 8 passes
  for the loss), ``log_softmax``, ``gather``, the KL from the two full distributions; eager PyTorch;
- ``naive_masked`` (loss): the same math, but the span positions are gathered before the head, so only
  their logits exist; separates what the kernels gain from what the masking gains;
- ``compiled``: ``torch.compile`` of the naive math (of naive-masked for the loss; the data-dependent
  gather stays outside the graph, where it is one indexing op);
- ``torch_lce``: PyTorch's ``F.linear_cross_entropy`` (torch >= 2.13) for the log-probs, chunked with
  ``LinearCrossEntropyOptions()`` (for the loss: when the span tokens are at least d, as PyTorch documents);
  the loss adds the naive-masked KL on the (v, y+) span tokens, which no PyTorch op fuses;
- ``liger``: Liger-Kernel: its fused linear cross-entropy for log-probs, its fused linear JSD at beta 0
  and 1 for the two KL directions, ``LigerFusedLinearDPOLoss`` for the rank terms. Its kernels are Triton
  and need a GPU.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

WORKLOADS = ("logprobs", "token_kl", "loss")
METHODS = {
    "logprobs": ("fused", "naive", "compiled", "torch_lce", "liger"),
    "token_kl": ("fused", "naive", "compiled", "liger"),
    "loss": ("fused", "naive", "naive_masked", "compiled", "torch_lce", "liger"),
}
METHOD_NOTES = {
    "fused": "firempo-kernels",
    "naive": "full logits at every position, log_softmax, gather (eager)",
    "naive_masked": "span positions gathered before the head, then as naive (eager)",
    "compiled": "torch.compile of naive (ops) / naive-masked (loss)",
    "torch_lce": "F.linear_cross_entropy, chunked (loss: + naive-masked KL)",
    "liger": "Liger-Kernel fused linear CE / JSD (beta 0 and 1) / DPO",
}

MODES = ("forward", "backward", "forward+backward")
# VQA answers: a long image + prompt prefix, a short answer with one tagged phrase of 16 tokens per row.
# Dense (reports, sequence-level DPO): every position of the row is a weighted response token.
REGIMES = {
    "vqa": lambda seq: {"spans": 16, "response": 32},
    "dense": lambda seq: {"spans": seq, "response": seq},
}

# The paper's defaults (docs/design.md section 1).
LOSS_HPARAMS = {"beta": 0.1, "alpha": 0.01, "gamma": 0.1, "lambda_": 0.5}
IGNORE = -100
# Logits get a standard deviation of about LOGIT_STD, the spread of a trained LM head's logits; the
# reference hidden states are the policy's plus REF_NOISE of noise, so the KL is small as in training.
LOGIT_STD = 2.0
REF_NOISE = 0.3


@dataclass(frozen=True)
class Case:
    """One benchmark case: a workload, a method, and its shapes. Serialises to JSON for the worker."""

    workload: str
    method: str
    vocab: int
    dim: int
    dtype: str = "float32"
    head: str = "frozen"  # "frozen" (the paper's LoRA setting: no dW) or "trainable"
    device: str = "cpu"
    tokens: int = 0  # ops: N
    batch: int = 0  # loss: B examples, 4 * B rows
    seq: int = 0  # loss: T positions per row
    response: int = 0  # loss: labelled response positions at the end of each row; the rest is the prompt
    spans: int = 0  # loss: weighted span tokens per row, inside the response
    regime: str = ""  # a label: "vqa", "dense", ...
    seed: int = 0

    def __post_init__(self):
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; one of {WORKLOADS}")
        if self.method not in METHODS[self.workload]:
            raise ValueError(f"unknown method {self.method!r} for {self.workload}; one of {METHODS[self.workload]}")
        if self.head not in ("frozen", "trainable"):
            raise ValueError(f"head must be 'frozen' or 'trainable'; got {self.head!r}")
        if self.workload == "loss" and not (0 < self.spans <= self.response <= self.seq and self.batch > 0):
            raise ValueError(f"loss case needs 0 < spans <= response <= seq and batch > 0: {self}")
        if self.workload != "loss" and self.tokens <= 0:
            raise ValueError(f"op case needs tokens > 0: {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Case":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def positions(self) -> int:
        """Token positions the naive method runs the head on (per model)."""
        return self.tokens if self.workload != "loss" else 4 * self.batch * self.seq

    @property
    def span_tokens(self) -> int:
        """Tokens that enter the objective (per model)."""
        return self.tokens if self.workload != "loss" else 4 * self.batch * self.spans

    @property
    def gradient_mib(self) -> float:
        """MiB of the gradients one step must produce whatever the method: dh over the whole hidden tensor,
        and dW when the head trains. Part of every method's peak; the rest is the method's working memory."""
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        hidden = self.positions * self.dim
        head = self.vocab * self.dim if self.head == "trainable" else 0
        return (hidden + head) * itemsize / (1 << 20)

    def shape_label(self) -> str:
        if self.workload == "loss":
            return f"B={self.batch} T={self.seq} spans/row={self.spans} V={self.vocab} d={self.dim}"
        return f"N={self.tokens} V={self.vocab} d={self.dim}"


def skip_reason(case: Case) -> str | None:
    """Why ``case`` cannot run here (None when it can); decided without building anything."""
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if case.method == "liger":
        if case.device != "cuda":
            return "Liger-Kernel's fused linear CE and JSD are Triton kernels that need a GPU"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed (pip install 'firempo-kernels[bench]')"
    if case.method == "torch_lce" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"F.linear_cross_entropy with LinearCrossEntropyOptions needs torch >= 2.13 (have {torch.__version__})"
    return None


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------
class OpInputs(NamedTuple):
    hidden: torch.Tensor  # [N, d], requires grad
    weight: torch.Tensor  # [V, d], requires grad iff the head trains
    ref_hidden: torch.Tensor  # [N, d]
    ref_weight: torch.Tensor  # [V, d]: the same tensor as weight when frozen, a frozen copy when it trains
    targets: torch.Tensor  # [N] int64


class LossInputs(NamedTuple):
    weight: torch.Tensor  # [V, d]
    ref_weight: torch.Tensor  # [V, d]
    hidden: torch.Tensor  # [4B, T, d], requires grad
    ref_hidden: torch.Tensor  # [4B, T, d]
    labels: torch.Tensor  # [4B, T], IGNORE on the prompt
    span_weights: torch.Tensor  # [4B, T], 1 on the span tokens
    has_corrupted_image: torch.Tensor  # [B] bool, all True


def _heads(case: Case, gen: torch.Generator, dtype: torch.dtype):
    device = torch.device(case.device)
    weight = torch.randn(case.vocab, case.dim, generator=gen, device=device) * (LOGIT_STD / math.sqrt(case.dim))
    weight = weight.to(dtype)
    trains = case.head == "trainable"
    # A trained head has its own frozen reference copy; a frozen one is shared by both models.
    ref_weight = weight.detach().clone() if trains else weight
    return weight.requires_grad_(trains), ref_weight


def _hidden_pair(shape, gen, device, dtype):
    hidden = torch.randn(*shape, generator=gen, device=device)
    ref_hidden = hidden + REF_NOISE * torch.randn(*shape, generator=gen, device=device)
    return hidden.to(dtype).requires_grad_(True), ref_hidden.to(dtype)


def make_inputs(case: Case):
    """The inputs of ``case`` (the same for every method: the seed and shapes decide them)."""
    dtype = getattr(torch, case.dtype)
    device = torch.device(case.device)
    gen = torch.Generator(device=device)
    gen.manual_seed(case.seed)
    weight, ref_weight = _heads(case, gen, dtype)
    if case.workload != "loss":
        hidden, ref_hidden = _hidden_pair((case.tokens, case.dim), gen, device, dtype)
        targets = torch.randint(0, case.vocab, (case.tokens,), generator=gen, device=device)
        return OpInputs(hidden, weight, ref_hidden, ref_weight, targets)

    b, t, r, s = case.batch, case.seq, case.response, case.spans
    hidden, ref_hidden = _hidden_pair((4 * b, t, case.dim), gen, device, dtype)
    # (v', y+) and (v', y-) are the same two responses as (v, y+), (v, y-) under the corrupted image.
    labels = torch.full((2 * b, t), IGNORE, dtype=torch.int64, device=device)
    labels[:, t - r :] = torch.randint(0, case.vocab, (2 * b, r), generator=gen, device=device)
    starts = torch.randint(t - r, t - s + 1, (2 * b, 1), generator=gen, device=device)
    pos = torch.arange(t, device=device)[None, :]
    span_weights = ((pos >= starts) & (pos < starts + s)).to(torch.float32)
    return LossInputs(
        weight, ref_weight, hidden, ref_hidden,
        labels.repeat(2, 1), span_weights.repeat(2, 1),
        torch.ones(b, dtype=torch.bool, device=device),
    )


# ------------------------------------------------------------------------------------------------------
# Shared math: every method ends in these, so they differ only in how they get per-token values.
# ------------------------------------------------------------------------------------------------------
def op_objective(logp, kl_forward=None, kl_reverse=None) -> torch.Tensor:
    """The scalar each op benchmark backpropagates: every output gets a gradient."""
    total = logp.sum()
    if kl_forward is not None:
        total = total + 0.5 * (kl_forward.sum() + kl_reverse.sum())
    return total


def firempo_from_sums(delta, kl_forward, kl_reverse, has_corrupted_image, hp=LOSS_HPARAMS) -> torch.Tensor:
    """FiRe-MPO (reversed visual pairing) from per-row rewards ``delta`` [4, B] and per-example
    w-weighted KL sums over the (v, y+) span tokens [B]; the mean over the B examples."""
    c = has_corrupted_image.to(delta.dtype)
    rank = -F.logsigmoid(hp["beta"] * (delta[0] - delta[1]))
    visual = -hp["gamma"] * c * F.logsigmoid(hp["beta"] * (delta[3] - delta[2]))
    kl = hp["alpha"] * (hp["lambda_"] * kl_forward + (1 - hp["lambda_"]) * kl_reverse)
    return (rank + visual + kl).mean()


def _full_kl(logp_all, ref_logp_all):
    """Both KL directions from two full [n, V] log-distributions."""
    kl_forward = (ref_logp_all.exp() * (ref_logp_all - logp_all)).sum(-1)
    kl_reverse = (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1)
    return kl_forward, kl_reverse


# ------------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------------
def naive_logprobs_objective(hidden, weight, targets):
    logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [N, V]
    return op_objective(logp_all.gather(-1, targets[:, None])[:, 0])


def naive_token_kl_objective(hidden, weight, ref_hidden, ref_weight, targets):
    logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [N, V]
    with torch.no_grad():
        ref_logp_all = torch.log_softmax((ref_hidden @ ref_weight.T).float(), dim=-1)
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    return op_objective(logp, *_full_kl(logp_all, ref_logp_all))


def _op_step(case: Case, x: OpInputs) -> Callable[[], torch.Tensor]:
    kl = case.workload == "token_kl"
    if case.method == "fused":
        import firempo_kernels as fk

        if kl:
            def step():
                out = fk.fused_linear_token_kl(x.hidden, x.weight, x.ref_hidden, x.ref_weight, x.targets)
                return op_objective(out.logp, out.kl_forward, out.kl_reverse)
        else:
            def step():
                return op_objective(fk.fused_linear_logprobs(x.hidden, x.weight, x.targets))
        return step

    if case.method in ("naive", "compiled"):
        fn = naive_token_kl_objective if kl else naive_logprobs_objective
        if case.method == "compiled":
            fn = torch.compile(fn, dynamic=False)
        args = (x.hidden, x.weight, x.ref_hidden, x.ref_weight, x.targets) if kl else (x.hidden, x.weight, x.targets)
        return lambda: fn(*args)

    if case.method == "torch_lce":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda: op_objective(
            -F.linear_cross_entropy(x.hidden, x.weight, x.targets, reduction="none", options=options)
        )

    if case.method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        jsd_forward, jsd_reverse = LigerFusedLinearJSD(jsd_beta=0.0), LigerFusedLinearJSD(jsd_beta=1.0)
        n = case.tokens

        def step():
            logp = -ce(x.weight, x.hidden, x.targets)
            if not kl:
                return op_objective(logp)
            with torch.no_grad():  # the reference log-prob: one of the op's outputs, so it is computed too
                ce(x.ref_weight, x.ref_hidden, x.targets)
            # Liger's JSD returns the mean over tokens; times n, it is the sum op_objective takes.
            kl_f = jsd_forward(x.hidden, x.weight, x.ref_hidden, x.ref_weight, None) * n
            kl_r = jsd_reverse(x.hidden, x.weight, x.ref_hidden, x.ref_weight, None) * n
            return logp.sum() + 0.5 * (kl_f + kl_r)
        return step
    raise ValueError(case.method)


# ------------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------------
def naive_loss(weight, ref_weight, hidden, ref_hidden, labels, span_weights, has_corrupted_image):
    """The authors' approach: logits of every position of all 8 passes, then log_softmax and gather."""
    logits = hidden @ weight.T  # [4B, T, V]: what the LM head returns for the whole batch
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        ref_logp_all = torch.log_softmax((ref_hidden @ ref_weight.T).float(), dim=-1)
    idx = labels.clamp(min=0)[..., None]
    token_logp = logp_all.gather(-1, idx)[..., 0]
    token_ref_logp = ref_logp_all.gather(-1, idx)[..., 0]
    b = has_corrupted_image.shape[0]
    delta = ((token_logp - token_ref_logp) * span_weights).sum(-1).reshape(4, b)
    # The token KL, full vocabulary, at the (v, y+) span positions.
    sel = span_weights[:b] > 0
    kl_f, kl_r = _full_kl(logp_all[:b][sel], ref_logp_all[:b][sel])
    w0 = span_weights[:b][sel]
    rows0 = torch.nonzero(sel)[:, 0]
    kl_f = torch.zeros(b, dtype=kl_f.dtype, device=kl_f.device).index_add(0, rows0, w0 * kl_f)
    kl_r = torch.zeros(b, dtype=kl_r.dtype, device=kl_r.device).index_add(0, rows0, w0 * kl_r)
    return firempo_from_sums(delta, kl_f, kl_r, has_corrupted_image)


class SpanGather(NamedTuple):
    """The span tokens of a loss batch in row-major order (so the (v, y+) ones come first)."""

    rows: torch.Tensor  # [S]
    positions: torch.Tensor  # [S]
    labels: torch.Tensor  # [S]
    weights: torch.Tensor  # [S]
    num_first_block: int  # S0: span tokens of the (v, y+) rows


def gather_spans(labels, span_weights, num_examples) -> SpanGather:
    rows, positions = torch.nonzero(span_weights > 0, as_tuple=True)
    return SpanGather(
        rows, positions, labels[rows, positions], span_weights[rows, positions],
        int((rows < num_examples).sum()),
    )


def masked_loss_from_tokens(weight, ref_weight, h, rh, y, w, rows, num_first_block, has_corrupted_image):
    """Naive math on gathered span tokens only: h, rh [S, d]; y, w, rows [S]."""
    b = has_corrupted_image.shape[0]
    logp_all = torch.log_softmax((h @ weight.T).float(), dim=-1)  # [S, V]
    with torch.no_grad():
        ref_logp_all = torch.log_softmax((rh @ ref_weight.T).float(), dim=-1)
    token_logp = logp_all.gather(-1, y[:, None])[:, 0]
    token_ref_logp = ref_logp_all.gather(-1, y[:, None])[:, 0]
    return _sums_to_loss(
        token_logp, token_ref_logp, logp_all[:num_first_block], ref_logp_all[:num_first_block],
        w, rows, num_first_block, has_corrupted_image, b,
    )


def _sums_to_loss(token_logp, token_ref_logp, logp0, ref_logp0, w, rows, s0, has_corrupted_image, b):
    delta = torch.zeros(4 * b, dtype=token_logp.dtype, device=token_logp.device)
    delta = delta.index_add(0, rows, w * (token_logp - token_ref_logp)).reshape(4, b)
    kl_f, kl_r = _full_kl(logp0, ref_logp0)
    zeros = torch.zeros(b, dtype=kl_f.dtype, device=kl_f.device)
    kl_f = zeros.index_add(0, rows[:s0], w[:s0] * kl_f)
    kl_r = zeros.index_add(0, rows[:s0], w[:s0] * kl_r)
    return firempo_from_sums(delta, kl_f, kl_r, has_corrupted_image)


def lce_options(num_tokens: int, dim: int):
    """PyTorch documents its chunked path as a win only when the tokens are at least ``in_features``; below
    that it is many times slower than its reference path (5 s against 0.3 s at N = 128, V = 32000, d = 512 on
    the CPU), so the baseline follows the documented rule."""
    return torch.nn.LinearCrossEntropyOptions() if num_tokens >= dim else None


def lce_loss_from_tokens(weight, ref_weight, h, rh, y, w, rows, s0, has_corrupted_image):
    """Log-probs from PyTorch's linear cross-entropy; the KL as naive-masked (no op fuses it)."""
    b = has_corrupted_image.shape[0]
    options = lce_options(h.shape[0], h.shape[1])
    token_logp = -F.linear_cross_entropy(h, weight, y, reduction="none", options=options)
    with torch.no_grad():
        token_ref_logp = -F.linear_cross_entropy(rh, ref_weight, y, reduction="none", options=options)
        ref_logp0 = torch.log_softmax((rh[:s0] @ ref_weight.T).float(), dim=-1)
    logp0 = torch.log_softmax((h[:s0] @ weight.T).float(), dim=-1)
    return _sums_to_loss(token_logp, token_ref_logp, logp0, ref_logp0, w, rows, s0, has_corrupted_image, b)


def _liger_loss_step(case: Case, x: LossInputs) -> Callable[[], torch.Tensor]:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from liger_kernel.transformers import LigerFusedLinearJSD

    hp = LOSS_HPARAMS
    b = case.batch
    # Liger compiles its chunk step with torch.compile by default; kept on the GPU, where it is its best.
    dpo = LigerFusedLinearDPOLoss(
        beta=hp["beta"], use_ref_model=True, compute_nll_loss=False, compiled=case.device == "cuda"
    )
    jsd_forward, jsd_reverse = LigerFusedLinearJSD(jsd_beta=0.0), LigerFusedLinearJSD(jsd_beta=1.0)
    # Liger's DPO takes [2B, T', d] rows, chosen then rejected, and sums log-probs over non-ignored labels:
    # give it the span tokens of each row, packed to the left (the best layout for it), the rest ignored.
    span = x.span_weights > 0
    width = int(span.sum(1).max())
    order = torch.argsort((~span).to(torch.int8), dim=1, stable=True)[:, :width]  # span positions first
    packed_labels = torch.where(
        torch.gather(span, 1, order), torch.gather(x.labels, 1, order), torch.full_like(order, IGNORE)
    )
    rows = torch.arange(4 * b, device=x.labels.device)[:, None]
    s0 = int(span[:b].sum())
    first_rows, first_pos = torch.nonzero(span[:b], as_tuple=True)

    def blocks(t, first, second):
        return torch.cat((t[first * b : (first + 1) * b], t[second * b : (second + 1) * b]))

    def step():
        h = x.hidden[rows, order]  # [4B, width, d]
        with torch.no_grad():
            rh = x.ref_hidden[rows, order]
        rank = dpo(x.weight, blocks(h, 0, 1), blocks(packed_labels, 0, 1),
                   ref_input=blocks(rh, 0, 1), ref_weight=x.ref_weight)[0]
        # Reversed visual pairing: under v' the rejected response should win.
        visual = dpo(x.weight, blocks(h, 3, 2), blocks(packed_labels, 3, 2),
                     ref_input=blocks(rh, 3, 2), ref_weight=x.ref_weight)[0]
        h0, rh0 = x.hidden[first_rows, first_pos], x.ref_hidden[first_rows, first_pos]
        # JSD returns the mean over tokens; times S0 / B it is the per-example mean of the sums.
        kl_f = jsd_forward(h0, x.weight, rh0, x.ref_weight, None) * (s0 / b)
        kl_r = jsd_reverse(h0, x.weight, rh0, x.ref_weight, None) * (s0 / b)
        return rank + hp["gamma"] * visual + hp["alpha"] * (hp["lambda_"] * kl_f + (1 - hp["lambda_"]) * kl_r)
    return step


def _loss_step(case: Case, x: LossInputs) -> Callable[[], torch.Tensor]:
    if case.method == "fused":
        import firempo_kernels as fk

        loss_fn = fk.FiReMPOLoss(**LOSS_HPARAMS)
        ref_weight = None if x.ref_weight is x.weight else x.ref_weight
        return lambda: loss_fn(
            x.weight, x.hidden, x.ref_hidden, x.labels, x.span_weights, x.has_corrupted_image,
            ref_weight=ref_weight,
        ).loss

    if case.method == "naive":
        return lambda: naive_loss(
            x.weight, x.ref_weight, x.hidden, x.ref_hidden, x.labels, x.span_weights, x.has_corrupted_image
        )

    if case.method == "liger":
        return _liger_loss_step(case, x)

    if case.method == "naive_masked":
        core = masked_loss_from_tokens
    elif case.method == "compiled":
        core = torch.compile(masked_loss_from_tokens, dynamic=False)
    elif case.method == "torch_lce":
        core = lce_loss_from_tokens
    else:
        raise ValueError(case.method)

    def step():
        g = gather_spans(x.labels, x.span_weights, case.batch)
        h = x.hidden[g.rows, g.positions]
        rh = x.ref_hidden[g.rows, g.positions]
        return core(x.weight, x.ref_weight, h, rh, g.labels, g.weights, g.rows, g.num_first_block,
                    x.has_corrupted_image)
    return step


def make_step(case: Case, inputs) -> Callable[[], torch.Tensor]:
    """A closure that runs the forward of ``case.method`` on ``inputs`` and returns the scalar objective."""
    if case.workload == "loss":
        return _loss_step(case, inputs)
    return _op_step(case, inputs)


def grad_leaves(inputs) -> list[torch.Tensor]:
    """The tensors that receive gradients (their ``.grad`` is cleared between runs)."""
    return [t for t in (inputs.hidden, inputs.weight) if t.requires_grad]

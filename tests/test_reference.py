"""The thin loss adapter and the three references (frozen model, adapters disabled, precomputed store), in one
process without DeepSpeed (the ZeRO-3 runs are in test_trainer_distributed.py)."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from firempo_kernels.integrations.batch import PreferenceCollator
from firempo_kernels.integrations.precompute import (
    PrecomputedReferenceStore,
    PrecomputedStoreReference,
    precompute_reference,
)
from firempo_kernels.integrations.smoke import synthetic_examples, tiny_model
from firempo_kernels.integrations.forward import compute_firempo_loss
from firempo_kernels.integrations.reference import ADAPTERS_DISABLED
from firempo_kernels.losses import FiReMPOLoss

peft = pytest.importorskip("peft")

FAMILY = "qwen2_5_vl"
HP = dict(beta=0.5, alpha=0.2, gamma=0.5, lambda_=0.3)


pytestmark = pytest.mark.usefixtures("one_thread")


def draw_seed() -> int:
    return int(torch.randint(0, 2**20, ()))


def examples(n, seed, corrupted_every=2):
    return synthetic_examples(tiny_model(FAMILY).config, n, seed=seed, corrupted_every=corrupted_every)


def loss_and_grads(model, reference, batch, loss_fn, **kwargs):
    model.zero_grad(set_to_none=True)
    out = compute_firempo_loss(model, reference, batch, loss_fn, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_same(a, b, rtol):
    """Loss within ``rtol`` relative; each gradient tensor within ``rtol`` relative in norm, plus 1e-7 of the
    whole gradient's norm (fp32 rounding follows the size of the terms summed, not of a sum that nearly
    cancels, so single entries are no measure)."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=rtol, atol=0.0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    total = torch.cat([g.flatten() for g in grads_b.values()]).norm().item()
    for name in grads_a:
        scale = grads_b[name].norm().item()
        error = (grads_a[name] - grads_b[name]).norm().item()
        assert error <= rtol * scale + 1e-7 * total, f"{name}: |diff| {error:.3e}, |grad| {scale:.3e}"


def lora_policy(seed):
    base = tiny_model(FAMILY, seed=seed)
    policy = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():  # LoRA starts as the identity; move it so policy and reference differ
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return policy.train()


def test_adapters_disabled_reference_equals_a_frozen_copy_of_the_base_model():
    seed = draw_seed()
    policy = lora_policy(seed)
    base_copy = tiny_model(FAMILY, seed=seed)  # the same random weights as the policy's base
    batch = PreferenceCollator(0)(examples(3, seed))
    loss_fn = FiReMPOLoss(**HP)
    live = loss_and_grads(policy, ADAPTERS_DISABLED, batch, loss_fn)
    separate = loss_and_grads(policy, base_copy, batch, loss_fn)
    # The same modules on the same inputs: only the reference head is another (equal) tensor.
    assert_same(live, separate, rtol=1e-6)
    assert live[0].metrics["kl/forward"] > 0
    assert all("lora_" in name for name in live[1])  # the base model (head included) stays frozen
    assert policy.training  # the reference pass switched dropout off only while it ran


@pytest.mark.parametrize("gamma", [0.5, 0.0])
def test_precomputed_reference_equals_live_reference(tmp_path, gamma):
    seed = draw_seed()
    policy, reference = tiny_model(FAMILY, seed=seed).train(), tiny_model(FAMILY, seed=seed + 1)
    data = examples(5, seed)
    collate = PreferenceCollator(0)
    # Stored from batches of another composition than the training batches; always with the (v', .) blocks.
    precompute_reference(reference, [collate(data[:3]), collate(data[3:])], tmp_path, progress=False)
    store = PrecomputedReferenceStore(tmp_path)
    assert len(store) == 5 and store.metadata["include_corrupted"]
    loss_fn = FiReMPOLoss(**{**HP, "gamma": gamma})
    for batch in (collate([data[4], data[1]]), collate([data[1]]), collate(data)):
        live = loss_and_grads(policy, reference, batch, loss_fn)
        stored = loss_and_grads(policy, store.lookup(batch.example_ids), batch, loss_fn, reference_head=store.head())
        # The same reference values reach the loss; the policy-side arithmetic is the same but split into
        # two op calls, so only the order of a few fp32 sums differs.
        assert_same(live, stored, rtol=1e-5)


def test_precomputed_reference_shares_a_frozen_policy_head(tmp_path):
    """The paper's LoRA setting: the reference is the policy without adapters, the head is frozen and
    shared, so the store's head is not needed."""
    seed = draw_seed()
    policy = lora_policy(seed)
    data = examples(4, seed, corrupted_every=3)
    collate = PreferenceCollator(0)
    precompute_reference(policy, [collate(data)], tmp_path, progress=False)
    store = PrecomputedReferenceStore(tmp_path)
    loss_fn = FiReMPOLoss(**HP)
    stored = PrecomputedStoreReference(store)
    assert stored.head(policy) is None  # the frozen head is shared, not copied from the store
    # A batch without any v' while the loop asks for the (v', .) pass (another rank has one).
    for batch, corrupted in ((collate(data[1:3]), True), (collate(data), None)):
        live = loss_and_grads(policy, ADAPTERS_DISABLED, batch, loss_fn, corrupted_pass=corrupted)
        out, grads = loss_and_grads(policy, stored, batch, loss_fn, corrupted_pass=corrupted)
        assert_same(live, (out, grads), rtol=1e-5)
    assert "visual/margins" in out.metrics


def test_bad_arguments_are_named():
    seed = draw_seed()
    policy = tiny_model(FAMILY, seed=seed)
    batch = PreferenceCollator(0)(examples(2, seed))
    with pytest.raises(TypeError, match="needs a peft model"):
        compute_firempo_loss(policy, ADAPTERS_DISABLED, batch, FiReMPOLoss())
    with pytest.raises(TypeError, match="`batch` must be a PreferenceBatch"):
        compute_firempo_loss(policy, policy, dataclasses.asdict(batch), FiReMPOLoss())
    with pytest.raises(ValueError, match="the only string accepted is 'adapters_disabled'"):
        compute_firempo_loss(policy, "policy", batch, FiReMPOLoss())
    with pytest.raises(TypeError, match="`reference` must be"):
        compute_firempo_loss(policy, 3, batch, FiReMPOLoss())
    with pytest.raises(ValueError, match="`head` goes with a PrecomputedReference"):
        compute_firempo_loss(policy, tiny_model(FAMILY), batch, FiReMPOLoss(), reference_head=(None, None))


def test_store_refuses_a_loss_it_cannot_serve(tmp_path):
    seed = draw_seed()
    reference = tiny_model(FAMILY, seed=seed)
    collate = PreferenceCollator(0)
    precompute_reference(reference, [collate(examples(2, seed))], tmp_path, keep_hidden=False,
                         include_corrupted=False, progress=False)
    store = PrecomputedReferenceStore(tmp_path)
    with pytest.raises(ValueError, match="alpha > 0"):
        store.check_compatible(temperature=1.0, ignore_index=-100, needs_hidden=True, needs_corrupted=False)
    with pytest.raises(ValueError, match="gamma > 0"):
        store.check_compatible(temperature=1.0, ignore_index=-100, needs_hidden=False, needs_corrupted=True)
    with pytest.raises(ValueError, match="temperature=1.0"):
        store.check_compatible(temperature=2.0, ignore_index=-100, needs_hidden=False, needs_corrupted=False)
    with pytest.raises(KeyError, match="other data"):
        store.get("not-an-example")
    with pytest.raises(FileNotFoundError, match="without hidden states"):
        store.head()
    with pytest.raises(FileNotFoundError, match="build the store first"):
        PrecomputedReferenceStore(tmp_path / "missing")


def snapshot(folder):
    """Every file under ``folder`` with its bytes: a store left as it was compares equal."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_store_is_never_built_over_another(tmp_path):
    """A second build into a folder holding a store (complete, or cut short before its index) is refused with
    what the folder holds, and the store is byte for byte as before; ``overwrite=True`` replaces it, and only
    the store's own files."""
    seed = draw_seed()
    collate = PreferenceCollator(0)
    batches = [collate(examples(2, seed))]
    precompute_reference(tiny_model(FAMILY, seed=seed), batches, tmp_path, progress=False)
    first_head = PrecomputedReferenceStore(tmp_path).metadata["source"]["head"]
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    other = tiny_model(FAMILY, seed=seed + 1)
    with pytest.raises(FileExistsError, match=r"already holds a reference store of 2 example\(s\) built from "
                                              r"Qwen2_5_VLForConditionalGeneration[\s\S]*overwrite"):
        precompute_reference(other, batches, tmp_path, progress=False)
    assert snapshot(tmp_path) == before
    (tmp_path / "index.json").unlink()
    with pytest.raises(FileExistsError, match="unfinished reference store"):
        precompute_reference(other, batches, tmp_path, progress=False)
    precompute_reference(other, batches, tmp_path, progress=False, overwrite=True)
    assert PrecomputedReferenceStore(tmp_path).metadata["source"]["head"] != first_head
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(TypeError, match="`overwrite` must be a bool"):
        precompute_reference(other, batches, tmp_path / "new", progress=False, overwrite="yes")


def test_transformers_trainer_recipe_trains_on_the_window_mean(tmp_path):
    """A plain ``transformers.Trainer`` whose compute_loss calls compute_firempo_loss: batches travel in a dict;
    the head is read inside the model's forward, so the same code runs under ZeRO-3."""
    import transformers

    seed = draw_seed()
    policy, reference = tiny_model(FAMILY, seed=seed), tiny_model(FAMILY, seed=seed + 1)
    loss_fn = FiReMPOLoss(**HP)
    data = examples(4, seed)
    collate = PreferenceCollator(0)
    with torch.no_grad():
        expected = compute_firempo_loss(policy.train(), reference, collate(data), loss_fn).loss.item()

    class FiReMPOHFTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = compute_firempo_loss(model, reference, inputs["batch"], loss_fn)
            return (out.loss, out.metrics) if return_outputs else out.loss

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=1e-4, remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
        seed=seed,
    )
    trainer = FiReMPOHFTrainer(model=policy, args=args, train_dataset=data,
                               data_collator=lambda batch: {"batch": collate(batch)})
    result = trainer.train()
    # Two equal micro-batches, each a mean, divided by the accumulation steps: the mean of all four.
    assert result.training_loss == pytest.approx(expected, rel=1e-5)


def test_the_training_stack_imports_one_way():
    """blocks <- reference <- precompute, blocks + reference <- forward <- trl: no module of the training stack
    reaches itself through its imports (lazy and type-only ones included)."""
    import firempo_kernels.integrations as package

    root = Path(package.__file__).parent
    imports = {}
    for path in root.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
        imports[path.stem] = found
    for start in imports:
        stack, seen = [(start, [start])], set()
        while stack:
            name, path = stack.pop()
            for following in imports.get(name, ()):
                assert following != start, " -> ".join(path + [following])
                if following not in seen:
                    seen.add(following)
                    stack.append((following, path + [following]))
    assert {"reference", "precompute", "forward"}.isdisjoint(imports["blocks"])

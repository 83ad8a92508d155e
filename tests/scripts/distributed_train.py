"""Two-rank ZeRO-3 training scenarios on CPU (gloo), launched by tests/test_trainer_distributed.py with
``torchrun --nproc_per_node 2``. Rank 0 saves what each scenario produced to ``<out>/results.pt``:

- trainable / frozen head: loss per step, final consolidated policy weights, how the head was partitioned;
- resume: the run restarted from the step-2 checkpoint of the trainable-head run;
- precomputed: a reference pass over the data, then training without any reference model;
- non-finite: the error raised for a NaN image, and whether the weights moved.
"""

import faulthandler
import os
import sys
import traceback

import torch

torch.set_num_threads(1)  # two ranks share two cores

from trainer_cases import (  # noqa: E402
    collator, deepspeed_config, make_data, make_loss, make_policy, make_reference, trainer_config,
)

from firempo_kernels.integrations.precompute import PrecomputedReferenceStore, precompute_reference  # noqa: E402
from firempo_kernels.integrations.trainer import (  # noqa: E402
    FiReMPOModule, FiReMPOTrainer, NonFiniteLossError, init_distributed,
)


def head_partition(policy):
    """(elements this rank holds, full elements, elements visible outside a forward) of the head weight."""
    w = policy.get_output_embeddings().weight
    return int(w.ds_tensor.numel()), int(w.ds_numel), int(w.numel())


def main(out, seed):
    rank, world = init_distributed()
    assert world == 2, world
    results = {}
    data = make_data(seed)

    for name, frozen in (("trainable", False), ("frozen", True)):
        policy = make_policy(seed, frozen)
        trainer = FiReMPOTrainer(
            FiReMPOModule(policy, make_loss(), make_reference(seed)), data, collator(),
            trainer_config(os.path.join(out, name), seed, save_steps=2, save_final_model=not frozen,
                           save_total_limit=1 if frozen else None),
            deepspeed_config(),
        )
        partition = head_partition(policy)
        result = trainer.train()
        results[name] = {"losses": result.losses, "state": trainer.consolidated_policy_state_dict(),
                         "head_partition": partition, "history": result.history}

    # Resume from the step-2 checkpoint of the trainable-head run, in a fresh engine.
    policy = make_policy(seed, False)
    trainer = FiReMPOTrainer(
        FiReMPOModule(policy, make_loss(), make_reference(seed)), data, collator(),
        trainer_config(os.path.join(out, "trainable"), seed,
                       resume_from=os.path.join(out, "trainable", "checkpoints", "step-2")),
        deepspeed_config(),
    )
    start = trainer.global_step
    result = trainer.train()
    results["resume"] = {"start": start, "losses": result.losses, "state": trainer.consolidated_policy_state_dict()}

    # Precomputed reference: one reference pass (each rank its share), then no reference model at all.
    store_dir = os.path.join(out, "reference_store")
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_size=3, sampler=sampler, collate_fn=collator())
    loss = make_loss()
    precompute_reference(make_reference(seed), loader, store_dir, temperature=loss.temperature,
                         ignore_index=loss.ignore_index, rank=rank, world_size=world, progress=False)
    store = PrecomputedReferenceStore(store_dir)
    policy = make_policy(seed, False)
    trainer = FiReMPOTrainer(
        FiReMPOModule(policy, make_loss(), "precomputed", reference_head=store.head()), data, collator(),
        trainer_config(os.path.join(out, "precomputed"), seed), deepspeed_config(), reference_store=store,
    )
    result = trainer.train()
    results["precomputed"] = {"losses": result.losses, "state": trainer.consolidated_policy_state_dict(),
                              "store_size": len(store)}

    # A NaN image on one rank: every rank stops before any backward, the weights stay as they were.
    bad = make_data(seed)
    bad[1].images["pixel_values"][0, 0] = float("nan")
    policy = make_policy(seed, False)
    trainer = FiReMPOTrainer(
        FiReMPOModule(policy, make_loss(), make_reference(seed)), bad, collator(),
        trainer_config(os.path.join(out, "nonfinite"), seed, shuffle=False), deepspeed_config(),
    )
    before = trainer.consolidated_policy_state_dict()
    try:
        trainer.train()
        message = None
    except NonFiniteLossError as e:
        message = str(e)
    after = trainer.consolidated_policy_state_dict()
    if rank == 0:
        moved = max((after[k].double() - before[k].double()).abs().max().item() for k in before)
        results["nonfinite"] = {"message": message, "max_weight_change": moved}
        torch.save(results, os.path.join(out, "results.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    # A collective that one rank never reaches would otherwise wait for the 10-minute gloo timeout.
    faulthandler.dump_traceback_later(float(os.environ.get("FIREMPO_TEST_HANG_S", "200")), exit=True)
    try:
        main(sys.argv[1], int(sys.argv[2]))
    except Exception:
        traceback.print_exc()
        sys.exit(1)

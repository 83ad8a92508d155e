"""Precomputed reference: one reference pass over the data, stored as safetensors shards beside it, so
training runs no reference model at all (four model passes per example instead of eight).

Per example the store holds what the FiRe-MPO loss reads from the reference (see
:class:`firempo_kernels.precomputed_reference.PrecomputedReference`): the reference log-prob at every span
token of the four blocks, the span-token count of each row, and the reference hidden states at the (v, y+)
span tokens (the token KL rebuilds the reference distribution from them; nothing of size V is stored).
That is a few KB to a few MB per example.

Layout of a store directory::

    index.json                        {"metadata": {...}, "examples": {example_id: shard file}}
    reference_head.safetensors        "weight" [V, d'] (+ "bias" [V]): the reference head, for the KL
    reference-r000-00000.safetensors  "<example_id>/logps" [S], "<example_id>/row_counts" [k, 1],
    reference-r001-00000.safetensors  "<example_id>/hidden" [S0, d] (when kept)
    ...

Build it with :func:`precompute_reference` (every rank writes its own shards; rank 0 writes the index) or
``firempo-train --config recipe.yaml --precompute_reference``; read it with :class:`PrecomputedReferenceStore`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firempo_kernels.precomputed_reference import PrecomputedReference

from .batch import PreferenceBatch, update_digest
from .cli import atomic_write
from .blocks import block_targets
from .models import get_adapter, unwrap_model
from .reference import (
    AdaptersDisabledReference,
    Head,
    Reference,
    as_reference,
    compute_dtype,
    is_peft_model,
    placed_reference,
    whole_head,
)

__all__ = ["PrecomputedReferenceStore", "PrecomputedStoreReference", "ReferenceShardWriter", "precompute_reference",
           "STORE_FORMAT", "store_files"]

STORE_FORMAT = 2  # 2: the store records the model it was built from and each example's content hash
_INDEX = "index.json"
_HEAD = "reference_head.safetensors"
# Every file a build writes (the index, each rank's index part, the head, the shards, their temporaries).
_NAMES = r"(?:index\.json|index-r\d{3}\.json|reference_head\.safetensors|reference-r\d{3}-\d{5}\.safetensors)"
_STORE_FILE = re.compile(rf"^(?:{_NAMES}|\.{_NAMES}(?:\.\w+)?\.tmp)$")


def store_files(directory: str | os.PathLike) -> list[Path]:
    """The files of a reference store (complete or cut short) in ``directory``; [] when there are none or no
    such folder. Other files in the folder are not the store's."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and _STORE_FILE.match(p.name))


def _describe_store(directory: Path) -> str:
    """What the store in ``directory`` holds, for a message: its source model and size, or that it is unfinished."""
    try:
        with open(directory / _INDEX, encoding="utf-8") as f:
            meta = json.load(f)["metadata"]
        source = meta.get("source", {})
        return (f"a reference store of {meta.get('num_examples')} example(s) built from "
                f"{source.get('model_class', 'an unrecorded model')} (config {source.get('config')})")
    except FileNotFoundError:
        return "an unfinished reference store (shards without index.json: a build that was cut short)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"a reference store whose index.json is unreadable ({e})"


def _claim_directory(directory: Path, overwrite: bool, rank: int, world_size: int) -> None:
    """Refuse to build into a folder that holds a store, unless ``overwrite``: then the old store's files (and
    only those) are removed by rank 0, after every rank has looked and before any rank writes."""
    found = store_files(directory)
    if found and not overwrite:
        raise FileExistsError(
            f"precompute_reference: {directory} already holds {_describe_store(directory)}; a store is never "
            "rebuilt over silently. Choose another directory, or replace it explicitly (overwrite=True; "
            "firempo-train --overwrite-reference-store)"
        )
    if world_size > 1:
        torch.distributed.barrier()
    if found and rank == 0:
        for path in found:
            path.unlink(missing_ok=True)
    if world_size > 1:
        torch.distributed.barrier()


def _key(example_id: str, name: str) -> str:
    return f"{example_id}/{name}"


class ReferenceShardWriter:
    """Writes per-example references into safetensors shards of about ``shard_bytes`` each (one rank's part).

    Args:
        directory: the store directory (created).
        rank: this process's rank (shard names carry it, so ranks never write the same file).
        shard_bytes: start a new shard once the current one holds this much.
    """

    def __init__(self, directory: str | os.PathLike, rank: int = 0, shard_bytes: int = 1 << 30) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_bytes = rank, shard_bytes
        self.examples: dict[str, str] = {}
        self.hashes: dict[str, str] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards = 0
        self.temperature: float | None = None

    def add(self, example_id: str, reference: PrecomputedReference, content_hash: str | None = None) -> None:
        """Queue one example's reference (``row_counts`` of shape [k, 1]) and the digest of the example it was
        computed from (:meth:`~.batch.PreferenceExample.content_hash`); a repeated id is ignored."""
        if self.temperature is None:
            self.temperature = reference.temperature
        elif reference.temperature != self.temperature:
            raise ValueError(
                f"ReferenceShardWriter.add: one store holds one temperature ({self.temperature}); example "
                f"{example_id!r} has {reference.temperature}"
            )
        if reference.num_examples != 1:
            raise ValueError(
                f"ReferenceShardWriter.add: `reference` must hold one example; got {reference.num_examples}"
            )
        if example_id in self.examples or _key(example_id, "logps") in self._pending:
            return  # a distributed sampler pads the last batch with repeats
        if content_hash is not None:
            self.hashes[example_id] = content_hash
        tensors = {
            _key(example_id, "logps"): reference.logps.detach().to("cpu", torch.float32).contiguous(),
            _key(example_id, "row_counts"): reference.row_counts.detach().to("cpu", torch.int64).contiguous(),
        }
        if reference.hidden is not None:
            tensors[_key(example_id, "hidden")] = reference.hidden.detach().cpu().contiguous()
        self._pending.update(tensors)
        self._pending_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the queued examples to a new shard."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        name = f"reference-r{self.rank:03d}-{self._shards:05d}.safetensors"
        tmp = self.directory / f".{name}.tmp"
        save_file(self._pending, str(tmp), metadata={"format": str(STORE_FORMAT)})
        os.replace(tmp, self.directory / name)
        for key in self._pending:
            if key.endswith("/logps"):
                self.examples[key[: -len("/logps")]] = name
        self._pending, self._pending_bytes = {}, 0
        self._shards += 1

    def close(self) -> dict[str, str]:
        """Flush and write this rank's part of the index; returns it (example id -> shard file)."""
        self.flush()
        with atomic_write(self.directory / f"index-r{self.rank:03d}.json") as f:
            json.dump({"examples": self.examples, "hashes": self.hashes}, f)
        return self.examples


def _write_index(directory: Path, world_size: int, metadata: dict[str, Any]) -> None:
    examples: dict[str, str] = {}
    hashes: dict[str, str] = {}
    for rank in range(world_size):
        part = directory / f"index-r{rank:03d}.json"
        with open(part, encoding="utf-8") as f:
            content = json.load(f)
        for example_id, shard in content["examples"].items():
            examples.setdefault(example_id, shard)
        for example_id, digest in content["hashes"].items():
            hashes.setdefault(example_id, digest)
        part.unlink()
    with atomic_write(directory / _INDEX) as f:  # written last: a store without it is rebuilt
        json.dump({"metadata": {**metadata, "num_examples": len(examples)}, "examples": examples,
                   "hashes": hashes}, f, indent=0)


_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "use_cache", "architectures"}


def _stable_config(value: Any) -> Any:
    """A config dict without what does not change the reference's numbers (paths, versions, flags)."""
    if isinstance(value, dict):
        return {k: _stable_config(v) for k, v in sorted(value.items())
                if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def reference_fingerprint(model: nn.Module, head: tuple[torch.Tensor, torch.Tensor | None]) -> dict[str, str]:
    """What a store's reference was computed by: the model class, a digest of its config and one of its
    (whole) output head's weights. A store is refused for a reference that differs in any of them; the
    tokenizer and the data are checked per example, through each example's content hash."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    config_dict = _stable_config(config.to_dict()) if config is not None else {}
    head_digest = hashlib.blake2b(digest_size=16)
    update_digest(head_digest, head[0])
    update_digest(head_digest, head[1])
    return {
        "model_class": type(base).__name__,
        "config": hashlib.blake2b(json.dumps(config_dict, sort_keys=True, default=str).encode(),
                                  digest_size=16).hexdigest(),
        "head": head_digest.hexdigest(),
    }


def _reference_source(reference: Reference, model: nn.Module) -> tuple[nn.Module, Head]:
    """The model that computes ``reference`` (its own, or ``model`` with its adapters off) and the reference
    head, whole: it is read outside any forward, so a ZeRO-3 partitioned head is gathered into a copy."""
    head = reference.head(model)
    return getattr(reference, "model", model), whole_head(head if head is not None else get_adapter(model).head(model))


@torch.no_grad()
def precompute_reference(
    reference: Reference | nn.Module,
    batches,
    directory: str | os.PathLike,
    *,
    policy: nn.Module | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    keep_hidden: bool = True,
    include_corrupted: bool = True,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    shard_bytes: int = 1 << 30,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    shared_prefix: bool = True,
    overwrite: bool = False,
) -> Path:
    """Run the reference over ``batches`` and store what the loss needs, per example.

    Args:
        reference: a live :class:`~.reference.Reference`, or a model: a peft model stands for itself with its
            adapters disabled (the reference of LoRA training), any other model for a frozen reference.
        batches: an iterable of :class:`PreferenceBatch` (this rank's share of the data).
        directory: the store directory.
        policy: the policy, needed when ``reference`` is an ``AdaptersDisabledReference``.
        temperature, ignore_index: must equal those of the training loss.
        keep_hidden: store the (v, y+) span-token hidden states (needed when the loss has alpha > 0).
        include_corrupted: also run and store the (v', .) blocks (needed when the loss has gamma > 0).
        rank, world_size: this process's place; with several ranks call it on all of them (rank 0 writes
            the index after a barrier).
        device: where the batches go (default: the model's).
        shard_bytes, progress: shard size; a rank-0 progress bar.
        metadata: extra JSON-able facts to record in the index.
        shared_prefix: the two rows of an example share their prompt's forward (:mod:`.packing`).
        overwrite: replace a store already in ``directory`` (its files only); without it such a folder is
            refused (``FileExistsError`` naming what it holds) and left as it was.

    Returns:
        The store directory.
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"precompute_reference: `overwrite` must be a bool; got {overwrite!r}")
    if isinstance(reference, nn.Module):
        policy = reference
        reference = AdaptersDisabledReference() if is_peft_model(reference) else as_reference(reference)
    if not isinstance(reference, Reference) or reference.mode == "precomputed":
        raise TypeError(
            f"precompute_reference: `reference` must be a live Reference or a model; got {type(reference).__name__}"
        )
    model = reference.model if policy is None and hasattr(reference, "model") else policy
    if model is None:
        raise ValueError("precompute_reference: an AdaptersDisabledReference needs the `policy` it runs")
    source, (weight, bias) = _reference_source(reference, model)
    # The reference's log-probs are those of its own logits: soft-capped where its config caps them.
    cap = get_adapter(source).logit_softcap(source)
    capped = {} if cap is None else {"softcap": cap}
    device = torch.device(device) if device is not None else weight.device
    directory = Path(directory)
    _claim_directory(directory, overwrite, rank, world_size)
    writer = ReferenceShardWriter(directory, rank, shard_bytes)
    iterator = batches
    if progress and rank == 0:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="reference pass", unit="batch", dynamic_ncols=True)
    for batch in iterator:
        if not isinstance(batch, PreferenceBatch):
            raise TypeError(f"precompute_reference: batches must be PreferenceBatch; got {type(batch).__name__}")
        batch = batch.to(device, non_blocking=True)
        corrupted = include_corrupted and batch.corrupted_images is not None
        hidden = reference.hidden_states(model, batch, corrupted, shared_prefix)
        labels, span_weights, has_corrupted = block_targets(batch, corrupted)
        ref = PrecomputedReference.from_reference_forward(
            weight, hidden, labels, span_weights, has_corrupted,
            ref_bias=bias, temperature=temperature, ignore_index=ignore_index, keep_hidden=keep_hidden, **capped,
        )
        hashes = batch.content_hashes or (None,) * batch.num_examples
        for example_id, one, digest in zip(batch.example_ids, ref.unbind(), hashes):
            writer.add(example_id, one, digest)
    writer.close()
    if keep_hidden and rank == 0:
        from safetensors.torch import save_file

        saved = {"weight": weight.detach().cpu().contiguous()}
        if bias is not None:
            saved["bias"] = bias.detach().cpu().contiguous()
        save_file(saved, str(directory / _HEAD))
    metadata = {
        "reference": "policy" if reference.mode == "adapters_disabled" else "model",
        **(metadata or {}),
        "format": STORE_FORMAT, "temperature": float(temperature), "ignore_index": int(ignore_index), **capped,
        "keep_hidden": bool(keep_hidden), "include_corrupted": bool(include_corrupted),
        "hidden_size": int(weight.shape[1]), "vocab_size": int(weight.shape[0]),
        "source": reference_fingerprint(source, (weight, bias)),
    }
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        _write_index(directory, world_size, metadata)
    if world_size > 1:
        torch.distributed.barrier()
    return directory


class PrecomputedReferenceStore:
    """Reads a store written by :func:`precompute_reference`; ``lookup(ids)`` gives a batch's reference.

    Args:
        directory: the store directory (with ``index.json``).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / _INDEX
        if not index.is_file():
            raise FileNotFoundError(
                f"PrecomputedReferenceStore: no {_INDEX} in {self.directory}; build the store first "
                "(firempo-train --config recipe.yaml --precompute_reference)"
            )
        with open(index, encoding="utf-8") as f:
            content = json.load(f)
        self.metadata: dict[str, Any] = content["metadata"]
        if self.metadata.get("format") != STORE_FORMAT:
            raise ValueError(
                f"PrecomputedReferenceStore: {index} has format {self.metadata.get('format')}; this version reads "
                f"{STORE_FORMAT}. Rebuild the store."
            )
        self._shard_of: dict[str, str] = content["examples"]
        self._hashes: dict[str, str] = content.get("hashes", {})
        self._open: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._shard_of

    def setting_mismatches(self, *, temperature: float, ignore_index: int, needs_hidden: bool,
                           needs_corrupted: bool) -> list[str]:
        """What keeps the store from serving a loss with these settings, one phrase each ([] when it can)."""
        meta, found = self.metadata, []
        if meta["temperature"] != float(temperature) or meta["ignore_index"] != ignore_index:
            found.append(f"settings (built with temperature={meta['temperature']}, "
                         f"ignore_index={meta['ignore_index']}; "
                         f"the loss has temperature={temperature}, ignore_index={ignore_index})")
        if needs_hidden and not meta["keep_hidden"]:
            found.append("settings (the loss has alpha > 0, a token KL, but the store kept no hidden states)")
        if needs_corrupted and not meta["include_corrupted"]:
            found.append("settings (the loss has gamma > 0, a visual term, but the store has no (v', .) blocks)")
        return found

    def check_compatible(self, *, temperature: float, ignore_index: int, needs_hidden: bool,
                         needs_corrupted: bool) -> None:
        """Raise ``ValueError`` if the store cannot serve a loss with these settings."""
        found = self.setting_mismatches(temperature=temperature, ignore_index=ignore_index, needs_hidden=needs_hidden,
                                        needs_corrupted=needs_corrupted)
        if found:
            raise ValueError(f"PrecomputedReferenceStore({self.directory}): {'; '.join(found)}")

    def source_mismatches(self, reference: Reference, model: nn.Module) -> list[str]:
        """What differs between the model the store was built from and the one that computes ``reference`` (run
        with ``model`` as :func:`precompute_reference` runs it): its class, its config, its head's weights."""
        built = self.metadata.get("source", {})
        now = reference_fingerprint(*_reference_source(reference, model))
        names = {"model_class": "model class", "config": "model config", "head": "output head weights"}
        return [f"{names[k]} ({built.get(k)} when built, {now[k]} now)" for k in now if built.get(k) != now[k]]

    def data_mismatches(self, example_ids: Sequence[str]) -> list[str]:
        """The examples of ``example_ids`` the store has no reference for, as one phrase ([] when it has all)."""
        missing = [i for i in example_ids if i not in self._shard_of]
        if not missing:
            return []
        return [f"data ({len(missing)} of {len(example_ids)} example(s) are not in it, first {missing[:3]})"]

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference head ``(weight [V, d'], bias [V] or None)`` on the CPU (stored with the hidden states)."""
        path = self.directory / _HEAD
        if not path.is_file():
            raise FileNotFoundError(
                f"PrecomputedReferenceStore({self.directory}): no {_HEAD}; the store was built without hidden states "
                "(alpha = 0), so it cannot serve the token KL"
            )
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return tensors["weight"], tensors.get("bias")

    def _handle(self, shard: str):
        if shard not in self._open:
            from safetensors import safe_open

            handle = safe_open(str(self.directory / shard), framework="pt")
            self._open[shard] = (handle, set(handle.keys()))
        return self._open[shard]

    def get(self, example_id: str) -> PrecomputedReference:
        """One example's reference (``row_counts`` [k, 1])."""
        shard = self._shard_of.get(example_id)
        if shard is None:
            raise KeyError(
                f"PrecomputedReferenceStore({self.directory}): no reference for example {example_id!r}; the store "
                "was built from other data"
            )
        handle, keys = self._handle(shard)
        hidden_key = _key(example_id, "hidden")
        return PrecomputedReference(
            logps=handle.get_tensor(_key(example_id, "logps")),
            row_counts=handle.get_tensor(_key(example_id, "row_counts")),
            hidden=handle.get_tensor(hidden_key) if hidden_key in keys else None,
            temperature=self.metadata["temperature"],
            **({"softcap": self.metadata["softcap"]} if self.metadata.get("softcap") is not None else {}),
        )

    def lookup(self, example_ids: Sequence[str], content_hashes: Sequence[str] | None = None) -> PrecomputedReference:
        """The collated reference of a batch, examples in the order of ``example_ids``; with
        ``content_hashes`` each example must be the one the store was computed from."""
        if content_hashes is not None:
            changed = [i for i, h in zip(example_ids, content_hashes) if self._hashes.get(i, h) != h]
            if changed:
                raise ValueError(
                    f"PrecomputedReferenceStore({self.directory}): example(s) {changed[:5]} differ from the ones the "
                    "store was built from (their tokens, span tags or images changed, or the tokenizer did); "
                    "rebuild the store"
                )
        return PrecomputedReference.collate([self.get(i) for i in example_ids])


class PrecomputedStoreReference(Reference):
    """A reference written once to a store (:mod:`.precompute`): each batch's is looked up by example id.

    Args:
        store: the opened store.
        head: the reference head for the token KL when it is not the policy's; by default the store's own head
            is used whenever the loss needs one and the policy's head trains or the store came from another model.
    """

    mode = "precomputed"

    def __init__(self, store: PrecomputedReferenceStore, head: Head | None = None) -> None:
        self.store = store
        self._head = head
        self._head_known = head is not None

    def hidden_states(self, policy, batch, corrupted, shared_prefix=False):
        return placed_reference(self.store.lookup(batch.example_ids, batch.content_hashes), policy, batch, corrupted)

    def head(self, policy: nn.Module) -> Head | None:
        if not self._head_known:
            adapter = get_adapter(policy)
            head_trains = any(t is not None and t.requires_grad for t in adapter.head(policy))
            from_policy = self.store.metadata.get("reference") == "policy"
            if self.store.metadata.get("keep_hidden") and (head_trains or not from_policy):
                self._head = self.store.head()
            self._head_known = True
        if self._head is not None:
            device = next((p.device for p in unwrap_model(policy).parameters()), torch.device("cpu"))
            dtype = compute_dtype(policy)
            weight, bias = self._head
            if weight.device != device or (dtype is not None and weight.dtype != dtype):
                self._head = (weight.to(device, dtype), None if bias is None else bias.to(device, dtype))
        return self._head

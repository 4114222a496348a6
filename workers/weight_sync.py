"""Moving weights from learner rank 0 to the rollout engines (and a live / EMA teacher).

One narrow interface with a registry of transports, modelled on a checkpoint engine:

    sender   = make_sender(cfg.sync)          # on learner rank 0
    update   = sender.send(version, buckets)  # -> WeightUpdate (a small, picklable handle)
    receiver = make_receiver(cfg.sync)        # on each rollout worker / scorer
    tensors  = receiver.receive(update)       # every bucket, or an exception

A push is all-or-nothing: a receiver first stages every bucket of the update, checks names and
shapes against its own model, and only then loads them; on any failure it keeps its old weights
and version, and the driver retries or fails loudly.

Transports: ``object_store`` (Ray shared memory; CPU and debugging) is implemented here. ``nccl``
(GPU clusters) is declared so that configs can name it; see ``NcclSender``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

NamedTensors = list[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A push that did not reach a receiver; its old weights and version are kept."""


class StaleWeightsError(RuntimeError):
    """An actor asked to work at one weights version holds another (e.g. it was just restarted)."""


def require_version(actual: int, expected: int | None, who: str) -> None:
    if expected is not None and actual != expected:
        raise StaleWeightsError(f"{who} holds weights version {actual}, the driver expects {expected}")


@dataclass(frozen=True)
class WeightUpdate:
    """What travels through the driver: a version and handles to the buckets, not the tensors."""

    version: int
    transport: str
    handles: tuple = ()  # transport-specific, one per bucket
    num_tensors: int = 0
    num_bytes: int = 0


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> Iterator[NamedTensors]:
    """Group (name, tensor) pairs into buckets of at most ``bucket_mb`` (a larger tensor goes alone)."""
    limit = int(bucket_mb * 2**20)
    bucket: NamedTensors = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def check_against(named: NamedTensors, expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Names and shapes of a staged update must match the receiving model, before any is loaded."""
    for name, t in named:
        if name not in expected_shapes:
            raise WeightSyncError(f"weight update has a tensor '{name}' that the receiving model does not have")
        if tuple(t.shape) != tuple(expected_shapes[name]):
            raise WeightSyncError(
                f"weight update tensor '{name}' has shape {tuple(t.shape)}, the receiver expects "
                f"{tuple(expected_shapes[name])}"
            )


class WeightSender:
    name = ""

    def send(self, version: int, buckets: Iterable[NamedTensors]) -> WeightUpdate:
        raise NotImplementedError


class WeightReceiver:
    name = ""

    def receive(self, update: WeightUpdate) -> NamedTensors:
        raise NotImplementedError


class ObjectStoreSender(WeightSender):
    """Each bucket becomes one object in Ray's shared-memory store, owned by the sender."""

    name = "object_store"

    def send(self, version: int, buckets: Iterable[NamedTensors]) -> WeightUpdate:
        import ray

        handles, n, nbytes = [], 0, 0
        for bucket in buckets:
            cpu = [(name, t.detach().to("cpu").contiguous()) for name, t in bucket]
            handles.append(ray.put(cpu))
            n += len(cpu)
            nbytes += sum(t.numel() * t.element_size() for _, t in cpu)
        return WeightUpdate(version, self.name, tuple(handles), n, nbytes)


class ObjectStoreReceiver(WeightReceiver):
    name = "object_store"

    def receive(self, update: WeightUpdate) -> NamedTensors:
        import ray

        try:
            buckets = ray.get(list(update.handles))
        except Exception as exc:
            raise WeightSyncError(f"could not fetch weight version {update.version}: {exc}") from exc
        named = [pair for bucket in buckets for pair in bucket]
        if len(named) != update.num_tensors:
            raise WeightSyncError(
                f"weight version {update.version}: received {len(named)} tensors, expected {update.num_tensors}"
            )
        return named


class NcclSender(WeightSender):
    """GPU transport: a process group spanning learner rank 0 and every vLLM worker.

    Not implemented yet: this machine has no GPU to test it on, and an untested NCCL path is
    worse than an explicit error. Use ``sync.transport=object_store`` (works on GPUs too, through
    host memory).
    """

    name = "nccl"

    def send(self, version: int, buckets: Iterable[NamedTensors]) -> WeightUpdate:
        raise NotImplementedError("sync.transport=nccl is not implemented yet; use sync.transport=object_store")


SENDERS: dict[str, Callable[[], WeightSender]] = {"object_store": ObjectStoreSender, "nccl": NcclSender}
RECEIVERS: dict[str, Callable[[], WeightReceiver]] = {"object_store": ObjectStoreReceiver}


def make_sender(transport: str) -> WeightSender:
    if transport not in SENDERS:
        raise ValueError(f"sync.transport={transport!r}; expected one of {sorted(SENDERS)}")
    return SENDERS[transport]()


def make_receiver(transport: str) -> WeightReceiver:
    if transport not in RECEIVERS:
        raise ValueError(f"sync.transport={transport!r} has no receiver here; expected one of {sorted(RECEIVERS)}")
    return RECEIVERS[transport]()


def hf_param_shapes(model_path: str, *, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the HF model at ``model_path``, built on the meta device.

    vLLM fuses some projections (qkv, gate_up), so a vLLM receiver checks updates against the
    checkpoint layout the learner sends rather than against its own parameters.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


class VllmWeightLoader:
    """vLLM worker extension (``worker_extension_cls``): loads pushed weights in place.

    Method names carry an ``opsd_`` prefix because vLLM workers already define
    ``update_weights`` and friends.
    """

    def opsd_load_weights(self, named: NamedTensors) -> int:
        self.reload_weights(weights_iterator=iter(named))
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", None):
            # With tied embeddings vLLM reloads the weight through the embedding only; kernels
            # derived from it for the head (the CPU backend's packed GEMM copy) keep the old
            # values unless the head is processed again.
            head.quant_method.process_weights_after_loading(head)
        return len(named)

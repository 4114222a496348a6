"""Weight transports: learner rank 0's weights -> the rollout engines and a live or EMA teacher.

Each transport is one file here with a sender and a receiver implementing base.py's interface,
and one line in :data:`TRANSPORTS` declaring what the machinery needs to know of it: its kind
(store-and-forward or collective), the devices it runs on, whether its receivers must share the
learner's host, and where a push goes when it cannot reach a receiver. The driver's
``WeightSync`` (launch/weights.py) reads these declarations to choose a push's path; the learner
and the receiving actors make senders and receivers through :func:`transport`. Nothing compares a
transport's name. Adding one is its own file plus one line below (docs/DESIGN.md, "Weight sync").

This module imports nothing heavy: the config check reads the declarations without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opsd.registry import Registry, RegistryError, load_attribute


@dataclass(frozen=True)
class Transport:
    """One transport's declaration. ``sender`` and ``receiver`` are ``"module:Class"`` of its
    WeightSender and WeightReceiver (base.py), imported where they are made."""

    name: str
    # Collective: learner rank 0 and the receivers of a pool form a group and take part in every
    # push at the same moment. Otherwise store-and-forward: the sender returns a handle that each
    # receiver reads whenever it is called.
    collective: bool
    sender: str
    receiver: str
    devices: tuple[str, ...] = ("cpu", "cuda")  # values of cluster.device it runs on
    # Its receivers must run on learner rank 0's host, in its PID namespace.
    same_host: bool = False
    # A transport that does the same job when every receiver shares learner rank 0's host (used
    # when sync.shared_memory is on).
    on_one_host: str | None = None
    # Where a push goes when this transport cannot reach a receiver after all.
    fallback: str | None = None
    # Collective: "module:function" that aborts a group from outside, given (host, port, reason).
    abort: str | None = None

    def make_sender(self, device: Any = "cpu", timeout_s: float = 600.0) -> Any:
        return load_attribute(self.sender)(device, timeout_s)

    def make_receiver(self, device: Any = "cpu", timeout_s: float = 600.0) -> Any:
        return load_attribute(self.receiver)(device, timeout_s)

    def abort_group(self, host: str, port: int, reason: str) -> None:
        if self.abort is not None:
            load_attribute(self.abort)(host, port, reason)


_HERE = "opsd.workers.transports"

TRANSPORTS: Registry[Transport] = Registry("sync.transport", {
    "object_store": Transport("object_store", collective=False, sender=f"{_HERE}.object_store:ObjectStoreSender",
                              receiver=f"{_HERE}.object_store:ObjectStoreReceiver", on_one_host="in_place"),
    "in_place": Transport("in_place", collective=False, sender=f"{_HERE}.in_place:InPlaceSender",
                          receiver=f"{_HERE}.in_place:InPlaceReceiver", devices=("cpu",), same_host=True,
                          fallback="object_store"),
    "gloo": Transport("gloo", collective=True, sender=f"{_HERE}.broadcast:GlooSender",
                      receiver=f"{_HERE}.broadcast:GlooReceiver", abort=f"{_HERE}.broadcast:abort_group"),
    "nccl": Transport("nccl", collective=True, sender=f"{_HERE}.broadcast:NcclSender",
                      receiver=f"{_HERE}.broadcast:NcclReceiver", devices=("cuda",),
                      abort=f"{_HERE}.broadcast:abort_group"),
})


def transport(name: str) -> Transport:
    """The declaration registered as ``name`` (or a plug-in's, given as ``module:attribute``)."""
    found = TRANSPORTS.get(name)
    if not isinstance(found, Transport):
        raise RegistryError(f"config key 'sync.transport' = {name!r} is not a Transport declaration "
                            f"({type(found).__name__})")
    return found


class Receivers:
    """A receiving actor's ends, one per transport its pushes have come through. When an update
    comes through one, the other store-and-forward ends let go of what they hold (after a fallback
    from in_place to object_store, the learner's memory is not kept mapped); a collective end
    stays in its group until the driver has it leave."""

    def __init__(self, device: Any = "cpu", timeout_s: float = 600.0):
        self.device, self.timeout_s = device, timeout_s
        self.ends: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name not in self.ends:
            self.ends[name] = transport(name).make_receiver(self.device, self.timeout_s)
        return self.ends[name]

    def receiving(self, update: Any) -> Any:
        """``receiving(update)`` of the transport that carried ``update`` (base.WeightReceiver)."""
        for name, end in self.ends.items():
            if name != update.transport and not transport(name).collective:
                end.close()
        return self.get(update.transport).receiving(update)

    def join(self, spec: Any, rank: int) -> None:
        self.get(spec.backend).join(spec, rank)

    def close(self) -> None:
        for end in self.ends.values():
            end.close()

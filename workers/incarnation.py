"""Which process an actor runs in: how the driver tells a restarted actor from the one it replaced.

A pid cannot tell them apart: each host of a cluster (a container, a Kubernetes pod, a node in a
PID namespace of its own) counts pids from 1, so the process Ray starts for a restarted actor on a
replacement host can get the same pid as the one that died (seen in tests/integration/test_hosts.py:
pid 108 before and after). A node id or an address cannot either (a restart may land on the same
node). A token each actor process draws at random when its actor is constructed can: 64 random bits
repeat across restarts with negligible probability, whatever host or namespace the process is in.
The pid and the node are kept beside it only to say where the process runs.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Incarnation:
    token: str  # the identity: compare this, never the pid or the node
    pid: int  # in the PID namespace of the actor's host
    node_id: str | None  # the Ray node; None outside Ray

    @classmethod
    def draw(cls) -> Incarnation:
        """A new one, for an actor being constructed (call it in the actor's process)."""
        try:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except ImportError:  # the GPU checks construct a ScorerWorker where Ray is not installed
            node = None
        return cls(secrets.token_hex(8), os.getpid(), node)

    def where(self) -> str:
        return f"pid {self.pid}" + (f" on node {self.node_id[:8]}" if self.node_id else "")

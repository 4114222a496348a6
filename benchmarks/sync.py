"""``opsd bench sync``: weight-push bandwidth between two Ray actors, per transport and bucket size.

Every transport is driven through the same interface the learner and the receiving actors use
(opsd.workers.transports): a sender made from the registry pushes random weights, and a receiver
copies them into its own, as the scorer's load does. A collective transport's receiver takes part
while the sender sends; a store-and-forward one reads after.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from opsd.benchmarks.figures import MB, median

TRANSPORTS = ("object_store", "in_place", "gloo")  # nccl needs GPUs
GROUP = "bench"


def qwen3_shaped_config(params_m: float, vocab: int = 151936):
    """A Qwen3Config of about ``params_m`` million parameters (tied embeddings, head_dim 128).

    Per layer a Qwen3 block has ~12 h^2 parameters (q, o: h^2; k, v: h^2 / 2 with kv heads = heads
    / 2; MLP 3 x h x 3h); the embedding has V x h. When the embedding alone is over budget the
    vocabulary shrinks.
    """
    from transformers import Qwen3Config

    target = params_m * 1e6
    hidden = 512 if params_m < 300 else 1024 if params_m < 1500 else 2048
    if vocab * hidden > 0.8 * target:
        vocab = max(1024, int(0.5 * target / hidden))
    layers = max(1, round((target - vocab * hidden) / (12 * hidden * hidden)))
    heads = hidden // 128
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=128,
        tie_word_embeddings=True, max_position_embeddings=4096,
    )


def qwen3_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes (what the learner pushes), from a model built on the meta device."""
    import torch
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


class SyncSender:
    """Holds random fp32 weights of the given shapes; pushes them as learner rank 0 does."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]]):
        import torch

        torch.manual_seed(0)
        # Views of one flat buffer, as DeepSpeed's ZeRO 1/2 keeps a learner's weights.
        flat = torch.randn(sum(math.prod(s) for _, s in shapes))
        self.named, at = [], 0
        for name, shape in shapes:
            self.named.append((name, flat[at: at + math.prod(shape)].view(shape)))
            at += math.prod(shape)
        self.senders: dict[str, Any] = {}

    def sender(self, name: str) -> Any:
        from opsd.workers.transports import transport

        if name not in self.senders:
            self.senders[name] = transport(name).make_sender("cpu", 300)
            self.senders[name].prepare([t for _, t in self.named])
        return self.senders[name]

    def layout(self, bucket_mb: float) -> list:
        from opsd.workers.transports.base import iter_buckets, layout_of

        return [layout_of(b) for b in iter_buckets(self.named, bucket_mb)]

    def open(self, name: str) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), self.sender(name).open(GROUP, 2)

    def join(self, spec) -> None:
        self.sender(spec.backend).join(spec)

    def send(self, name: str, version: int, bucket_mb: float) -> tuple[Any, float]:
        """The update and the seconds the sender took."""
        from opsd.workers.transports.base import iter_buckets

        sender, layout = self.sender(name), self.layout(bucket_mb)
        t0 = time.perf_counter()
        update = sender.send(version, iter_buckets(self.named, bucket_mb), layout=layout, groups=[GROUP])
        return update, time.perf_counter() - t0


class SyncReceiver:
    """Receives a push and copies it into its own weights, as the scorer's load does."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]]):
        import torch

        from opsd.workers.transports import Receivers

        self.params = {name: torch.zeros(shape) for name, shape in shapes}
        self.receivers = Receivers("cpu", 300)  # keeps an in-place sender's memory mapped between pushes

    def join(self, spec) -> None:
        self.receivers.join(spec, spec.rank)

    def receive(self, update) -> tuple[int, float, float]:
        """Tensors received, seconds until they were all here, seconds to copy them in."""
        import torch

        from opsd.workers.transports.base import check_against

        t0 = time.perf_counter()
        with self.receivers.receiving(update) as named:
            fetch_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            check_against(named, {k: tuple(v.shape) for k, v in self.params.items()})
            with torch.no_grad():
                for name, t in named:
                    self.params[name].copy_(t)
            return len(named), fetch_s, time.perf_counter() - t0

    def memcpy(self, repeats: int) -> float:
        """Median seconds to copy every weight into a second buffer of the same size: a plain
        memcpy of the pushed bytes, in the receiving process, with its threads."""
        import torch

        spare = {name: torch.empty_like(t) for name, t in self.params.items()}
        times = []
        for _ in range(repeats + 1):  # the first pass also faults the spare pages in
            t0 = time.perf_counter()
            for name, t in self.params.items():
                spare[name].copy_(t)
            times.append(time.perf_counter() - t0)
        return median(times[1:])


def _push(sender: Any, receiver: Any, name: str, version: int, bucket_mb: float, layout: list | None) -> dict:
    """One push, timed from here around all of it."""
    import ray

    from opsd.workers.transports.base import announce

    t0 = time.perf_counter()
    if layout is not None:  # collective: the receiver takes part while the sender sends
        got = receiver.receive.remote(announce(version, name, layout))
        update, send_s = ray.get(sender.send.remote(name, version, bucket_mb))
        n, fetch_s, copy_s = ray.get(got)
    else:
        update, send_s = ray.get(sender.send.remote(name, version, bucket_mb))
        n, fetch_s, copy_s = ray.get(receiver.receive.remote(update))
    total_s = time.perf_counter() - t0
    if n != update.num_tensors or update.transport != name:
        raise RuntimeError(f"bench sync: {name} pushed {n} of {update.num_tensors} tensors through "
                           f"{update.transport}: the sender cannot {name} here; leave it out of --transports")
    return {"push": total_s, "send": send_s, "fetch": fetch_s, "copy": copy_s, "buckets": len(update.handles)}


def _measure(sender: Any, receiver: Any, name: str, bucket_mb: float, repeats: int, version: int,
             nbytes: int, memcpy_s: float) -> tuple[dict, int]:
    """``repeats`` timed pushes after an untimed one; the row and the last version used."""
    import ray

    from opsd.workers.transports import transport

    layout = ray.get(sender.layout.remote(bucket_mb)) if transport(name).collective else None
    pushes = []
    for _ in range(repeats + 1):
        version += 1
        pushes.append(_push(sender, receiver, name, version, bucket_mb, layout))
    timed = pushes[1:]
    push_s = median([p["push"] for p in timed])
    return {
        "transport": name, "bucket_mb": bucket_mb, "buckets": timed[-1]["buckets"], "push_seconds": push_s,
        "send_seconds": median([p["send"] for p in timed]), "fetch_seconds": median([p["fetch"] for p in timed]),
        "copy_seconds": median([p["copy"] for p in timed]), "mb_per_s": nbytes / MB / push_s,
        "of_memcpy": memcpy_s / push_s,
    }, version


def bench_sync(params_m: float = 100, bucket_mb: list[float] | tuple = (16, 64, 256), repeats: int = 3,
               vllm: bool = True, transports: list[str] | tuple = TRANSPORTS,
               out: Callable[[str], None] = print) -> dict:
    """Weight-push bandwidth between two Ray actors, per transport and bucket size.

    The sender's weights are views of one flat buffer, as DeepSpeed's ZeRO 1/2 keeps a learner's.
    object_store: the sender puts every bucket into the object store (``send``), then the
    receiver fetches them all (``fetch``): two copies per push, so 50% of a memcpy is its
    ceiling. in_place: the sender's buffer is in shared memory (moved there on the first push,
    which is not timed) and ``send`` only says where each tensor lies; the receiver maps it and
    copies from there (one copy). gloo: sender and receiver form a weight group once, then each
    push broadcasts every bucket while the receiver stages it (``send`` and ``fetch`` overlap).
    Every way the receiver then copies the weights into its own (``copy``), and the push is
    timed from the driver around all of it, and set against a memcpy of the same bytes in the
    receiver (``of_memcpy``: memcpy seconds / push seconds). Each configuration is pushed once
    untimed first. Also, if ``vllm``, the in-place load time of the tiny model into a vLLM
    RolloutWorker (RolloutWorker.load_weights: fetch, check, reload_weights).
    """
    import ray

    unknown = sorted(set(transports) - set(TRANSPORTS))
    if unknown:
        raise ValueError(f"bench sync measures {', '.join(TRANSPORTS)}, not {unknown}")
    config = qwen3_shaped_config(params_m)
    shapes = qwen3_shapes(config)
    n_params = sum(math.prod(s) for _, s in shapes)
    nbytes = 4 * n_params
    started = start_ray()
    report: dict[str, Any] = {
        "params": n_params, "bytes": nbytes, "model": {
            "hidden": config.hidden_size, "layers": config.num_hidden_layers, "vocab": config.vocab_size},
        "buckets": [],
    }
    out(f"bench sync: Qwen3-shaped random model, {n_params / 1e6:.1f} M params ({nbytes / MB:.0f} MB fp32), "
        f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocab {config.vocab_size}; "
        f"{' and '.join(transports)}, sender and receiver in two actors, {repeats} pushes per bucket size")
    sender = receiver = None
    try:
        sender = ray.remote(SyncSender).options(num_cpus=0.5).remote(shapes)
        receiver = ray.remote(SyncReceiver).options(num_cpus=0.5).remote(shapes)
        _form_groups(sender, receiver, transports)
        memcpy_s = ray.get(receiver.memcpy.remote(repeats))
        report["memcpy_seconds"] = memcpy_s
        report["memcpy_mb_per_s"] = nbytes / MB / memcpy_s
        out(f"  memcpy of the same bytes in the receiver: {memcpy_s:.3f} s = {report['memcpy_mb_per_s']:.1f} MB/s")
        version = 0
        for name in transports:
            for bmb in bucket_mb:
                row, version = _measure(sender, receiver, name, bmb, repeats, version, nbytes, memcpy_s)
                report["buckets"].append(row)
                out(f"  {name:12s} bucket {bmb:6g} MB: {row['buckets']:4d} buckets, push {row['push_seconds']:7.3f} s "
                    f"(send {row['send_seconds']:.3f}, fetch {row['fetch_seconds']:.3f}, "
                    f"copy {row['copy_seconds']:.3f}) = {row['mb_per_s']:8.1f} MB/s, {100 * row['of_memcpy']:.0f}% of memcpy")
        report.update(_ratios(report["buckets"], transports, bucket_mb, out))
    finally:
        for a in (sender, receiver):
            if a is not None:
                ray.kill(a)
    if vllm:
        try:
            report["vllm_tiny"] = _bench_vllm_load(repeats=max(repeats, 3), out=out)
        except Exception as exc:  # vLLM missing or failing must not lose the figures above
            out(f"  vLLM in-place load: skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if started:
        from opsd.launch.cluster import shutdown_ray

        shutdown_ray()
    return report


def _form_groups(sender: Any, receiver: Any, transports: list[str] | tuple) -> None:
    """Each collective transport's group is formed once; its pushes are then a header and one
    broadcast per bucket."""
    import ray

    from opsd.workers.transports import transport
    from opsd.workers.transports.base import GroupSpec

    for name in transports:
        if transport(name).collective:
            host, port = ray.get(sender.open.remote(name))
            ray.get([receiver.join.remote(GroupSpec(GROUP, name, host, port, 2, 1, 300)),
                     sender.join.remote(GroupSpec(GROUP, name, host, port, 2, 0, 300))])


def _ratios(rows: list[dict], transports: list[str] | tuple, bucket_mb: list[float] | tuple,
            out: Callable[[str], None]) -> dict:
    """Push time of object_store over each other transport, per bucket size."""
    by = {(r["transport"], r["bucket_mb"]): r for r in rows}
    found = {}
    for other in ("gloo", "in_place"):
        if {"object_store", other} <= set(transports):
            found[f"{other}_over_object_store"] = ratios = {
                bmb: by[("object_store", bmb)]["push_seconds"] / by[(other, bmb)]["push_seconds"] for bmb in bucket_mb
            }
            out(f"  push time object_store / {other}: " + ", ".join(f"{bmb:g} MB {r:.2f}x" for bmb, r in ratios.items()))
    return found


def start_ray(num_cpus: int = 2) -> bool:
    """Attach when RAY_ADDRESS says so, else start a local Ray the way `opsd train` does."""
    import ray

    from opsd.config import REPO_ROOT, load_config
    from opsd.launch.cluster import init_ray

    if ray.is_initialized():
        return False
    return init_ray(load_config(REPO_ROOT / "configs" / "tiny.yaml", [f"cluster.num_cpus={num_cpus}"]))


def _bench_vllm_load(repeats: int, out: Callable[[str], None]) -> dict:
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from opsd.assets.models import resolve_model_path
    from opsd.config import REPO_ROOT, load_config
    from opsd.workers.rollout import RolloutWorker
    from opsd.workers.transports.base import iter_buckets
    from opsd.workers.transports.object_store import ObjectStoreSender

    model_path = resolve_model_path("tiny")
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", ["rollout.kv_cache_mb=64"])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    nbytes = sum(t.numel() * 4 for _, t in named)
    t0 = time.perf_counter()
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg, model_path, 0)
    try:
        ray.get(worker.get_version.remote())
        start_s = time.perf_counter() - t0
        times = []
        for v in range(1, repeats + 1):
            named = [(n, t + 1e-3) for n, t in named]
            update = ObjectStoreSender().send(v, iter_buckets(named, cfg.sync.bucket_mb))
            t0 = time.perf_counter()
            assert ray.get(worker.load_weights.remote(update)) == v
            times.append(time.perf_counter() - t0)
    finally:
        ray.kill(worker)
    row = {"params": nbytes // 4, "engine_start_seconds": start_s, "load_seconds": median(times),
           "load_seconds_all": times}
    out(f"  vLLM in-place load, tiny model ({nbytes // 4 / 1e6:.2f} M params): {row['load_seconds'] * 1e3:.1f} ms "
        f"median of {repeats} (engine start {start_s:.1f} s)")
    return row

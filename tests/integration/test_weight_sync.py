"""Test 3: after a push, vLLM's logprobs equal the learner's model's; versions advance everywhere;
a bad update changes nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from opsd.batch import read_ipc
from tests.memory_maps import mapping_of
from opsd.workers.rollout import RolloutWorker
from opsd.workers.transports.base import WeightSyncError
from opsd.workers.transports.object_store import from_store_object, store_object

from .conftest import local_config, make_trainer, read_metrics

pytestmark = pytest.mark.integration


def hf_logprobs(model, seq: list[int]) -> np.ndarray:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
    return logp[:-1].gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1).numpy()


def _sha(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.reshape(-1).contiguous().view(torch.uint8).numpy()).hexdigest()


def _received_by_another_process(update):
    """In a Ray task (another process): what the receiver got, and where its memory lies."""
    from opsd.workers.transports.object_store import ObjectStoreReceiver

    with ObjectStoreReceiver().receiving(update) as named:
        return [(name, str(t.dtype), tuple(t.shape), _sha(t), mapping_of(t.data_ptr())) for name, t in named]


def test_object_store_push_is_bit_exact_in_every_dtype_and_read_without_a_copy(ray_session):
    from opsd.workers.transports.base import iter_buckets
    from opsd.workers.transports.object_store import ObjectStoreSender

    ray = ray_session
    g = torch.Generator().manual_seed(0)
    named = [
        ("a.weight", torch.randn(300, 70, generator=g)),
        ("b.weight", torch.randn(64, 33, generator=g).to(torch.bfloat16)),
        ("c.bias", torch.randn(129, generator=g).to(torch.float16)),
        ("d.scale", torch.tensor(3.5)),  # 0-d
        ("e.count", torch.arange(17, dtype=torch.int64)),
        # A non-contiguous tensor is sent as its contiguous copy.
        ("f.weight", torch.randn(40, 50, generator=g).t()),
    ]
    update = ObjectStoreSender().send(7, iter_buckets(named, bucket_mb=0.005))
    assert len(update.handles) >= 3 and update.num_tensors == len(named)
    assert update.num_bytes == sum(t.numel() * t.element_size() for _, t in named)
    got = ray.get(ray.remote(_received_by_another_process).options(num_cpus=0).remote(update))
    assert [g[:4] for g in got] == [(n, str(t.dtype), tuple(t.shape), _sha(t)) for n, t in named]
    # Ray's plasma store is a shared-memory file: a tensor that lies in it was not copied out.
    assert all("plasma" in g[4] for g in got), [g[4] for g in got]


def test_an_in_place_push_reaches_another_process_bit_exact_with_the_rest_through_the_store(ray_session):
    from opsd.workers.transports.in_place import InPlaceSender
    from opsd.workers.transports.shared_memory import SharedWeights

    ray = ray_session
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(5000, generator=g).to(torch.bfloat16)  # as ZeRO 1/2 holds a learner's weights
    named = [("a.weight", flat[:4000].view(50, 80)), ("b.bias", flat[4000:4100]),
             # a new tensor (as a LoRA merge or a dtype conversion makes) is not the sender's memory
             ("c.weight", torch.randn(30, 30, generator=g)), ("d.weight", flat[4100:5000].view(30, 30))]
    shared = SharedWeights(timeout_s=30)
    assert shared.share([flat]) is None
    sender = InPlaceSender("cpu", 30)
    sender.shared = shared
    update = sender.send(5, [named[:3], named[3:]])
    assert ["in place" if isinstance(h, tuple) else "store" for h in update.handles] == ["in place", "store", "in place"]
    got = ray.get(ray.remote(_received_in_place_by_another_process).options(num_cpus=0).remote(update))
    assert [g[:4] for g in got] == [(n, str(t.dtype), tuple(t.shape), _sha(t)) for n, t in named]
    where = [g[4] for g in got]
    # Read-only mappings of the sender's shared memory; the converted tensor lies in the store.
    assert all("/dev/shm/torch_" in where[i] and where[i].split()[1] == "r--s" for i in (0, 1, 3)), where
    assert "plasma" in where[2], where


def _received_in_place_by_another_process(update):
    from opsd.workers.transports.in_place import InPlaceReceiver

    with InPlaceReceiver().receiving(update) as named:
        return [(name, str(t.dtype), tuple(t.shape), _sha(t), mapping_of(t.data_ptr())) for name, t in named]


def test_push_reaches_every_rollout_worker(cli_run, tiny_model, ray_session):
    from transformers import AutoModelForCausalLM

    from opsd.workers.learner import LearnerGroup
    from opsd.workers.rollout import RolloutWorker

    ray = ray_session
    # lr 1e-2 so that one step moves logprobs far beyond the comparison tolerance.
    cfg = local_config("learner.lr=1e-2", "rollout.num_cpus_per_worker=0.5", "rollout.kv_cache_mb=64")
    workers = [ray.remote(RolloutWorker).options(num_cpus=0.5).remote(cfg, tiny_model, i) for i in range(2)]
    group = LearnerGroup(cfg, tiny_model)
    try:
        table = read_ipc(sorted((cli_run / "batches").glob("step_*.arrow"))[0])
        row = table.slice(0, 1).to_pylist()[0]
        seq = row["prompt_ids"] + row["response_ids"]
        before = np.array(ray.get(workers[0].prompt_logprobs.remote([seq]))[0])

        group.train_step(table)
        # In place, as the driver pushes when every receiver is on learner rank 0's node: the
        # update holds no bytes, the workers copy the learner's own weights.
        update = group.push(1, "in_place")
        assert update.source is not None and all(isinstance(h, tuple) for h in update.handles)
        assert ray.get([w.load_weights.remote(update) for w in workers]) == [1, 1]
        assert ray.get([w.get_version.remote() for w in workers]) == [1, 1]

        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        model.load_state_dict(group.full_state(), strict=False)
        model.tie_weights()
        expected = hf_logprobs(model.eval(), seq)
        after = [np.array(x[0]) for x in ray.get([w.prompt_logprobs.remote([seq]) for w in workers])]
        assert np.abs(expected - before).max() > 1e-2, "the step did not move the model enough to test the push"
        # fp32 on both sides; different kernels: 1e-4 nats.
        for got in after:
            np.testing.assert_allclose(got, expected, atol=1e-4)

        # All or nothing: an update with a wrong shape is refused before anything loads.
        stored = group.push(1, "object_store")
        assert stored.source is None
        bad_bucket = [(name, t[:-1] if name.endswith("embed_tokens.weight") else t)
                      for name, t in from_store_object(ray.get(stored.handles[0]))]
        bad = dataclasses.replace(stored, version=2,
                                  handles=(ray.put(store_object(bad_bucket)),) + tuple(stored.handles[1:]))
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(workers[0].load_weights.remote(bad))
        assert isinstance(err.value.cause, WeightSyncError) and "embed_tokens.weight" in str(err.value)
        assert ray.get(workers[0].get_version.remote()) == 1
        np.testing.assert_allclose(np.array(ray.get(workers[0].prompt_logprobs.remote([seq]))[0]), after[0])

        # Once the learner has stepped again, the in-place update of version 1 no longer exists
        # (its memory holds newer weights): it is refused, the worker keeps what it had.
        group.train_step(table)
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(workers[0].load_weights.remote(dataclasses.replace(update, version=2)))
        assert isinstance(err.value.cause, WeightSyncError) and "no pushed version" in str(err.value)
        assert ray.get(workers[0].get_version.remote()) == 1
        np.testing.assert_allclose(np.array(ray.get(workers[0].prompt_logprobs.remote([seq]))[0]), after[0])
        # The next in-place push reads what that step wrote into the same shared memory.
        update = group.push(2, "in_place")
        assert update.source is not None and ray.get(workers[0].load_weights.remote(update)) == 2
        model.load_state_dict(group.full_state(), strict=False)
        model.tie_weights()
        expected2 = hf_logprobs(model.eval(), seq)
        assert np.abs(expected2 - expected).max() > 1e-2
        np.testing.assert_allclose(np.array(ray.get(workers[0].prompt_logprobs.remote([seq]))[0]), expected2, atol=1e-4)
    finally:
        for w in workers:
            ray.kill(w)
        group.shutdown()


class InAnotherPidNamespace(RolloutWorker):
    """Sees learner rank 0 under a pid that is not there, as a receiver in another container
    would: every in-place read fails (the real error, from the real open of /proc/<pid>/fd)."""

    def load_weights(self, update):
        if update.source is not None:
            update = dataclasses.replace(update, source=dataclasses.replace(update.source, pid=2**22 + 1))
        return super().load_weights(update)


def test_a_receiver_that_cannot_read_in_place_gets_the_push_through_the_store(tmp_path, ray_session, monkeypatch,
                                                                              capsys):
    from opsd.launch import actors

    monkeypatch.setattr(actors, "RolloutWorker", InAnotherPidNamespace)
    trainer, run_dir = make_trainer(tmp_path, "data.max_rows=8", "train.prompts_per_step=4", "train.steps=2",
                                    "train.checkpoint_every=0", "eval.every=0", "sync.retries=0")
    try:
        trainer.run_steps(run_dir)
        versions = ray_session.get([a.get_version.remote() for a in trainer.actors.rollouts.actors])
    finally:
        trainer.shutdown()
    assert versions == [2]
    # The first push was tried in place and redone through the store; the next went there at once.
    assert [r["sync_in_place"] for r in read_metrics(run_dir.path)] == [False, False]
    out = capsys.readouterr().out
    assert out.count("an in-place weight push failed") == 1 and "sync.shared_memory=false" in out


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores.
@pytest.mark.slow
def test_collective_push_with_a_dead_receiver(cli_run, tiny_model, ray_session):
    """sync.transport=gloo through the driver's WeightSync, ZeRO-3 gathering per bucket, into two
    vLLM engines and a live teacher; then a rollout actor is killed and the next push still
    reaches every receiver (the restarted one over its own catch-up group)."""
    from transformers import AutoModelForCausalLM

    from opsd.launch.cluster import ActorPool
    from opsd.launch.weights import WeightSync
    from opsd.workers.learner import LearnerGroup
    from opsd.workers.rollout import RolloutWorker
    from opsd.workers.scorer import ScorerWorker

    ray = ray_session
    cfg = local_config(
        "sync.transport=gloo", "sync.bucket_mb=0.05", "sync.timeout_s=300", "learner.zero_stage=3",
        "learner.lr=1e-2", "teacher.mode=live", "rollout.kv_cache_mb=64",
    )
    rollouts = ActorPool("rollout", RolloutWorker, 2, {"num_cpus": 0.5}, (cfg, tiny_model), max_restarts=1)
    scorers = ActorPool("scorer", ScorerWorker, 1, {"num_cpus": 0.25}, (cfg, tiny_model), max_restarts=0)
    group = LearnerGroup(cfg, tiny_model)
    try:
        sync = WeightSync(cfg, group)
        rollouts.on_restart = lambda actor: sync.catch_up(rollouts, actor)
        assert len(sync.layout) > 2, "the bucket size should split the model into several buckets"
        rollouts.wait_ready()
        scorers.wait_ready()
        table = read_ipc(sorted((cli_run / "batches").glob("step_*.arrow"))[0])
        seq = (lambda r: r["prompt_ids"] + r["response_ids"])(table.slice(0, 1).to_pylist()[0])
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

        def check(version: int) -> None:
            state = group.full_state()
            model.load_state_dict(state, strict=False)
            model.tie_weights()
            expected = hf_logprobs(model, seq)
            assert ray.get([a.get_version.remote() for a in rollouts.actors]) == [version, version]
            for got in ray.get([a.prompt_logprobs.remote([seq]) for a in rollouts.actors]):
                np.testing.assert_allclose(np.array(got[0]), expected, atol=1e-4)
            teacher, teacher_version = ray.get(scorers.actors[0].get_state.remote())
            assert teacher_version == version
            for name, t in teacher.items():  # fp32 end to end: bit-exact
                assert torch.equal(t, state[name]), name

        before = np.array(ray.get(rollouts.actors[0].prompt_logprobs.remote([seq]))[0])
        group.train_step(table)
        sync.push(1, [rollouts, scorers])
        check(1)
        assert np.abs(np.array(ray.get(rollouts.actors[0].prompt_logprobs.remote([seq]))[0]) - before).max() > 1e-2

        group.train_step(table)
        victim = rollouts.actors[1]
        before = ray.get(victim.ready.remote())["incarnation"]
        ray.kill(victim, no_restart=False)
        sync.push(2, [rollouts, scorers])
        assert rollouts.restarts == 1
        assert ray.get(victim.ready.remote())["incarnation"] != before
        check(2)
    finally:
        rollouts.kill()
        scorers.kill()
        group.shutdown()


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores; plug-ins through
# the registries reach a real run in test_contexts.py, and every built-in transport is tested above.
@pytest.mark.slow
def test_a_transport_added_through_the_registry_alone_carries_every_push(tmp_path, tiny_model, ray_session):
    """tests/plugins/directory_transport.py is a transport of its own (a safetensors file per
    bucket in a directory), named in the config by ``module:attribute``: the learner sends through
    it, the vLLM workers receive through it, with no change anywhere else, and what they load is
    the learner's weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    name = "tests.plugins.directory_transport:DIRECTORY"
    trainer, run_dir = make_trainer(tmp_path, "data.max_rows=8", "train.prompts_per_step=4", "train.steps=2",
                                    "train.checkpoint_every=0", "eval.every=0", f"sync.transport={name}")
    try:
        trainer.run_steps(run_dir)
        versions = ray_session.get([a.get_version.remote() for a in trainer.actors.rollouts.actors])
        update = trainer.actors.weights.last_update
        sent = {k: v for path in update.handles for k, v in load_file(path).items()}
        state = trainer.actors.learner.full_state()
        seq = trainer.data.pairs[0].student_ids + [5, 6, 7]
        served = np.array(ray_session.get(trainer.actors.rollouts.actors[0].prompt_logprobs.remote([seq]))[0])
    finally:
        trainer.shutdown()
    assert versions == [2] and update.transport == name and update.version == 2
    assert update.num_tensors == len(sent) == len(state) and set(sent) == set(state)
    assert all(torch.equal(sent[k], state[k]) for k in state)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    np.testing.assert_allclose(served, hf_logprobs(model.eval(), seq), atol=1e-4)
    assert [r["sync_in_place"] for r in read_metrics(run_dir.path)] == [False, False]

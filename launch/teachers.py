"""Several teachers at run time (docs/DESIGN.md, "Several teachers"; the config side is
opsd/teachers.py; the prompt pairs of each row's teacher: launch/problems.py): each teacher's model
and tokenizer checked and resolved, one scorer pool per teacher, and a step's samples split by
teacher, scored by their pools and rejoined in the sampler's order; then the metrics per teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from opsd.batch import Sample, concat_batches, from_ipc_bytes
from opsd.config import Config
from opsd.launch.cluster import ActorPool, Pending
from opsd.teachers import teacher_config


def resolve_teachers(cfg: Config, model_path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(name -> what its scorers load, name -> its tokenizer) for every teacher, each other model's
    directory checked and its tokenizer compared with the student's, as opsd validate does; a
    teacher whose model is null loads the student's initial weights (and has no tokenizer here)."""
    from opsd.assets.models import check_model_dir, load_tokenizer, resolve_model_path
    from opsd.launch.validate import check_teacher_tokenizer

    paths, tokenizers = {}, {}
    for name, spec in cfg.teachers.items():
        if spec.model is None:
            paths[name] = model_path
            continue
        key = f"teachers.{name}.model"
        paths[name] = resolve_model_path(spec.model)
        check_model_dir(paths[name], trust_remote_code=cfg.model.trust_remote_code, key=key)
        check_teacher_tokenizer(teacher_config(cfg, name), (model_path, paths[name]), key=key)
        tokenizers[name] = load_tokenizer(paths[name], trust_remote_code=cfg.model.trust_remote_code)
    return paths, tokenizers


@dataclass
class RoutedCalls:
    """A step's scoring calls, one :class:`Pending` per teacher that has rows in it."""

    calls: dict[str, Pending]

    @property
    def refs(self) -> dict:
        return {(name, i): ref for name, p in self.calls.items() for i, ref in p.refs.items()}


class TeacherPools:
    """name -> the scorer pool of that teacher (an :class:`ActorPool`, restarted as any pool is);
    samples go to the pool their ``teacher`` names."""

    def __init__(self, pools: dict[str, ActorPool], models: dict[str, str | None]):
        self.pools = pools
        self.models = models  # name -> teachers.<name>.model, for the batch's metadata

    @property
    def actors(self) -> list:
        return [a for pool in self.pools.values() for a in pool.actors]

    def submit(self, samples: list[Sample], teacher_version: int) -> RoutedCalls:
        """Each teacher's samples to its pool's actors, in interleaved shards (returns at once)."""
        missing = {s.teacher for s in samples} - set(self.pools)
        if missing:
            raise ValueError(f"samples routed to {sorted(map(str, missing))}, which have no scorer pool "
                             f"(the pools: {list(self.pools)})")
        calls = {}
        for name, pool in self.pools.items():
            mine = [s for s in samples if s.teacher == name]
            if mine or (not samples and not calls):  # no samples at all: one empty batch, of the first pool
                n = max(1, min(len(pool.actors), len(mine)))
                calls[name] = pool.submit("score", [(mine[i::n],) for i in range(n)], expect_version=teacher_version)
        return RoutedCalls(calls)

    def collect(self, samples: list[Sample], routed: RoutedCalls) -> pa.Table:
        """The pools' batches as one, in the order of ``samples``; its metadata names every
        teacher's model (``opsd.teachers``) instead of one ``opsd.teacher_model``."""
        tables = []
        for name, pending in routed.calls.items():
            for part in self.pools[name].collect(pending):
                table = from_ipc_bytes(part)
                meta = dict(table.schema.metadata)
                meta.pop(b"opsd.teacher_model", None)
                tables.append(table.replace_schema_metadata(meta))
        table = concat_batches(tables)
        order = {s.sample_id: i for i, s in enumerate(samples)}
        ids = table.column("sample_id").to_pylist()
        table = table.take(pa.array(sorted(range(len(ids)), key=lambda i: order[ids[i]]), pa.int64()))
        meta = {**table.schema.metadata, b"opsd.teachers": json.dumps(self.models, sort_keys=True).encode()}
        return table.replace_schema_metadata(meta)


def teacher_metrics(batch: pa.Table) -> dict[str, float | int | None]:
    """Per teacher of the batch's ``teacher`` column: ``teacher/<name>/samples``, ``.../kl`` (the
    mean over loss tokens of the sampler's log-probability minus the teacher's, of each sampled
    token: on-policy, an estimate of KL(student || that teacher)), ``.../reward_mean`` and
    ``.../response_len_mean``."""
    names = batch.column("teacher").to_pylist()
    rollout = batch.column("rollout_logprobs").to_pylist()
    teacher = batch.column("teacher_token_logprobs").to_pylist()
    mask = batch.column("loss_mask").to_pylist()
    rewards = batch.column("reward").to_pylist()
    lengths = [len(r) for r in batch.column("response_ids").to_pylist()]
    row: dict[str, float | int | None] = {}
    for name in sorted({n for n in names if n is not None}):
        rows = [i for i, n in enumerate(names) if n == name]
        gaps = [np.asarray(rollout[i], np.float64)[np.asarray(mask[i], bool)]
                - np.asarray(teacher[i], np.float64)[np.asarray(mask[i], bool)] for i in rows]
        tokens = sum(len(g) for g in gaps)
        graded = [rewards[i] for i in rows if rewards[i] is not None]
        row[f"teacher/{name}/samples"] = len(rows)
        row[f"teacher/{name}/kl"] = float(sum(g.sum() for g in gaps) / tokens) if tokens else None
        row[f"teacher/{name}/reward_mean"] = sum(graded) / len(graded) if graded else None
        row[f"teacher/{name}/response_len_mean"] = sum(lengths[i] for i in rows) / len(rows)
    return row

"""The Arrow batch: the contract between the scorer and the learner (DESIGN.md).

One row per sample. Per-token columns are lists of length T (the row's response length); the
teacher's top-k columns are lists of fixed-size lists of k. Batches travel between actors as
Arrow IPC stream bytes and are written to disk in the same format; nothing here pickles.

Batches without a teacher (GRPO, whose scorer is not started) carry ``opsd.teacher_mode=none``
and nulls in the three teacher columns. Batches whose objective reads only the teacher's
sampled-token log-probability (GRPO's KL reference, OPSD's sampled-token objective) carry
``opsd.targets=token`` and nulls in the two top-k columns; the default, ``opsd.targets=topk``, is
also what a batch without the key means.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_token_logprobs")
PER_TOKEN_COLUMNS = ("rollout_logprobs", "teacher_token_logprobs", "loss_mask")
TEACHER_MODES = ("fixed", "live", "ema", "none")
TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")
TARGETS = ("topk", "token")


def schema(k: int, *, temperature: float = 1.0, teacher_mode: str = "fixed", targets: str = "topk") -> pa.Schema:
    """The batch schema for top-k width ``k``, with the metadata DESIGN.md lists; ``targets``:
    ``topk`` (the top-k columns hold the teacher's top-k) or ``token`` (they are null)."""
    if k < 1:
        raise ValueError(f"top-k width must be >= 1, got {k}")
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode {teacher_mode!r}: expected one of {TEACHER_MODES}")
    if targets not in TARGETS:
        raise ValueError(f"targets {targets!r}: expected one of {TARGETS}")
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("teacher_prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("rollout_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("teacher_topk_ids", pa.list_(pa.list_(pa.int32(), k))),
        pa.field("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32(), k))),
        pa.field("teacher_token_logprobs", pa.list_(pa.float32())),
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("teacher_version", pa.int64(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
    ]
    meta = {
        "opsd.schema_version": str(SCHEMA_VERSION),
        "opsd.topk": str(k),
        "opsd.temperature": repr(float(temperature)),
        "opsd.teacher_mode": teacher_mode,
        "opsd.targets": targets,
    }
    return pa.schema(fields, metadata=meta)


@dataclass
class Sample:
    """One row before it becomes Arrow. Teacher fields are None for teacher-less batches."""

    sample_id: str
    prompt_ids: Sequence[int]
    teacher_prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    rollout_logprobs: Sequence[float]
    loss_mask: Sequence[bool]
    reward: float
    policy_version: int
    finish_reason: str
    teacher_topk_ids: np.ndarray | None = None  # [T, k]
    teacher_topk_logprobs: np.ndarray | None = None  # [T, k]
    teacher_token_logprobs: Sequence[float] | None = None  # [T]
    teacher_version: int = -1


def _list_array(rows: Sequence[Sequence], value_type: pa.DataType) -> pa.Array:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(r) for r in rows]) if len(rows) and offsets[-1] else np.zeros(0)
    values = pa.array(flat.astype(value_type.to_pandas_dtype(), copy=False), type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _topk_array(rows: Sequence[np.ndarray | None], value_type: pa.DataType, k: int) -> pa.Array:
    if all(r is None for r in rows):
        return pa.nulls(len(rows), pa.list_(pa.list_(value_type, k)))
    if any(r is None for r in rows):
        raise ValueError("teacher top-k is missing for some rows but not others")
    mats = [np.asarray(r).reshape(-1, k) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([m.shape[0] for m in mats], out=offsets[1:])
    flat = np.concatenate(mats).reshape(-1) if offsets[-1] else np.zeros(0)
    inner = pa.FixedSizeListArray.from_arrays(
        pa.array(flat.astype(value_type.to_pandas_dtype(), copy=False), type=value_type), k
    )
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def build_batch(samples: Sequence[Sample], *, k: int, temperature: float, teacher_mode: str,
                targets: str = "topk") -> pa.Table:
    """Samples -> a validated table with the schema of :func:`schema` (with ``targets=token`` the
    samples' top-k fields are not read)."""
    sch = schema(k, temperature=temperature, teacher_mode=teacher_mode, targets=targets)
    has_teacher = teacher_mode != "none"
    has_topk = has_teacher and targets == "topk"
    token_lp = [s.teacher_token_logprobs for s in samples]
    columns = [
        pa.array([s.sample_id for s in samples], pa.string()),
        _list_array([s.prompt_ids for s in samples], pa.int32()),
        _list_array([s.teacher_prompt_ids for s in samples], pa.int32()),
        _list_array([s.response_ids for s in samples], pa.int32()),
        _list_array([s.rollout_logprobs for s in samples], pa.float32()),
        _topk_array([s.teacher_topk_ids if has_topk else None for s in samples], pa.int32(), k),
        _topk_array([s.teacher_topk_logprobs if has_topk else None for s in samples], pa.float32(), k),
        _list_array(token_lp, pa.float32()) if has_teacher else pa.nulls(len(samples), pa.list_(pa.float32())),
        _list_array([s.loss_mask for s in samples], pa.bool_()),
        pa.array([s.reward for s in samples], pa.float32()),
        pa.array([s.policy_version for s in samples], pa.int64()),
        pa.array([s.teacher_version for s in samples], pa.int64()),
        pa.array([s.finish_reason for s in samples], pa.string()),
    ]
    table = pa.Table.from_arrays(columns, schema=sch)
    validate(table)
    return table


# --- IPC ------------------------------------------------------------------------------------


def to_ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc_bytes(data: bytes | pa.Buffer) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


def write_ipc(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write atomically: a reader never sees a half-written batch file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    return path


class BatchError(ValueError):
    """A batch file that cannot be read; the message names it."""


def read_ipc(path: str | os.PathLike) -> pa.Table:
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise BatchError(f"{path}: not a readable Arrow IPC batch ({exc})") from exc


# --- validation -----------------------------------------------------------------------------


def batch_meta(table: pa.Table) -> dict[str, str]:
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    for key in ("opsd.schema_version", "opsd.topk", "opsd.temperature", "opsd.teacher_mode"):
        if key not in meta:
            raise ValueError(f"batch schema metadata lacks '{key}'")
    if int(meta["opsd.schema_version"]) != SCHEMA_VERSION:
        raise ValueError(
            f"batch schema version {meta['opsd.schema_version']} is not the supported version {SCHEMA_VERSION}"
        )
    meta.setdefault("opsd.targets", "topk")  # batches written before the key existed
    if meta["opsd.targets"] not in TARGETS:
        raise ValueError(f"batch schema metadata 'opsd.targets' = {meta['opsd.targets']!r}: expected one of {TARGETS}")
    return meta


def _lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.diff(np.asarray(arr.offsets)) if len(arr) else np.zeros(0, dtype=np.int64)


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Values of a list column flattened, and the row each value belongs to."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = _lengths(arr)
    values = arr.flatten()
    if pa.types.is_fixed_size_list(values.type):
        width = values.type.list_size
        values = values.flatten()
        lengths = lengths * width
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return values.to_numpy(zero_copy_only=False), rows


def _first_null_row(col: pa.ChunkedArray | pa.Array) -> int | None:
    """The row of the first null at any nesting level (a row's own null_count sees only the top)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    rows = np.arange(len(arr))
    while True:
        if arr.null_count:
            return int(rows[np.flatnonzero(np.asarray(arr.is_null()))[0]])
        if pa.types.is_fixed_size_list(arr.type):
            rows = np.repeat(rows, arr.type.list_size)
        elif pa.types.is_list(arr.type):
            rows = np.repeat(rows, _lengths(arr))
        else:
            return None
        arr = arr.flatten()


def validate(table: pa.Table, *, vocab_size: int | None = None) -> None:
    """Raise ``ValueError`` naming the column and row of the first violation of the contract."""
    meta = batch_meta(table)
    k = int(meta["opsd.topk"])
    teacher_mode = meta["opsd.teacher_mode"]
    expected = schema(k, temperature=float(meta["opsd.temperature"]), teacher_mode=teacher_mode,
                      targets=meta["opsd.targets"])
    for f in expected:
        if f.name not in table.column_names:
            raise ValueError(f"batch lacks column '{f.name}'")
        actual = table.schema.field(f.name).type
        if actual != f.type:
            raise ValueError(f"column '{f.name}' has type {actual}, expected {f.type}")
    extra = set(table.column_names) - set(expected.names)
    if extra:
        raise ValueError(f"batch has unexpected columns {sorted(extra)}")

    has_teacher = teacher_mode != "none"
    has_topk = has_teacher and meta["opsd.targets"] == "topk"
    for name in table.column_names:
        col = table.column(name)
        if name in TEACHER_COLUMNS and not has_teacher:
            if col.null_count != len(col):
                raise ValueError(f"column '{name}' must be null when opsd.teacher_mode=none")
            continue
        if name in TOPK_COLUMNS and not has_topk:
            if col.null_count != len(col):
                raise ValueError(f"column '{name}' must be null when opsd.targets=token")
            continue
        row = _first_null_row(col)
        if row is not None:
            raise ValueError(f"column '{name}' row {row}: null value")

    n_tokens = _lengths(table.column("response_ids"))
    token_cols = [c for c in PER_TOKEN_COLUMNS if has_teacher or c not in TEACHER_COLUMNS]
    if has_topk:
        token_cols += list(TOPK_COLUMNS)
    for name in token_cols:
        lengths = _lengths(table.column(name))
        bad = np.flatnonzero(lengths != n_tokens)
        if len(bad):
            r = int(bad[0])
            raise ValueError(
                f"column '{name}' row {r}: {lengths[r]} entries but response_ids has {n_tokens[r]}"
            )

    id_cols = ["prompt_ids", "teacher_prompt_ids", "response_ids"] + (["teacher_topk_ids"] if has_topk else [])
    for name in id_cols:
        values, rows = _flat(table.column(name))
        bad = values < 0
        if vocab_size is not None:
            bad |= values >= vocab_size
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            rng = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"column '{name}' row {int(rows[i])}: token id {int(values[i])} outside {rng}")

    lp_cols = (["rollout_logprobs"] + (["teacher_token_logprobs"] if has_teacher else [])
               + (["teacher_topk_logprobs"] if has_topk else []))
    for name in lp_cols:
        values, rows = _flat(table.column(name))
        # -inf is a legal log-probability (a token the teacher rules out); NaN and > 0 are not.
        bad = np.isnan(values) | (values > 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"column '{name}' row {int(rows[i])}: logprob {values[i]} is NaN or > 0")

    reward = table.column("reward").to_numpy()
    if np.isnan(reward).any():
        raise ValueError(f"column 'reward' row {int(np.flatnonzero(np.isnan(reward))[0])}: NaN")


def tail_mass(topk_logprobs: np.ndarray) -> np.ndarray:
    """1 - sum(exp(topk)) per position: the teacher mass outside the kept ids."""
    return np.clip(1.0 - np.exp(topk_logprobs.astype(np.float64)).sum(-1), 0.0, 1.0)


def concat_batches(tables: Sequence[pa.Table]) -> pa.Table:
    """Concatenate batches that share a schema (same k and metadata)."""
    if not tables:
        raise ValueError("no batches to concatenate")
    first = tables[0].schema
    for t in tables[1:]:
        if not t.schema.equals(first, check_metadata=True):
            raise ValueError("batches disagree on schema or metadata (top-k width, temperature, teacher mode)")
    return pa.concat_tables(tables).combine_chunks()

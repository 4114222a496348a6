"""The Arrow batch: the contract between the scorer and the learner (docs/DESIGN.md, "The batch").

One row per :class:`Sample`, the one record a sample is from the moment its rollout comes back
(the driver makes it, the scorer adds the teacher's targets, :func:`build_batch` turns a list of
them into a table). Every column is one line of :data:`COLUMNS`, which the schema, the builder and
the validation all read: a new column is a field of ``Sample`` and a line there. Per-token columns
are lists of length T (the row's response length); the teacher's top-k columns are lists of
fixed-size lists of k. Batches travel between actors as Arrow IPC stream bytes and are written to
disk in the same format; nothing here pickles.

Batches without a teacher (GRPO, whose scorer is not started) carry ``opsd.teacher_mode=none``
and nulls in the teacher columns. Batches whose objective reads only the teacher's
sampled-token log-probability (GRPO's KL reference, OPSD's sampled-token objective) carry
``opsd.targets=token`` and nulls in the two top-k columns; the default, ``opsd.targets=topk``, is
also what a batch without the key means.

Schema version 2 (version 1 batches still read):

- A batch scored under more than one teacher context (a contrastive teacher's wrong ones) names
  the others in ``opsd.contexts`` (JSON, name -> "topk" | "token") and carries, per context ``c``,
  ``teacher_prompt_ids:c`` and ``teacher_token_logprobs:c`` (and, for "topk", the two top-k
  columns with that suffix); a row whose sample the context does not apply to is null in all of
  them. The primary context keeps the columns above.
- A batch of a dataset without answers (a solution-free teacher) says ``opsd.rewards=none`` and
  its reward column is null; otherwise every reward is the verifier's grade.

Schema version 3 (versions 1 and 2 still read: they lack its column, and a reader treats the
column as not measured) adds ``teacher_stop_logprobs``: per response position, the log of the
primary teacher's probability mass on the run's stop ids (a collapse diagnostic,
opsd/diagnostics.py). A row is null where the forward could not measure it (a vLLM engine's
prompt log-probs hold only the top-k).

Schema version 4 (versions 1 to 3 still read; they lack its column) adds ``teacher``: the name of
the teacher that scored the row, one of the run's ``teachers:`` (opsd/teachers.py); null in a run
of one teacher (``opsd.teacher_model`` names it when it is another model) and without a teacher. A
batch of several teachers names each one's model in ``opsd.teachers`` (JSON, name -> model, null
for the student's initial weights).

Schema version 5 (versions 1 to 4 still read; they lack its column) adds ``context_applied``:
whether the row's teacher context applies to its sample (false: the context left it out, for
example a majority context whose samples do not agree enough; the row was scored on the student's
own prompt and is not trained on); null without a teacher. An empty ``loss_mask`` alone cannot say
which reason emptied it (the context, ``loss.mask_truncated`` on a cut sample, or
``loss.skip_first`` on a response no longer than it); the collapse diagnostic needs to know
(opsd/diagnostics.py). A reader of an older batch takes a row with a loss token as applied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)

TEACHER_MODES = ("fixed", "live", "ema", "none")
TARGETS = ("topk", "token")


@dataclass(frozen=True)
class Column:
    """One column of the batch. ``shape``: "row" (one value per row), "list" (a list per row),
    "token" (a list of the row's T response tokens), "topk" (T lists of k). ``needs``: None (always
    there), "teacher" (null without a teacher), "topk" (null also with opsd.targets=token),
    "context" (a named context's: null in the rows it does not apply to), "graded" (null with
    opsd.rewards=none), "measured" (null without a teacher, and in the rows the teacher's forward
    could not measure). ``check``: "ids" (token ids in the vocabulary) or "logprob" (finite or -inf,
    <= 0). ``since``: the schema version that added the column (an older batch lacks it)."""

    name: str
    value: Callable[[], pa.DataType]
    shape: str = "row"
    needs: str | None = None
    check: str | None = None
    since: int = 1

    def type(self, k: int) -> pa.DataType:
        if self.shape == "topk":
            return pa.list_(pa.list_(self.value(), k))
        return pa.list_(self.value()) if self.shape in ("list", "token") else self.value()


COLUMNS = (
    Column("sample_id", pa.string),  # the dataset row's id + "#" + the sample's index
    Column("prompt_ids", pa.int32, "list", check="ids"),  # the student's prompt
    Column("teacher_prompt_ids", pa.int32, "list", check="ids"),  # the teacher's context
    Column("response_ids", pa.int32, "list", check="ids"),  # the sampled tokens (T)
    Column("rollout_logprobs", pa.float32, "token", check="logprob"),  # the sampler's, temperature 1
    Column("teacher_topk_ids", pa.int32, "topk", "topk", check="ids"),
    Column("teacher_topk_logprobs", pa.float32, "topk", "topk", check="logprob"),  # loss temperature applied
    Column("teacher_token_logprobs", pa.float32, "token", "teacher", check="logprob"),  # of the sampled token
    Column("loss_mask", pa.bool_, "token"),
    Column("reward", pa.float32, needs="graded"),  # the verifier's grade
    Column("policy_version", pa.int64),  # the weights that sampled the response
    Column("teacher_version", pa.int64),  # the weights that scored it (-1: no teacher)
    Column("finish_reason", pa.string),  # stop | length | abort
    # log of the teacher's mass on the stop ids at each position (T): does it want to stop there?
    Column("teacher_stop_logprobs", pa.float32, "token", "measured", check="logprob", since=3),
    # which of several teachers scored the row (null: the run has one)
    Column("teacher", pa.string, needs="measured", since=4),
    # whether the row's teacher context applies (false: scored on the student's prompt, not trained)
    Column("context_applied", pa.bool_, needs="teacher", since=5),
)


def context_columns(name: str, targets: str) -> tuple[Column, ...]:
    """The columns of the named context ``name`` (not the primary one)."""
    cols = (Column(f"teacher_prompt_ids:{name}", pa.int32, "list", "context", check="ids"),
            Column(f"teacher_token_logprobs:{name}", pa.float32, "token", "context", check="logprob"))
    if targets == "topk":
        cols += (Column(f"teacher_topk_ids:{name}", pa.int32, "topk", "context", check="ids"),
                 Column(f"teacher_topk_logprobs:{name}", pa.float32, "topk", "context", check="logprob"))
    return cols


def columns_of(contexts: dict[str, str], version: int = SCHEMA_VERSION) -> tuple[Column, ...]:
    """The columns of a batch of schema ``version`` with these named contexts."""
    return tuple(c for c in COLUMNS if c.since <= version) + tuple(
        c for name, targets in contexts.items() for c in context_columns(name, targets))


def schema(k: int, *, temperature: float = 1.0, teacher_mode: str = "fixed", targets: str = "topk",
           contexts: dict[str, str] | None = None, graded: bool = True, version: int = SCHEMA_VERSION) -> pa.Schema:
    """The batch schema for top-k width ``k``, with the metadata docs/DESIGN.md lists; ``targets``:
    ``topk`` (the top-k columns hold the teacher's top-k) or ``token`` (they are null);
    ``contexts``: the other named contexts and their targets; ``graded``: the rewards are grades;
    ``version``: an older schema version (what a batch written then holds)."""
    if k < 1:
        raise ValueError(f"top-k width must be >= 1, got {k}")
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode {teacher_mode!r}: expected one of {TEACHER_MODES}")
    if targets not in TARGETS:
        raise ValueError(f"targets {targets!r}: expected one of {TARGETS}")
    contexts = dict(contexts or {})
    for name, t in contexts.items():
        if t not in TARGETS or not name or ":" in name:
            raise ValueError(f"context {name!r}: targets {t!r}; expected a name without ':' and one of {TARGETS}")
    meta = {
        "opsd.schema_version": str(version),
        "opsd.topk": str(k),
        "opsd.temperature": repr(float(temperature)),
        "opsd.teacher_mode": teacher_mode,
        "opsd.targets": targets,
    }
    if contexts:
        meta["opsd.contexts"] = json.dumps(contexts, sort_keys=True)
    if not graded:
        meta["opsd.rewards"] = "none"
    fields = [pa.field(c.name, c.type(k), nullable=c.needs is not None) for c in columns_of(contexts, version)]
    return pa.schema(fields, metadata=meta)


@dataclass
class ContextScores:
    """A sample under one named context other than the primary: its prompt ids (None: the context
    does not apply to this sample), and the scorer's targets for it."""

    prompt_ids: Sequence[int] | None
    token_logprobs: Sequence[float] | None = None  # [T]
    topk_ids: np.ndarray | None = None  # [T, k]
    topk_logprobs: np.ndarray | None = None  # [T, k]


@dataclass
class Sample:
    """One sample, from its rollout to its row of the batch (one field per column). The teacher's
    fields are None until the scorer fills them, and stay None in a batch without a teacher."""

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
    others: dict[str, ContextScores] = field(default_factory=dict)  # the other named contexts
    teacher_stop_logprobs: Sequence[float] | None = None  # [T]; None: not measured
    teacher: str | None = None  # the name of the one of several teachers that scores it
    context_applied: bool = True  # False: its teacher context left it out (scored on the student's prompt)

    def value(self, column: str):
        """This sample's value of ``column`` (a named context's columns read ``others``)."""
        if ":" not in column:
            return getattr(self, column)
        field_name, name = column.split(":", 1)
        scores = self.others.get(name)
        if scores is None or scores.prompt_ids is None:
            return None
        return getattr(scores, field_name.removeprefix("teacher_"))


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


def _present(column: Column, teacher_mode: str, targets: str, graded: bool = True) -> bool:
    """Whether a batch of this teacher mode and targets holds values in ``column`` (else nulls;
    a named context's columns are there, null in some rows)."""
    if column.needs in (None, "context"):
        return True
    if column.needs == "graded":
        return graded
    return teacher_mode != "none" and (column.needs in ("teacher", "measured") or targets == "topk")


def _nullable_array(values: list, column: Column, k: int) -> pa.Array:
    """A named context's column: None where the context does not apply to the row."""
    rows = [None if v is None else np.asarray(v).reshape(-1, k).tolist() if column.shape == "topk"
            else v if column.shape == "row" else list(v) for v in values]
    return pa.array(rows, type=column.type(k))


def build_batch(samples: Sequence[Sample], *, k: int, temperature: float, teacher_mode: str,
                targets: str = "topk", contexts: dict[str, str] | None = None) -> pa.Table:
    """Samples -> a validated table with the schema of :func:`schema` (the samples' fields of
    columns the batch holds as nulls are not read). The rewards are grades unless every sample's
    reward is None."""
    ungraded = [s.reward is None for s in samples]
    if any(ungraded) and not all(ungraded):
        raise ValueError("reward is missing for some rows but not others (a batch mixes graded and ungraded data)")
    graded = not (samples and all(ungraded))
    sch = schema(k, temperature=temperature, teacher_mode=teacher_mode, targets=targets, contexts=contexts,
                 graded=graded)
    arrays = []
    for column, field_ in zip(columns_of(dict(contexts or {})), sch):
        if not _present(column, teacher_mode, targets, graded):
            arrays.append(pa.nulls(len(samples), field_.type))
            continue
        values = [s.value(column.name) for s in samples]
        if column.needs == "measured" and all(v is None for v in values):
            arrays.append(pa.nulls(len(samples), field_.type))
        elif column.needs in ("context", "measured"):
            arrays.append(_nullable_array(values, column, k))
        elif column.shape == "topk":
            arrays.append(_topk_array(values, column.value(), k))
        elif column.shape in ("list", "token"):
            arrays.append(_list_array(values, column.value()))
        else:
            arrays.append(pa.array(values, column.value()))
    table = pa.Table.from_arrays(arrays, schema=sch)
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
    if int(meta["opsd.schema_version"]) not in READABLE_VERSIONS:
        raise ValueError(
            f"batch schema version {meta['opsd.schema_version']} is not a supported version {READABLE_VERSIONS}"
        )
    meta.setdefault("opsd.targets", "topk")  # batches written before the key existed
    meta.setdefault("opsd.contexts", "{}")  # one context (version 1, and most batches)
    meta.setdefault("opsd.rewards", "graded")
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


def contexts_of(table: pa.Table) -> dict[str, str]:
    """The batch's named contexts besides the primary one, with their targets."""
    try:
        found = json.loads(batch_meta(table)["opsd.contexts"])
    except ValueError as exc:
        raise ValueError(f"batch schema metadata 'opsd.contexts' is not JSON: {exc}") from None
    if not isinstance(found, dict):
        raise ValueError(f"batch schema metadata 'opsd.contexts' = {found!r}: expected a mapping of names")
    return found


def validate(table: pa.Table, *, vocab_size: int | None = None) -> None:
    """Raise ``ValueError`` naming the column and row of the first violation of the contract."""
    meta = batch_meta(table)
    k = int(meta["opsd.topk"])
    teacher_mode = meta["opsd.teacher_mode"]
    graded = meta["opsd.rewards"] != "none"
    contexts = contexts_of(table)
    version = int(meta["opsd.schema_version"])
    expected = schema(k, temperature=float(meta["opsd.temperature"]), teacher_mode=teacher_mode,
                      targets=meta["opsd.targets"], contexts=contexts, graded=graded, version=version)
    for f in expected:
        if f.name not in table.column_names:
            raise ValueError(f"batch lacks column '{f.name}'")
        actual = table.schema.field(f.name).type
        if actual != f.type:
            raise ValueError(f"column '{f.name}' has type {actual}, expected {f.type}")
    extra = set(table.column_names) - set(expected.names)
    if extra:
        raise ValueError(f"batch has unexpected columns {sorted(extra)}")

    columns = columns_of(contexts, version)
    present = {c.name: _present(c, teacher_mode, meta["opsd.targets"], graded) for c in columns}
    for column in columns:
        col = table.column(column.name)
        if not present[column.name]:
            if col.null_count != len(col):
                why = ("opsd.rewards=none" if column.needs == "graded" else
                       "opsd.teacher_mode=none" if teacher_mode == "none" else "opsd.targets=token")
                raise ValueError(f"column '{column.name}' must be null when {why}")
            continue
        if column.needs == "context":
            _check_context_rows(table, column)
            continue
        if column.needs == "measured":  # a row may be null (not measured), but not a value inside one
            absent = np.asarray(col.combine_chunks().is_null())
            row = _first_null_row(col.combine_chunks().filter(pa.array(~absent)))
            if row is not None:
                raise ValueError(f"column '{column.name}' row {int(np.flatnonzero(~absent)[row])}: null value")
            continue
        row = _first_null_row(col)
        if row is not None:
            raise ValueError(f"column '{column.name}' row {row}: null value")

    n_tokens = _lengths(table.column("response_ids"))
    for column in columns:
        if column.shape not in ("token", "topk") or not present[column.name]:
            continue
        lengths = _lengths(table.column(column.name))
        absent = np.asarray(table.column(column.name).combine_chunks().is_null())
        bad = np.flatnonzero((lengths != n_tokens) & ~absent)
        if len(bad):
            r = int(bad[0])
            raise ValueError(
                f"column '{column.name}' row {r}: {lengths[r]} entries but response_ids has {n_tokens[r]}"
            )

    for column in columns:
        if column.check is None or not present[column.name]:
            continue
        values, rows = _flat(table.column(column.name))
        if column.check == "ids":
            bad = values < 0
            if vocab_size is not None:
                bad |= values >= vocab_size
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                rng = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                raise ValueError(f"column '{column.name}' row {int(rows[i])}: token id {int(values[i])} outside {rng}")
        else:
            # -inf is a legal log-probability (a token the teacher rules out); NaN and > 0 are not.
            bad = np.isnan(values) | (values > 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"column '{column.name}' row {int(rows[i])}: logprob {values[i]} is NaN or > 0")

    if graded:
        reward = table.column("reward").to_numpy()
        if np.isnan(reward).any():
            raise ValueError(f"column 'reward' row {int(np.flatnonzero(np.isnan(reward))[0])}: NaN")


def _check_context_rows(table: pa.Table, column: Column) -> None:
    """A named context's row is null in all its columns or in none, and holds no null inside."""
    name = column.name.split(":", 1)[1]
    prompt = np.asarray(table.column(f"teacher_prompt_ids:{name}").combine_chunks().is_null())
    col = table.column(column.name).combine_chunks()
    absent = np.asarray(col.is_null())
    differ = np.flatnonzero(absent != prompt)
    if len(differ):
        raise ValueError(f"column '{column.name}' row {int(differ[0])}: null where teacher_prompt_ids:{name} is not "
                         "(a context applies to a row in all its columns or in none)")
    row = _first_null_row(col.filter(pa.array(~absent)))
    if row is not None:
        raise ValueError(f"column '{column.name}' row {int(np.flatnonzero(~absent)[row])}: null value")


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

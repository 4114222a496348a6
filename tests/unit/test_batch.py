import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest

from opsd.batch import (
    SCHEMA_VERSION,
    Sample,
    batch_meta,
    build_batch,
    concat_batches,
    from_ipc_bytes,
    read_ipc,
    schema,
    tail_mass,
    to_ipc_bytes,
    validate,
    write_ipc,
)

K = 3
VOCAB = 50

# The column table of DESIGN.md ("The Arrow batch"), written out independently of opsd.batch.
DESIGN_COLUMNS = [
    ("sample_id", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("teacher_prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),
    ("rollout_logprobs", pa.list_(pa.float32())),
    ("teacher_topk_ids", pa.list_(pa.list_(pa.int32(), K))),
    ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32(), K))),
    ("teacher_token_logprobs", pa.list_(pa.float32())),
    ("loss_mask", pa.list_(pa.bool_())),
    ("reward", pa.float32()),
    ("policy_version", pa.int64()),
    ("teacher_version", pa.int64()),
    ("finish_reason", pa.string()),
    ("teacher_stop_logprobs", pa.list_(pa.float32())),
    ("teacher", pa.string()),
    ("context_applied", pa.bool_()),
]
DESIGN_METADATA = {"opsd.schema_version", "opsd.topk", "opsd.temperature", "opsd.teacher_mode", "opsd.targets"}


def _sample(i: int, T: int, *, teacher: bool = True) -> Sample:
    rng = np.random.default_rng(i)
    return Sample(
        sample_id=f"row{i}:0",
        prompt_ids=list(rng.integers(0, VOCAB, 4 + i)),
        teacher_prompt_ids=list(rng.integers(0, VOCAB, 7 + i)),
        response_ids=list(rng.integers(0, VOCAB, T)),
        rollout_logprobs=list(-rng.random(T) * 3),
        loss_mask=[j >= 1 for j in range(T)],
        reward=float(i % 2),
        policy_version=10 + i,
        finish_reason="stop" if i % 2 == 0 else "length",
        teacher_topk_ids=rng.integers(0, VOCAB, (T, K)) if teacher else None,
        teacher_topk_logprobs=-rng.random((T, K)) * 5 if teacher else None,
        teacher_token_logprobs=list(-rng.random(T) * 2) if teacher else None,
        teacher_version=7 if teacher else -1,
    )


@pytest.fixture
def samples():
    # Three rows of different lengths, so that a row index in an error means something.
    return [_sample(0, 4), _sample(1, 2), _sample(2, 5)]


@pytest.fixture
def table(samples):
    return build_batch(samples, k=K, temperature=0.7, teacher_mode="fixed")


def _set(table: pa.Table, name: str, values: list, type_: pa.DataType | None = None) -> pa.Table:
    """Replace one column with `values` (python lists), keeping or changing its type."""
    idx = table.schema.get_field_index(name)
    field = table.schema.field(name)
    field = field.with_type(type_) if type_ is not None else field
    return table.set_column(idx, field, pa.array(values, type=field.type))


def _col(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist()


def _raises(table: pa.Table, match: str, **kw) -> str:
    with pytest.raises(ValueError) as info:
        validate(table, **kw)
    msg = str(info.value)
    assert match in msg, msg
    return msg


# --- schema ---------------------------------------------------------------------------------


def test_schema_columns_and_types_match_design():
    sch = schema(K, temperature=0.7, teacher_mode="live")
    assert [(f.name, f.type) for f in sch] == DESIGN_COLUMNS


def test_schema_metadata():
    meta = {k.decode(): v.decode() for k, v in schema(K, temperature=0.7, teacher_mode="ema").metadata.items()}
    assert set(meta) == DESIGN_METADATA
    assert meta["opsd.schema_version"] == str(SCHEMA_VERSION)
    assert int(meta["opsd.topk"]) == K
    assert float(meta["opsd.temperature"]) == 0.7
    assert meta["opsd.teacher_mode"] == "ema"


@pytest.mark.parametrize("kw", [dict(k=0), dict(k=K, teacher_mode="frozen")])
def test_schema_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        schema(**kw)


# --- build ----------------------------------------------------------------------------------


def test_build_batch_holds_the_samples(samples, table):
    assert table.schema.equals(schema(K, temperature=0.7, teacher_mode="fixed"), check_metadata=True)
    assert table.num_rows == 3
    assert _col(table, "sample_id") == [s.sample_id for s in samples]
    for name in ("prompt_ids", "teacher_prompt_ids", "response_ids"):
        assert _col(table, name) == [[int(x) for x in getattr(s, name)] for s in samples]
    assert _col(table, "loss_mask") == [list(s.loss_mask) for s in samples]
    for got, s in zip(_col(table, "rollout_logprobs"), samples):
        np.testing.assert_array_equal(np.float32(got), np.float32(s.rollout_logprobs))
    for got, s in zip(_col(table, "teacher_token_logprobs"), samples):
        np.testing.assert_array_equal(np.float32(got), np.float32(s.teacher_token_logprobs))
    for got, s in zip(_col(table, "teacher_topk_ids"), samples):
        np.testing.assert_array_equal(np.array(got), s.teacher_topk_ids)
    for got, s in zip(_col(table, "teacher_topk_logprobs"), samples):
        np.testing.assert_array_equal(np.array(got, dtype=np.float32), s.teacher_topk_logprobs.astype(np.float32))
    assert _col(table, "reward") == [0.0, 1.0, 0.0]
    assert _col(table, "policy_version") == [10, 11, 12]
    assert _col(table, "teacher_version") == [7, 7, 7]
    assert _col(table, "finish_reason") == ["stop", "length", "stop"]


def test_build_batch_rejects_teacher_targets_missing_for_some_rows(samples):
    samples[1].teacher_topk_ids = None
    with pytest.raises(ValueError, match="missing for some rows"):
        build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed")


def test_build_batch_rejects_top_k_of_the_wrong_length(samples):
    samples[1].teacher_topk_logprobs = samples[1].teacher_topk_logprobs[:1]  # 1 position, T = 2
    with pytest.raises(ValueError, match="column 'teacher_topk_logprobs' row 1"):
        build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed")


def test_teacherless_batch_has_null_teacher_columns_and_validates():
    samples = [_sample(0, 3, teacher=False), _sample(1, 1, teacher=False)]
    table = build_batch(samples, k=K, temperature=1.0, teacher_mode="none")
    validate(table, vocab_size=VOCAB)
    for name in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_token_logprobs"):
        assert table.column(name).null_count == 2
    assert _col(table, "teacher_version") == [-1, -1]
    # A teacher-less batch must not smuggle in teacher values.
    _raises(_set(table, "teacher_token_logprobs", [[-1.0, -1.0, -1.0], None]), "must be null")


def test_teacherless_batch_ignores_teacher_fields_of_samples(samples):
    table = build_batch(samples, k=K, temperature=1.0, teacher_mode="none")
    assert table.column("teacher_topk_ids").null_count == len(samples)


def test_a_token_targets_batch_has_null_top_k_columns_and_still_checks_the_token_logprobs(samples):
    """opsd.targets=token (the loss reads only the sampled token's logprob): the top-k columns
    are null, whatever the samples hold, and must stay null; the token logprobs are checked."""
    table = build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed", targets="token")
    validate(table, vocab_size=VOCAB)
    assert batch_meta(table)["opsd.targets"] == "token"
    for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
        assert table.column(name).null_count == len(samples)
    for got, s in zip(_col(table, "teacher_token_logprobs"), samples):
        np.testing.assert_array_equal(np.float32(got), np.float32(s.teacher_token_logprobs))
    full = build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed")
    _raises(_set(table, "teacher_topk_ids", _col(full, "teacher_topk_ids")), "must be null when opsd.targets=token")
    lp = _col(table, "teacher_token_logprobs")
    lp[1][0] = float("nan")
    _raises(_set(table, "teacher_token_logprobs", lp), "column 'teacher_token_logprobs' row 1")
    with pytest.raises(ValueError, match="targets 'all'"):
        schema(K, targets="all")


def test_a_batch_written_before_opsd_targets_existed_reads_as_top_k(table):
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"opsd.targets"}
    old = table.replace_schema_metadata(meta)
    assert batch_meta(old)["opsd.targets"] == "topk"
    validate(old, vocab_size=VOCAB)
    bad = table.replace_schema_metadata({**meta, b"opsd.targets": b"some"})
    with pytest.raises(ValueError, match="'opsd.targets' = 'some'"):
        batch_meta(bad)


def test_empty_batch_validates():
    table = build_batch([], k=K, temperature=1.0, teacher_mode="fixed")
    assert table.num_rows == 0
    validate(table)


# --- IPC ------------------------------------------------------------------------------------


def _assert_same(a: pa.Table, b: pa.Table) -> None:
    assert a.schema.equals(b.schema, check_metadata=True)
    assert a.schema.metadata == b.schema.metadata
    assert a.to_pylist() == b.to_pylist()
    assert a.equals(b)


def test_ipc_bytes_round_trip(table):
    data = to_ipc_bytes(table)
    assert isinstance(data, bytes)
    back = from_ipc_bytes(data)
    _assert_same(back, table)
    validate(back, vocab_size=VOCAB)
    _assert_same(from_ipc_bytes(pa.py_buffer(data)), table)


def test_ipc_file_round_trip(table, tmp_path):
    path = write_ipc(table, tmp_path / "batches" / "step_000001.arrow")
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["step_000001.arrow"]  # no temp file left
    back = read_ipc(path)
    _assert_same(back, table)
    # The file is the same IPC stream the actors pass around.
    assert path.read_bytes() == to_ipc_bytes(table)


def test_ipc_round_trip_of_teacherless_batch():
    table = build_batch([_sample(0, 2, teacher=False)], k=K, temperature=1.0, teacher_mode="none")
    back = from_ipc_bytes(to_ipc_bytes(table))
    _assert_same(back, table)
    validate(back)


# --- validate: accepted ---------------------------------------------------------------------


def test_valid_batch_passes(table):
    validate(table, vocab_size=VOCAB)


def test_minus_infinity_logprobs_are_accepted(table):
    lp = _col(table, "teacher_topk_logprobs")
    lp[1][0][2] = -math.inf
    tok = _col(table, "teacher_token_logprobs")
    tok[2][3] = -math.inf
    roll = _col(table, "rollout_logprobs")
    roll[0][0] = -math.inf
    t = _set(_set(_set(table, "teacher_topk_logprobs", lp), "teacher_token_logprobs", tok), "rollout_logprobs", roll)
    validate(t)


def test_validate_on_chunked_and_sliced_tables(table):
    chunked = pa.concat_tables([table, table])
    assert chunked.column("response_ids").num_chunks == 2
    validate(chunked, vocab_size=VOCAB)
    validate(table.slice(1), vocab_size=VOCAB)
    # Row numbers count from the start of the (chunked) table.
    roll = _col(chunked, "rollout_logprobs")
    roll[4] = roll[4] + [-0.1]
    bad = pa.concat_tables([table, _set(table, "rollout_logprobs", roll[3:])])
    _raises(bad, "column 'rollout_logprobs' row 4:")


# --- validate: per-token lengths ------------------------------------------------------------


@pytest.mark.parametrize("name,extra", [
    ("rollout_logprobs", -0.5),
    ("loss_mask", True),
    ("teacher_token_logprobs", -0.5),
    ("teacher_topk_ids", [1, 2, 3]),
    ("teacher_topk_logprobs", [-1.0, -2.0, -3.0]),
])
@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_per_token_length_mismatch_names_column_and_row(table, name, extra, change):
    values = _col(table, name)
    values[2] = values[2] + [extra] if change == "longer" else values[2][:-1]
    msg = _raises(_set(table, name, values), f"column '{name}' row 2:")
    assert "response_ids" in msg


def test_response_longer_than_its_per_token_columns_names_a_row(table):
    ids = _col(table, "response_ids")
    ids[1] = ids[1] + [5]
    _raises(_set(table, "response_ids", ids), "row 1:")


def test_top_k_of_the_wrong_width_is_a_type_mismatch(table):
    wide = [[row + [0] for row in r] for r in _col(table, "teacher_topk_ids")]
    _raises(_set(table, "teacher_topk_ids", wide, pa.list_(pa.list_(pa.int32(), K + 1))), "column 'teacher_topk_ids' has type")
    narrow = [[row[:-1] for row in r] for r in _col(table, "teacher_topk_logprobs")]
    _raises(
        _set(table, "teacher_topk_logprobs", narrow, pa.list_(pa.list_(pa.float32(), K - 1))),
        "column 'teacher_topk_logprobs' has type",
    )


@pytest.mark.parametrize("name,type_", [
    ("prompt_ids", pa.list_(pa.int64())),
    ("rollout_logprobs", pa.list_(pa.float64())),
    ("reward", pa.float64()),
    ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),  # variable-size inner lists
])
def test_wrong_column_type_is_rejected(table, name, type_):
    _raises(_set(table, name, _col(table, name), type_), f"column '{name}' has type")


# --- validate: token ids --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt_ids", "teacher_prompt_ids", "response_ids", "teacher_topk_ids"])
def test_id_at_vocab_size_names_column_and_row(table, name):
    values = _col(table, name)
    if name == "teacher_topk_ids":
        values[1][1][2] = VOCAB
    else:
        values[1][-1] = VOCAB
    bad = _set(table, name, values)
    validate(bad)  # without a vocabulary size, VOCAB is a legal id
    validate(bad, vocab_size=VOCAB + 1)
    msg = _raises(bad, f"column '{name}' row 1:", vocab_size=VOCAB)
    assert str(VOCAB) in msg


@pytest.mark.parametrize("name", ["prompt_ids", "teacher_prompt_ids", "response_ids", "teacher_topk_ids"])
def test_negative_id_names_column_and_row(table, name):
    values = _col(table, name)
    if name == "teacher_topk_ids":
        values[2][4][0] = -1
    else:
        values[2][0] = -1
    _raises(_set(table, name, values), f"column '{name}' row 2:")


# --- validate: log-probabilities ------------------------------------------------------------


@pytest.mark.parametrize("name", ["rollout_logprobs", "teacher_token_logprobs", "teacher_topk_logprobs"])
@pytest.mark.parametrize("value", [0.25, math.nan])
def test_positive_or_nan_logprob_names_column_and_row(table, name, value):
    values = _col(table, name)
    if name == "teacher_topk_logprobs":
        values[1][1][0] = value
    else:
        values[1][1] = value
    _raises(_set(table, name, values), f"column '{name}' row 1:")


def test_zero_logprob_is_accepted(table):
    values = _col(table, "rollout_logprobs")
    values[0][0] = 0.0  # probability one
    validate(_set(table, "rollout_logprobs", values))


def test_nan_reward_is_rejected(table):
    _raises(_set(table, "reward", [0.0, 1.0, math.nan]), "column 'reward' row 2")


# --- validate: nulls ------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "sample_id", "prompt_ids", "response_ids", "rollout_logprobs", "teacher_topk_ids",
    "teacher_token_logprobs", "loss_mask", "reward", "policy_version", "finish_reason",
])
def test_null_row_names_column_and_row(table, name):
    values = _col(table, name)
    values[1] = None
    _raises(_set(table, name, values), f"column '{name}' row 1: null")


@pytest.mark.parametrize("name,path", [
    ("prompt_ids", (2, 1)),
    ("loss_mask", (2, 0)),
    ("rollout_logprobs", (1, 1)),
    ("teacher_topk_ids", (1, 0, 1)),
    ("teacher_topk_logprobs", (2, 3)),  # a whole position's top-k
])
def test_null_inside_a_list_names_column_and_row(table, name, path):
    values = _col(table, name)
    target = values
    for i in path[:-1]:
        target = target[i]
    target[path[-1]] = None
    _raises(_set(table, name, values), f"column '{name}' row {path[0]}: null")


# --- validate: schema and metadata ----------------------------------------------------------


@pytest.mark.parametrize("key", sorted(DESIGN_METADATA - {"opsd.targets"}))  # optional: see above
def test_missing_metadata_key_is_named(table, key):
    meta = dict(table.schema.metadata)
    del meta[key.encode()]
    _raises(table.replace_schema_metadata(meta), key)


def test_no_metadata_at_all_is_rejected(table):
    _raises(table.replace_schema_metadata(None), "opsd.")


def test_wrong_schema_version_is_rejected(table):
    meta = dict(table.schema.metadata)
    meta[b"opsd.schema_version"] = str(SCHEMA_VERSION + 1).encode()
    msg = _raises(table.replace_schema_metadata(meta), "schema version")
    assert str(SCHEMA_VERSION + 1) in msg


def test_metadata_topk_that_disagrees_with_the_columns_is_rejected(table):
    meta = dict(table.schema.metadata)
    meta[b"opsd.topk"] = str(K + 1).encode()
    _raises(table.replace_schema_metadata(meta), "column 'teacher_topk_ids' has type")


@pytest.mark.parametrize("name", ["loss_mask", "teacher_token_logprobs", "sample_id"])
def test_missing_column_is_named(table, name):
    _raises(table.drop_columns([name]), f"lacks column '{name}'")


def test_extra_column_is_named(table):
    t = table.append_column("advantage", pa.array([0.0, 0.0, 0.0], pa.float32()))
    _raises(t, "advantage")


# --- concat ---------------------------------------------------------------------------------


def test_concat_keeps_rows_in_order_and_metadata(samples):
    a = build_batch(samples[:2], k=K, temperature=0.7, teacher_mode="fixed")
    b = build_batch(samples[2:], k=K, temperature=0.7, teacher_mode="fixed")
    both = concat_batches([a, b])
    _assert_same(both, build_batch(samples, k=K, temperature=0.7, teacher_mode="fixed"))
    assert both.column("response_ids").num_chunks == 1
    validate(both)


@pytest.mark.parametrize("other", [
    dict(k=K + 1, temperature=0.7, teacher_mode="fixed"),
    dict(k=K, temperature=1.0, teacher_mode="fixed"),
    dict(k=K, temperature=0.7, teacher_mode="live"),
])
def test_concat_rejects_mismatched_batches(other):
    k = other["k"]
    s = _sample(5, 2)
    s.teacher_topk_ids = np.zeros((2, k), dtype=np.int64)
    s.teacher_topk_logprobs = np.full((2, k), -1.0)
    a = build_batch([_sample(4, 3)], k=K, temperature=0.7, teacher_mode="fixed")
    b = build_batch([s], **other)
    with pytest.raises(ValueError, match="disagree"):
        concat_batches([a, b])


def test_concat_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        concat_batches([])


def test_tail_mass_is_the_mass_outside_top_k():
    lp = np.log(np.array([[0.5, 0.25, 0.125], [0.6, 0.3, 0.1]], dtype=np.float32))
    np.testing.assert_allclose(tail_mass(lp), [0.125, 0.0], atol=1e-6)


# --- schema version 2: named contexts, ungraded batches ---------------------------------------


def _with_contexts(samples, absent_in: dict[str, set[int]]):
    """The samples with two other named contexts: wrong_0 ("token") and alt ("topk"), absent in
    the rows ``absent_in`` names."""
    from opsd.batch import ContextScores

    rng = np.random.default_rng(7)
    for i, s in enumerate(samples):
        T = len(s.response_ids)
        s.others = {
            "wrong_0": ContextScores(None) if i in absent_in.get("wrong_0", ()) else
            ContextScores(list(rng.integers(0, VOCAB, 6)), list(-rng.random(T))),
            "alt": ContextScores(None) if i in absent_in.get("alt", ()) else
            ContextScores(list(rng.integers(0, VOCAB, 3)), list(-rng.random(T)), rng.integers(0, VOCAB, (T, K)),
                          -rng.random((T, K)) * 4),
        }
    return samples


CONTEXTS = {"wrong_0": "token", "alt": "topk"}


def test_a_batch_of_several_contexts_holds_each_context_and_nulls_where_one_does_not_apply(samples):
    from opsd.batch import contexts_of

    samples = _with_contexts(samples, {"wrong_0": {1}})
    table = build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed", contexts=CONTEXTS)
    validate(table, vocab_size=VOCAB)
    assert contexts_of(table) == CONTEXTS and batch_meta(table)["opsd.schema_version"] == str(SCHEMA_VERSION)
    assert [f.name for f in table.schema][len(DESIGN_COLUMNS):] == [
        "teacher_prompt_ids:wrong_0", "teacher_token_logprobs:wrong_0", "teacher_prompt_ids:alt",
        "teacher_token_logprobs:alt", "teacher_topk_ids:alt", "teacher_topk_logprobs:alt"]
    assert _col(table, "teacher_prompt_ids:wrong_0")[1] is None
    assert _col(table, "teacher_token_logprobs:wrong_0")[1] is None
    for i in (0, 2):
        s = samples[i].others["wrong_0"]
        assert _col(table, "teacher_prompt_ids:wrong_0")[i] == [int(x) for x in s.prompt_ids]
        np.testing.assert_array_equal(np.float32(_col(table, "teacher_token_logprobs:wrong_0")[i]),
                                      np.float32(s.token_logprobs))
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(np.array(_col(table, "teacher_topk_ids:alt")[i]), s.others["alt"].topk_ids)
    # The IPC round trip keeps it all, metadata included.
    assert from_ipc_bytes(to_ipc_bytes(table)).equals(table, check_metadata=True)


def test_a_context_row_must_be_null_in_all_its_columns_or_in_none(samples):
    table = build_batch(_with_contexts(samples, {}), k=K, temperature=1.0, teacher_mode="fixed", contexts=CONTEXTS)
    lp = _col(table, "teacher_token_logprobs:wrong_0")
    lp[2] = None
    _raises(_set(table, "teacher_token_logprobs:wrong_0", lp), "column 'teacher_token_logprobs:wrong_0' row 2")
    lp = _col(table, "teacher_token_logprobs:wrong_0")
    lp[0] = lp[0][:-1]
    _raises(_set(table, "teacher_token_logprobs:wrong_0", lp), "row 0: 3 entries but response_ids has 4")
    lp = _col(table, "teacher_topk_logprobs:alt")
    lp[1][0][0] = 0.5
    _raises(_set(table, "teacher_topk_logprobs:alt", lp), "column 'teacher_topk_logprobs:alt' row 1: logprob 0.5")
    meta = dict(table.schema.metadata)
    meta[b"opsd.contexts"] = b'{"wrong_0": "token", "alt": "topk", "wrong_1": "token"}'
    _raises(table.replace_schema_metadata(meta), "batch lacks column 'teacher_prompt_ids:wrong_1'")


def _as_version(table: pa.Table, version: int) -> pa.Table:
    """The batch as a writer of schema ``version`` wrote it: without the columns added since."""
    if version < 5:
        table = table.drop_columns(["context_applied"])
    if version < 4:
        table = table.drop_columns(["teacher"])
    if version < 3:
        table = table.drop_columns(["teacher_stop_logprobs"])
    meta = dict(table.schema.metadata)
    meta[b"opsd.schema_version"] = str(version).encode()
    return table.replace_schema_metadata(meta)


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_a_batch_of_an_older_schema_version_still_reads(table, version):
    validate(_as_version(table, version), vocab_size=VOCAB)
    # ...and one that claims the old version but holds the new column is refused: it was not written so.
    meta = dict(table.schema.metadata)
    meta[b"opsd.schema_version"] = str(version).encode()
    since = {"teacher_stop_logprobs": 3, "teacher": 4, "context_applied": 5}
    added = sorted(name for name, v in since.items() if version < v)
    _raises(table.replace_schema_metadata(meta), f"unexpected columns {added}")


def test_the_teacher_column_names_each_rows_teacher_or_is_null_with_one_teacher(samples):
    assert build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed").column("teacher").null_count == 3
    for s, name in zip(samples, ["base", "big", None]):
        s.teacher = name
    table = build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed")
    validate(table, vocab_size=VOCAB)
    assert _col(table, "teacher") == ["base", "big", None]
    # Without a teacher nothing scored the rows: the column is null whatever the samples say.
    untaught = [dataclasses.replace(s, teacher_topk_ids=None, teacher_topk_logprobs=None, teacher_token_logprobs=None)
                for s in samples]
    assert build_batch(untaught, k=K, temperature=1.0, teacher_mode="none").column("teacher").null_count == 3


def test_context_applied_says_which_empty_mask_the_context_made(samples):
    # Row 1 is cut (finish "length") and out of the loss, its context applied; row 2's context left it out.
    samples[1].loss_mask = [False] * len(samples[1].response_ids)
    samples[2] = dataclasses.replace(samples[2], loss_mask=[False] * len(samples[2].response_ids),
                                     teacher_prompt_ids=samples[2].prompt_ids, context_applied=False)
    table = build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed")
    validate(table, vocab_size=VOCAB)
    assert _col(table, "context_applied") == [True, True, False]
    _raises(_set(table, "context_applied", [True, None, False]), "column 'context_applied' row 1: null value")
    untaught = [dataclasses.replace(s, teacher_topk_ids=None, teacher_topk_logprobs=None, teacher_token_logprobs=None)
                for s in samples]
    assert build_batch(untaught, k=K, temperature=1.0, teacher_mode="none").column("context_applied").null_count == 3
    _raises(_set(build_batch(untaught, k=K, temperature=1.0, teacher_mode="none"), "context_applied",
                 [True, True, True]), "column 'context_applied' must be null when opsd.teacher_mode=none")


def test_a_version_3_batch_must_hold_the_stop_column(table):
    _raises(table.drop_columns(["teacher_stop_logprobs"]), "batch lacks column 'teacher_stop_logprobs'")


def test_the_teacher_stop_column_holds_each_row_or_null_where_it_was_not_measured(samples):
    rng = np.random.default_rng(5)
    stops = [np.log(rng.random(len(s.response_ids))).astype(np.float32) for s in samples]
    for s, lp in zip(samples, stops):
        s.teacher_stop_logprobs = lp
    samples[1].teacher_stop_logprobs = None  # e.g. scored by an engine that sees only the top-k
    table = build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed")
    validate(table, vocab_size=VOCAB)
    got = _col(table, "teacher_stop_logprobs")
    assert got[1] is None
    for i in (0, 2):
        np.testing.assert_array_equal(np.float32(got[i]), stops[i])
    # No sample measured: the whole column is null, and valid.
    for s in samples:
        s.teacher_stop_logprobs = None
    assert build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed").column("teacher_stop_logprobs").null_count == 3
    # A measured row is checked as every log-probability column is: its length, no NaN, <= 0.
    bad = [None if v is None else list(v) for v in got]
    bad[0] = bad[0][:-1]
    _raises(_set(table, "teacher_stop_logprobs", bad), "column 'teacher_stop_logprobs' row 0: 3 entries")
    bad = [None if v is None else list(v) for v in got]
    bad[2][1] = 0.25
    _raises(_set(table, "teacher_stop_logprobs", bad), "column 'teacher_stop_logprobs' row 2: logprob 0.25")
    bad = [None if v is None else list(v) for v in got]
    bad[2][1] = None
    _raises(_set(table, "teacher_stop_logprobs", bad), "column 'teacher_stop_logprobs' row 2: null value")
    # Without a teacher the column is null.
    _raises(_set(build_batch([_sample(0, 3, teacher=False)], k=K, temperature=1.0, teacher_mode="none"),
                 "teacher_stop_logprobs", [[-1.0, -1.0, -1.0]]),
            "column 'teacher_stop_logprobs' must be null when opsd.teacher_mode=none")


def test_an_ungraded_batch_has_null_rewards_and_a_graded_one_none():
    samples = [_sample(0, 3), _sample(1, 2)]
    for s in samples:
        s.reward = None
    table = build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed")
    validate(table, vocab_size=VOCAB)
    assert batch_meta(table)["opsd.rewards"] == "none" and table.column("reward").null_count == 2
    _raises(_set(table, "reward", [0.0, 1.0]), "column 'reward' must be null when opsd.rewards=none")
    samples[0].reward = 1.0
    with pytest.raises(ValueError, match="reward is missing for some rows"):
        build_batch(samples, k=K, temperature=1.0, teacher_mode="fixed")

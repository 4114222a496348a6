import json

import pytest

from opsd.data import DataError, EpochSampler, Problem, load_problems

ROWS = [
    {"problem": "What is 1+1?", "solution": "1+1 = \\boxed{2}", "answer": "2"},
    {"problem": "Half of 1?", "solution": "It is \\boxed{\\frac{1}{2}}.", "answer": "\\frac{1}{2}"},
    {"problem": "3*3?", "solution": "3*3 = \\boxed{9}", "answer": "9"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def expected(source):
    return [
        Problem(f"{source}:{i}", r["problem"], r["solution"], r["answer"])
        for i, r in enumerate(ROWS)
    ]


def test_jsonl_parquet_and_saved_dataset_load_the_same_problems(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "toy.jsonl", ROWS)
    # blank lines between rows are allowed and do not shift row ids
    jsonl.write_text(jsonl.read_text().replace("\n", "\n\n", 1) + "\n   \n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "toy.parquet")
    columns = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "toy"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(columns), "test": datasets.Dataset.from_dict(columns)}
    ).save_to_disk(str(tmp_path / "toydict"))

    assert load_problems(jsonl) == expected("toy")
    assert load_problems(tmp_path / "toy.parquet") == expected("toy")
    assert load_problems(tmp_path / "toy") == expected("toy")
    assert load_problems(tmp_path / "toydict") == expected("toydict/train")
    assert load_problems(f"{tmp_path / 'toydict'}::test") == expected("toydict/test")


def test_answer_taken_from_the_last_box_of_the_solution(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"problem": "p", "solution": "try \\boxed{1}; no, \\boxed{\\frac{3}{4}} "}],
    )
    assert load_problems(path)[0].answer == "\\frac{3}{4}"


def test_explicit_answer_wins_over_the_box(tmp_path):
    row = {"problem": "p", "solution": "\\boxed{1}", "answer": " 2 "}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    assert load_problems(path)[0].answer == "2"


def test_custom_column_names_and_id_column(tmp_path):
    rows = [
        {"question": "q1", "reasoning": "r1 \\boxed{5}", "id": "a-17"},
        {"question": "q2", "reasoning": "r2", "final": "7", "id": 18},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    got = load_problems(
        path, problem_key="question", solution_key="reasoning", answer_key="final", id_key="id"
    )
    assert got == [
        Problem(uid="a-17", problem="q1", solution="r1 \\boxed{5}", answer="5"),
        Problem(uid="18", problem="q2", solution="r2", answer="7"),
    ]


def test_eval_sets_may_omit_the_solution(tmp_path):
    path = write_jsonl(
        tmp_path / "eval.jsonl",
        [{"problem": "p1", "answer": "3"}, {"problem": "p2", "answer": "4", "solution": ""}],
    )
    got = load_problems(path, require_solution=False)
    assert [(p.problem, p.solution, p.answer) for p in got] == [("p1", "", "3"), ("p2", "", "4")]
    with pytest.raises(DataError, match=r"eval\.jsonl, line 1: key 'solution' is missing"):
        load_problems(path)


GOOD = json.dumps(ROWS[0]).encode()


def line(**fields):
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (line(solution="\\boxed{1}", answer="1"), r"key 'problem' is missing"),
        (line(problem=None, solution="s", answer="1"), r"key 'problem' is null"),
        (line(problem="  \t", solution="s", answer="1"), r"key 'problem' is empty"),
        (line(problem="p", solution="s", answer=""), r"key 'answer' is empty"),
        (line(problem="p", solution="s", answer=3), r"key 'answer' must be a string, got int"),
        (line(problem=["p"], solution="s"), r"key 'problem' must be a string, got list"),
        (b'{"problem": "p", "solution": "s",', r"invalid JSON"),
        (json.dumps([1, 2]).encode(), r"expected a JSON object, got list"),
        (b'{"problem": "caf\xe9", "answer": "1"}', r"not UTF-8 \(byte 0xe9 at column 17\)"),
        (line(problem="p", solution="no box here"), r"no answer: key 'answer' is absent"),
        (line(problem="p", solution="cut \\boxed{\\frac{1}{2"), r"no answer"),
    ],
)
def test_bad_jsonl_rows_name_file_line_and_key(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    # the bad row sits on line 4, after a blank line, so the line number is not a row count
    path.write_bytes(GOOD + b"\n" + GOOD + b"\n\n" + bad_line + b"\n" + GOOD + b"\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 4: " + message):
        load_problems(path)


def test_bad_parquet_row_names_file_row_and_key(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r) for r in ROWS]
    rows[1]["problem"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet, row 2: key 'problem' is null"):
        load_problems(tmp_path / "bad.parquet")


def test_duplicate_ids_are_rejected(tmp_path):
    rows = [dict(ROWS[0], id=1), dict(ROWS[1], id=2), dict(ROWS[2], id=1)]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(DataError, match=r"dup\.jsonl, line 3: id '1' \(key 'id'\) repeats line 1"):
        load_problems(path, id_key="id")


def test_ids_are_optional_and_stable(tmp_path):
    # The README's minimal dataset: problem and solution, no id column.
    rows = [{"problem": r["problem"], "solution": r["solution"]} for r in ROWS]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    first = load_problems(path, id_key="id")
    assert [p.uid for p in first] == [f"plain:{i}" for i in range(len(rows))]
    assert [p.uid for p in load_problems(path, id_key="id")] == [p.uid for p in first]  # the same every run
    assert [p.uid for p in load_problems(path)] == [p.uid for p in first]


def test_an_id_column_must_cover_every_row(tmp_path):
    rows = [dict(ROWS[0], id="a"), {k: v for k, v in ROWS[1].items() if k != "id"}]
    path = write_jsonl(tmp_path / "half.jsonl", rows)
    with pytest.raises(DataError, match=r"half\.jsonl, line 2: key 'id' is missing"):
        load_problems(path, id_key="id")


def test_missing_file_names_path_and_accepted_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*\.jsonl.*\.parquet.*save_to_disk"):
        load_problems(tmp_path / "nope.jsonl")


def test_unknown_suffix_and_empty_file(tmp_path):
    (tmp_path / "p.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match=r"p\.csv: unknown format '\.csv'; expected .*\.jsonl"):
        load_problems(tmp_path / "p.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_problems(tmp_path / "empty.jsonl")


def test_dataset_dict_without_the_split(tmp_path):
    import datasets

    split = datasets.Dataset.from_dict({"problem": ["p"], "answer": ["1"]})
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"no split 'train'; it has \['test'\]"):
        load_problems(tmp_path / "d", require_solution=False)
    assert load_problems(f"{tmp_path / 'd'}::test", require_solution=False)[0].uid == "d/test:0"


# --- EpochSampler -----------------------------------------------------------------------------


def draw(sampler, batch_sizes):
    return [sampler.next_batch(b) for b in batch_sizes]


def test_same_seed_same_order_and_epochs_differ():
    a = EpochSampler(50, seed=3)
    b = EpochSampler(50, seed=3)
    assert draw(a, [7] * 30) == draw(b, [7] * 30)
    assert a.epoch_indices(0) != a.epoch_indices(1)
    assert a.epoch_indices(0) != EpochSampler(50, seed=4).epoch_indices(0)
    assert a.epoch_indices(0) != list(range(50))  # actually shuffled
    assert EpochSampler(5, seed=3, shuffle=False).next_batch(7) == [0, 1, 2, 3, 4, 0, 1]


def test_every_index_once_per_epoch_across_batch_boundaries():
    sampler = EpochSampler(10, seed=0)
    stream = sum(draw(sampler, [3] * 10), [])  # 30 indices: three whole epochs
    for epoch in range(3):
        chunk = stream[10 * epoch : 10 * (epoch + 1)]
        assert chunk == sampler.epoch_indices(epoch)
        assert sorted(chunk) == list(range(10))
    assert (sampler.epoch, sampler.position) == (3, 0)


def test_epoch_and_position_track_the_stream():
    sampler = EpochSampler(10, seed=0)
    sampler.next_batch(4)
    assert (sampler.epoch, sampler.position) == (0, 4)
    sampler.next_batch(8)  # 6 from epoch 0, 2 from epoch 1
    assert (sampler.epoch, sampler.position) == (1, 2)


def test_drop_last_skips_the_short_tail():
    sampler = EpochSampler(10, seed=1, drop_last=True)
    batches = draw(sampler, [4, 4, 4])
    assert batches[0] + batches[1] == sampler.epoch_indices(0)[:8]
    assert batches[2] == sampler.epoch_indices(1)[:4]
    with pytest.raises(ValueError, match="exceeds"):
        sampler.next_batch(11)


# 103 indices: five epochs of 20 and a bit
SIZES = [4, 6, 3, 7, 5, 2, 8, 1, 9, 4, 4, 6, 3, 5, 7, 2, 8, 6, 4, 9]


# After 3 batches: 13 drawn (mid-epoch); 4: 20 (exactly at the end of epoch 0);
# 5: 25 (the last batch crossed into epoch 1); 11: 53 (epoch 2).
@pytest.mark.parametrize(
    ("stop_after", "epoch", "position"), [(3, 0, 13), (4, 1, 0), (5, 1, 5), (11, 2, 13)]
)
def test_restore_continues_like_an_uninterrupted_run(stop_after, epoch, position):
    reference = draw(EpochSampler(20, seed=11), SIZES)

    first = EpochSampler(20, seed=11)
    head = draw(first, SIZES[:stop_after])
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds
    assert (state["epoch"], state["position"]) == (epoch, position)
    resumed = EpochSampler(20, seed=11)
    resumed.load_state_dict(state)
    assert head + draw(resumed, SIZES[stop_after:]) == reference


def test_state_dict_is_plain_json_and_round_trips():
    sampler = EpochSampler(10, seed=5)
    sampler.next_batch(13)
    state = sampler.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state == {"num_items": 10, "seed": 5, "shuffle": True, "epoch": 1, "position": 3}


@pytest.mark.parametrize(("key", "value"), [("num_items", 11), ("seed", 6), ("shuffle", False)])
def test_restore_refuses_a_different_sampler(key, value):
    state = EpochSampler(10, seed=5).state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=key):
        EpochSampler(10, seed=5).load_state_dict(state)

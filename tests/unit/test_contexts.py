"""opsd/contexts/: what each built-in teacher context makes the teacher read, checked on the token
ids it produces, against the teacher prompt written out here by hand (the run's template with the
hint that context must put into it)."""

from __future__ import annotations

import pytest

from opsd.assets.tiny import build_tokenizer
from opsd.config import PromptConfig, load_config
from opsd.contexts import CONTEXTS, context
from opsd.contexts.base import PRIMARY, ContextInput, DatasetView, GroupSample
from opsd.data import Problem
from opsd.errors import ConfigError
from opsd.objectives import scored_contexts
from opsd.prompts import PromptBuilder

SYSTEM = "Reference solution:\n{solution}"
PROBLEMS = [
    Problem("p0", "Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7. \\boxed{7}", "7"),
    Problem("p1", "Ann has 10 pens and gives 2 away. How many?", "10 - 2 = 8. \\boxed{8}", "8"),
    Problem("p2", "Tom has 3 apples and buys 4 more. How many?", "Again 7. \\boxed{7}", "7"),  # same text as p0
    Problem("p3", "What is 6 times 7?", "6 * 7 = 42. \\boxed{42}", "42"),
]


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(build_tokenizer(), PromptConfig(teacher_system=SYSTEM), max_model_len=512, max_new_tokens=64)


def cfg(*overrides: str):
    return load_config(None, ["prompt.teacher_system=" + SYSTEM, *overrides])


def expected_ids(builder: PromptBuilder, problem: str, hint: str | None) -> list[int]:
    """The teacher prompt as text, written out: a system message with the hint, then the student's
    own turn; None: the student's prompt itself."""
    tok = builder.tokenizer
    student = tok.apply_chat_template(builder.student_messages(problem), tokenize=False, add_generation_prompt=True,
                                      enable_thinking=False)
    text = student if hint is None else f"<|im_start|>system\nReference solution:\n{hint}<|im_end|>\n{student}"
    return list(tok(text, add_special_tokens=False)["input_ids"])


def built(builder, c, name: str, problem: Problem, group=(), index=None, seed=0, view=None) -> dict:
    item = ContextInput(problem, tuple(group), index, (view or DatasetView(PROBLEMS, 0)).other(problem.uid), seed)
    return {k: None if v is None else builder.teacher_context_ids(v)
            for k, v in context(name).build(c, item, builder.templates()).items()}


def sample(text: str, answer: str | None, reward: float | None, tokens: int) -> GroupSample:
    return GroupSample(text, answer, reward, tokens)


def test_every_built_in_context_is_registered_and_says_what_it_needs():
    assert set(CONTEXTS.names()) == {"solution", "answer", "none", "other_problem", "majority", "contrastive"}
    c = cfg()
    assert {n: set(context(n).needs(c)) for n in CONTEXTS} == {
        "solution": {"solution"}, "answer": {"answer"}, "none": set(), "other_problem": {"solution"},
        "majority": set(), "contrastive": {"solution", "answer"}}
    assert [n for n in CONTEXTS if context(n).uses_samples] == ["majority", "contrastive"]


def test_solution_is_the_reference_solution_as_before(builder):
    p = PROBLEMS[0]
    ids = built(builder, cfg(), "solution", p)[PRIMARY]
    assert ids == expected_ids(builder, p.problem, p.solution) == builder.teacher_ids(p.problem, p.solution)


def test_answer_is_the_final_answer_alone(builder):
    p = PROBLEMS[3]
    assert built(builder, cfg(), "answer", p)[PRIMARY] == expected_ids(builder, p.problem, "The final answer is \\boxed{42}.")


def test_none_is_the_students_own_prompt(builder):
    p = PROBLEMS[1]
    assert built(builder, cfg(), "none", p)[PRIMARY] == expected_ids(builder, p.problem, None) == builder.student_ids(p.problem)


def test_other_problem_is_a_fixed_donor_of_another_text_chosen_by_the_seed(builder):
    view = DatasetView(PROBLEMS, seed=3)
    for p in PROBLEMS:
        donor = view.other(p.uid)(0)
        assert donor.uid != p.uid and donor.problem != p.problem  # p0 and p2 never lend to each other
        hint = ("The following worked example is of a different problem, not of this one; it shows how such problems "
                f"are solved, and its answer is not this problem's answer.\nExample problem: {donor.problem}\n"
                f"Example solution: {donor.solution}")
        assert built(builder, cfg(), "other_problem", p, view=view)[PRIMARY] == expected_ids(builder, p.problem, hint)
        # The same donor from the same seed, whatever builds the view.
        assert DatasetView(PROBLEMS, seed=3).other(p.uid)(0) == donor
    donors = {s: tuple(DatasetView(PROBLEMS, seed=s).other(p.uid)(0).uid for p in PROBLEMS) for s in range(6)}
    assert len(set(donors.values())) > 1  # the seed decides


def test_majority_teaches_the_shortest_agreeing_sample_and_says_nothing_without_agreement(builder):
    p = Problem("q", "How many?", "", None)  # a dataset with no solution and no answer
    group = [sample("so \\boxed{5}.", "5", None, 9), sample("thus \\boxed{ 5 }", " 5 ", None, 4),
             sample("maybe \\boxed{7}", "7", None, 3), sample("I do not know", None, None, 5)]
    ids = built(builder, cfg("rollout.n=4"), "majority", p, group)
    # "5" holds 2 of 4 samples (0.5 >= teacher.min_agreement); its shortest sample is the second.
    assert ids == {PRIMARY: expected_ids(builder, p.problem, "thus \\boxed{ 5 }")}
    answer_only = built(builder, cfg("rollout.n=4", "teacher.majority_hint=answer"), "majority", p, group)
    assert answer_only[PRIMARY] == expected_ids(builder, p.problem, "The final answer is \\boxed{5}.")
    # Below the agreement threshold, or with no answer at all, the prompt is left out.
    assert built(builder, cfg("rollout.n=4", "teacher.min_agreement=0.75"), "majority", p, group) == {PRIMARY: None}
    assert built(builder, cfg("rollout.n=4"), "majority", p, [sample("hm", None, None, 2)] * 4) == {PRIMARY: None}


def test_a_majority_tie_is_broken_by_the_seed_the_same_way_every_time(builder):
    import hashlib

    group = [sample("\\boxed{1}", "1", None, 3), sample("\\boxed{2}", "2", None, 3)]
    picks: dict[tuple[str, int], str] = {}
    for uid in ("q", "r"):
        p = Problem(uid, "How many?", "", None)
        for seed in range(12):
            ids = built(builder, cfg("rollout.n=2"), "majority", p, group, seed=seed)[PRIMARY]
            # Neither the order the samples came back in nor a rebuild changes the pick.
            assert ids == built(builder, cfg("rollout.n=2"), "majority", p, group[::-1], seed=seed)[PRIMARY]
            # The rule of opsd/contexts/majority.py: of the tied answers in sorted order, the one a
            # hash of the seed and the prompt's id names (the same in every process and on resume).
            digest = hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest()
            want = ["1", "2"][int.from_bytes(digest, "little") % 2]
            assert ids == expected_ids(builder, p.problem, f"\\boxed{{{want}}}"), (uid, seed)
            picks[uid, seed] = want
    assert set(picks.values()) == {"1", "2"}  # the seed decides...
    assert any(picks["q", s] != picks["r", s] for s in range(12))  # ...and so does the prompt


def test_contrastive_makes_the_correct_context_and_wrong_ones_from_the_wrong_siblings(builder):
    p = PROBLEMS[3]
    group = [sample("6*7 is 42 \\boxed{42}", "42", 1.0, 9), sample("it is \\boxed{48}", "48", 0.0, 5),
             sample("no answer here", None, 0.0, 3), sample("surely \\boxed{36}", "36", 0.0, 4)]
    c = cfg("algo=contrastive", "rollout.n=4", "teacher.context=contrastive", "teacher.wrong_contexts=3")
    correct = expected_ids(builder, p.problem, "6 * 7 = 42. \\boxed{42}\n\nCorrect final answer: \\boxed{42}")
    wrong = {"48": expected_ids(builder, p.problem, "it is \\boxed{48}\n\nCorrect final answer: \\boxed{48}"),
             "36": expected_ids(builder, p.problem, "surely \\boxed{36}\n\nCorrect final answer: \\boxed{36}")}
    for index in range(4):
        got = built(builder, c, "contrastive", p, group, index=index, seed=11)
        assert list(got) == [PRIMARY, "wrong_0", "wrong_1", "wrong_2"] and got[PRIMARY] == correct
        # The wrong pool: the siblings graded wrong that wrote an answer, never the sample itself.
        pool = {a: ids for a, ids in wrong.items() if group[index].answer != a}
        present = [ids for ids in (got["wrong_0"], got["wrong_1"], got["wrong_2"]) if ids is not None]
        assert sorted(present) == sorted(pool.values()) and got["wrong_2"] is None
        assert got == built(builder, c, "contrastive", p, group, index=index, seed=11)  # deterministic
    # One wrong context of two candidates: which one is the seed's choice.
    c1 = cfg("algo=contrastive", "rollout.n=4", "teacher.context=contrastive", "teacher.wrong_contexts=1")
    chosen = {tuple(built(builder, c1, "contrastive", p, group, index=0, seed=s)["wrong_0"]) for s in range(12)}
    assert chosen == {tuple(ids) for ids in wrong.values()}


def test_contrastive_can_take_its_wrong_hints_from_other_problems(builder):
    view = DatasetView(PROBLEMS, seed=0)
    p = PROBLEMS[1]
    c = cfg("rollout.n=1", "teacher.context=contrastive", "teacher.wrong_contexts=2", "teacher.wrong_from=other_problems")
    got = built(builder, c, "contrastive", p, index=0, view=view)
    for i in range(2):
        o = view.other(p.uid)(i)
        assert got[f"wrong_{i}"] == expected_ids(builder, p.problem, f"{o.solution}\n\nCorrect final answer: \\boxed{{{o.answer}}}")


@pytest.mark.parametrize("overrides, key", [
    (["algo=contrastive", "rollout.n=4"], "teacher.context=contrastive"),
    (["algo=kd", "teacher.context=majority", "rollout.n=4"], "built from the student's samples"),
    (["teacher.context=contrastive", "teacher.wrong_contexts=0", "rollout.n=4"], "teacher.wrong_contexts"),
    (["teacher.context=telepathy"], "'teacher.context' = 'telepathy'"),
])
def test_a_context_that_cannot_run_is_refused_naming_why(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("'", "'")):
        cfg(*overrides)


def test_a_majority_of_one_sample_is_a_warning_not_an_error():
    from opsd.config import notes

    assert any("majority of one sample is that sample" in n for n in notes(cfg("teacher.context=majority")))
    assert not any("majority" in n for n in notes(cfg("teacher.context=majority", "rollout.n=4")))


def test_the_scorer_scores_the_contexts_the_objective_reads_with_the_targets_it_needs():
    assert scored_contexts(cfg()) == {PRIMARY: "topk"}
    assert scored_contexts(cfg("loss.objective=sampled_token")) == {PRIMARY: "token"}
    assert scored_contexts(cfg("algo=grpo", "rollout.n=4")) == {}
    assert scored_contexts(cfg("algo=grpo", "rollout.n=4", "loss.kl_coef=0.1")) == {PRIMARY: "token"}
    assert scored_contexts(cfg("algo=sft")) == {}
    # OPSD under the contrastive context reads only the correct one; the contrastive objective all.
    assert scored_contexts(cfg("teacher.context=contrastive", "rollout.n=4", "teacher.wrong_contexts=2")) == {
        PRIMARY: "topk"}
    assert scored_contexts(cfg("algo=contrastive", "teacher.context=contrastive", "rollout.n=4",
                               "teacher.wrong_contexts=2")) == {PRIMARY: "token", "wrong_0": "token", "wrong_1": "token"}

import math

import pytest

from opsd.evaluation import Graded, grade, majority_correct, summarize

# Four problems, four responses each. Hand-computed per problem:
#                         correct        avg   pass  maj   format
#   p1 plain + no box     T F T -        2/4   1     1     3/4
#   p2 equivalent forms   T T F F        2/4   1     0     4/4  ("3" has 2 votes; 1/2's votes split)
#   p3 no boxed answer    - - - -        0     0     0     0/4  (one box never closes)
#   p4 tie 2:2            F T T F        2/4   1     0     4/4  (tie: "12" was seen first)
PROBLEMS = [
    ("p1", "42", [
        "17 + 25 = 42, so the answer is \\boxed{42}.",
        "I think it is \\boxed{41}",
        "First \\boxed{40}, no wait: \\boxed{42}",  # the last box counts
        "The answer is 42.",  # no box: no answer
    ]),
    ("p2", "1/2", [
        "\\boxed{\\frac{1}{2}}",
        "So the probability is \\boxed{0.5}.",
        "\\boxed{3}",
        "\\boxed{ 3 }",
    ]),
    ("p3", "7", [
        "It is seven.",
        "7",
        "The answer is \\boxed{7",  # cut off mid-answer
        "",
    ]),
    ("p4", "10", [
        "\\boxed{12}",
        "\\boxed{10}",
        "\\boxed{10}",
        "\\boxed{12}",
    ]),
]


@pytest.fixture(scope="module")
def graded():
    return [grade(uid, responses, gold) for uid, gold, responses in PROBLEMS]


def test_grade_extracts_and_checks_each_response(graded):
    p1, p2, p3, p4 = graded
    assert p1.uid == "p1" and p1.gold == "42"
    assert p1.answers == ["42", "41", "42", None]
    assert p1.correct == [True, False, True, False]
    assert p2.answers == ["\\frac{1}{2}", "0.5", "3", " 3 "]
    assert p2.correct == [True, True, False, False]
    assert p3.answers == [None, None, None, None]
    assert p3.correct == [False] * 4
    assert p4.correct == [False, True, True, False]


def test_majority_per_problem(graded):
    assert [majority_correct(g) for g in graded] == [True, False, False, False]


def test_summary_matches_hand_computed_values(graded):
    s = summarize(graded)
    assert s["problems"] == 4 and s["n"] == 4
    assert s["avg@4"] == pytest.approx((0.5 + 0.5 + 0.0 + 0.5) / 4)
    assert s["pass@4"] == pytest.approx(3 / 4)
    assert s["maj@4"] == pytest.approx(1 / 4)
    assert s["format_rate"] == pytest.approx((3 / 4 + 1 + 0 + 1) / 4)
    assert set(s) == {"problems", "n", "avg@4", "pass@4", "maj@4", "format_rate", "avg@4_se", "pass@4_se", "maj@4_se"}
    # Standard errors over the 4 problems, by hand: per-problem scores, their sample standard
    # deviation, over sqrt(4).
    for key, scores in (("avg@4", [0.5, 0.5, 0.0, 0.5]), ("pass@4", [1, 1, 0, 1]), ("maj@4", [1, 0, 0, 0])):
        mean = sum(scores) / 4
        assert s[f"{key}_se"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in scores) / 3 / 4))
    assert s["pass@4_se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4 * 4 / 3))  # sqrt(p(1-p)/m), m/(m-1)


def test_single_sample_metrics_coincide(graded):
    # With n = 1, avg, pass and maj are all plain accuracy.
    firsts = [grade(uid, responses[:1], gold) for uid, gold, responses in PROBLEMS]
    s = summarize(firsts)
    assert s["n"] == 1
    assert s["avg@1"] == s["pass@1"] == s["maj@1"] == pytest.approx(2 / 4)  # p1 and p2 right
    assert s["format_rate"] == pytest.approx(3 / 4)  # p3 has no box


def test_tie_goes_to_the_answer_seen_first():
    right_first = Graded("t", ["10", "12", "12", "10"], [True, False, False, True], "10")
    wrong_first = Graded("t", ["12", "10", "10", "12"], [False, True, True, False], "10")
    assert majority_correct(right_first) is True
    assert majority_correct(wrong_first) is False


def test_missing_answers_do_not_vote():
    # Two responses without an answer outnumber nothing: the single real answer wins.
    g = Graded("m", [None, None, "5"], [False, False, True], "5")
    assert majority_correct(g) is True
    assert majority_correct(Graded("m", [None, None], [False, False], "5")) is False


def test_votes_ignore_whitespace_but_not_equivalence():
    # "8" written three ways is three votes for 8, beating two votes for 7.
    g = Graded("w", ["7", "7", "8", "\n8", "8\t"], [True, True, False, False, False], "7")
    assert majority_correct(g) is False
    # Equivalent spellings are different votes: 0.5 and 1/2 (2 correct) lose to 3 + 3.
    g = Graded("e", ["0.5", "1/2", "3", "3 "], [True, True, False, False], "1/2")
    assert majority_correct(g) is False


def test_summarize_needs_problems():
    with pytest.raises(ValueError):
        summarize([])


def test_lenient_grading_reads_unboxed_numbers_and_the_format_rate_still_counts_boxes():
    lenient = [grade(uid, responses, gold, "lenient") for uid, gold, responses in PROBLEMS]
    assert lenient[0].answers == ["42", "41", "42", "42"]  # "The answer is 42." now counts
    assert lenient[2].answers == [None, "7", "7", None]  # the unclosed box falls back to its number
    assert lenient[3].answers == [g for g in grade("p4", PROBLEMS[3][2], "10").answers]  # boxes win
    m = summarize(lenient, [responses for _, _, responses in PROBLEMS])
    assert m["avg@4"] == pytest.approx((3 / 4 + 2 / 4 + 2 / 4 + 2 / 4) / 4)
    # Whatever graded them, the format rate is the share of responses with a closed box.
    assert m["format_rate"] == pytest.approx((3 / 4 + 1 + 0 + 1) / 4)

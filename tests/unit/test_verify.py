import threading
import time

import pytest

from opsd.verify import extract_answer, normalise_answer as _normalise, extract_boxed, is_equivalent, score_response

# (prediction, gold) pairs that mean the same number / object.
EQUIVALENT = [
    ("1/2", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac12", "1/2"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\tfrac{3}{4}", "3/4"),
    ("3/4", "3/4"),
    ("0.250", "0.25"),
    ("1/3", "0.333333"),  # math-verify rounds floats to 6 places before comparing
    ("1000", "1,000"),  # math-verify drops thousands separators...
    ("1000000", "1{,}000{,}000"),  # ...including LaTeX's `{,}`
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("\\sqrt{12}", "2\\sqrt{3}"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("1,2", "\\{1,2\\}"),  # a bare comma list is read as a set
    ("\\left(1,2\\right)", "(1,2)"),
    ("-3", "-3"),
    ("-\\frac{1}{2}", "-0.5"),
    ("$-7$", "-7"),
    ("10\\%", "0.1"),
    ("5", "x=5"),  # an equation in gold accepts its right-hand side
    ("5 \\text{ cm}", "5"),  # units are dropped
    ("\\$5", "5"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\text{(B)}", "B"),
    ("x^2+2x+1", "(x+1)^2"),
]

NOT_EQUIVALENT = [
    ("1/3", "0.33"),  # not equal after rounding to 6 places
    ("2", "3"),
    ("-3", "3"),
    ("(2,1)", "(1,2)"),  # ordered pairs / intervals keep their order
    ("12.5", "12,5"),  # a comma between digits groups thousands only in threes; else a set
    ("3.14159", "\\pi"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("\\sqrt{3}", "\\sqrt{2}"),
    ("\\{1,2,3\\}", "\\{1,2\\}"),
    ("x+1", "x-1"),
    ("", "5"),
]


@pytest.mark.parametrize(("pred", "gold"), EQUIVALENT)
def test_equivalent_pairs(pred, gold):
    assert is_equivalent(pred, gold) is True


@pytest.mark.parametrize(("pred", "gold"), NOT_EQUIVALENT)
def test_non_equivalent_pairs(pred, gold):
    assert is_equivalent(pred, gold) is False


def test_none_prediction_is_wrong():
    assert is_equivalent(None, "5") is False


def test_string_fallback_only_when_nothing_parses():
    # "}{" gives math-verify nothing to extract, so only the normalised text can match.
    assert is_equivalent("} {", "}{") is True
    assert is_equivalent("}{", "{}") is False
    # blanks on both sides are not a match
    assert is_equivalent(" ", "\\text{ }") is False


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("$\\dfrac{1}{2}$.", "\\frac{1}{2}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\text{Yes}", "yes"),
        ("\\textbf{\\text{(C)}}", "(c)"),
        ("1\\,000", "1000"),
        ("\\leftarrow", "\\leftarrow"),  # only the sizing commands go, not longer names
    ],
)
def test_normalise(raw, normal):
    assert _normalise(raw) == normal


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{a^{2}}}{2}}", "\\frac{\\sqrt{a^{2}}}{2}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are content
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
        ("\\boxed {7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\fbox{42}", "42"),
        ("\\boxed{1} and \\fbox{2}", "2"),
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{\\frac{1}{2}", None),  # cut off mid-answer
        ("\\boxed{1} then \\boxed{2", None),  # the last box is the answer, and it is broken
        ("ends with \\boxed", None),
        ("\\boxedtext{3}", None),
    ],
)
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


def test_score_response():
    assert score_response("The answer is $\\boxed{\\dfrac{1}{2}}$.", "0.5") == 1.0
    assert score_response("The answer is $\\boxed{2}$.", "3") == 0.0
    assert score_response("I think it is 0.5", "0.5") == 0.0  # no box, no credit


@pytest.mark.parametrize(
    "text, strict, lenient",
    [
        ("Tom has 10 + 25 = 35 marbles now.", None, "35"),
        ("The answer is \\boxed{42}. Check: 40 + 2.", "42", "42"),  # a box wins over later numbers
        ("\\boxed{} so 12", "", "12"),  # an empty box is no answer
        ("It costs 1,250 dollars.", None, "1250"),
        ("Half: 3/4 of it", None, "3/4"),
        ("It is -5 degrees.", None, "-5"),
        ("so 10-5=5", None, "5"),  # the minus of "10-5" is an operator
        ("It is 2.50.", None, "2.50"),  # the sentence's period is not part of the number
        ("no number at all", None, None),
    ],
)
def test_extract_answer(text, strict, lenient):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "lenient") == lenient


def test_score_response_lenient_and_bad_mode():
    assert score_response("Tom has 10 + 25 = 35 marbles.", "35", "lenient") == 1.0
    assert score_response("Tom has 10 + 25 = 35 marbles.", "35") == 0.0
    with pytest.raises(ValueError, match="'loose'.*strict"):
        extract_answer("1", "loose")


def _in_thread(fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # surfaced in the calling thread below
            out["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_works_off_the_main_thread():
    got = _in_thread(
        lambda: [
            is_equivalent("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"),
            is_equivalent("1/3", "0.33"),
            is_equivalent("\\{2,1\\}", "\\{1,2\\}"),
            score_response("\\boxed{1,000}", "1000"),
        ]
    )
    assert got == [True, False, True, 1.0]


# math-verify turns this into sympy's factorial(10**7); comparing it with 3 evaluates it, which
# takes far longer than any test will wait.
PATHOLOGICAL = ("10000000!", "3")


def test_pathological_input_is_cut_off_in_the_main_thread():
    start = time.monotonic()
    assert is_equivalent(*PATHOLOGICAL, timeout_s=1) is False
    # whole-second alarms per math-verify stage: a few seconds at most, not minutes
    assert time.monotonic() - start < 5


def test_pathological_input_is_cut_off_off_the_main_thread():
    def run():
        assert is_equivalent("1", "1.0")  # start the child first: its startup is not timed
        start = time.monotonic()
        result = is_equivalent(*PATHOLOGICAL, timeout_s=1)
        elapsed = time.monotonic() - start
        # the killed child is replaced and the next call is answered correctly
        after = is_equivalent("2/4", "1/2")
        return result, elapsed, after

    result, elapsed, after = _in_thread(run)
    assert result is False
    assert elapsed < 2.5
    assert after is True


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        is_equivalent("1", "1", timeout_s=0)

"""opsd/diagnostics.py against brute force: the repeated n-gram rate, the stop mass, the per-kind
stop statistics the learner sums and the metrics row divides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opsd.diagnostics import (LastPositions, counted_rows, mean_repeated_ngram_rate, repeated_ngram_rate,
                              stop_logmass, stop_metrics, stop_probability, stop_sums, stop_token_ids)


def _brute_rate(ids: list[int], n: int) -> float | None:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return None
    return sum(any(grams[j] == grams[i] for j in range(i)) for i in range(len(grams))) / len(grams)


def test_the_repeated_ngram_rate_equals_a_brute_force_count():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        # A small vocabulary makes repeats common; a large one, rare.
        ids = rng.integers(0, int(rng.choice([2, 3, 50])), int(rng.integers(0, 40))).tolist()
        for n in (1, 2, 4):
            want = _brute_rate(ids, n)
            got = repeated_ngram_rate(ids, n)
            assert (got is None) == (want is None)
            if want is not None:
                assert got == pytest.approx(want, abs=1e-12)
                checked += 1
    assert checked > 500


def test_the_repeated_ngram_rate_of_known_responses():
    assert repeated_ngram_rate([7] * 10) == pytest.approx(6 / 7)  # every 4-gram after the first repeats it
    assert repeated_ngram_rate(list(range(10))) == 0.0
    assert repeated_ngram_rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # only the last 4-gram
    assert repeated_ngram_rate([1, 2, 3]) is None


def test_the_mean_rate_leaves_out_responses_without_an_ngram():
    responses = [[7] * 10, [1, 2], list(range(8)), []]
    assert mean_repeated_ngram_rate(responses) == pytest.approx((6 / 7 + 0.0) / 2)
    assert mean_repeated_ngram_rate([[1], []]) is None


def test_the_stop_mass_equals_a_float64_softmax_sum():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (6, 40))
    for stop in ([5], [5, 17, 39], []):
        for temperature in (1.0, 0.7):
            got = stop_logmass(torch.tensor(logits, dtype=torch.float32), stop, temperature).numpy()
            p = np.exp(logits / temperature - np.max(logits / temperature, axis=-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            want = np.log(p[:, stop].sum(-1)) if stop else np.full(6, -np.inf)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_student_stop_probability_goes_through_the_head_and_takes_no_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    hidden = torch.randn(5, 8, requires_grad=True)
    got = stop_probability(hidden, head, [3, 29], temperature=1.0)
    assert not got.requires_grad
    want = torch.softmax((hidden @ head.weight.T).double(), dim=-1)[:, [3, 29]].sum(-1)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert stop_probability(hidden[:0], head, [3]).shape == (0,)


def test_the_stop_ids_are_every_eos_id_of_the_config_and_the_generation_config():
    from transformers import GenerationConfig, Qwen3Config

    model = torch.nn.Module()
    model.config = Qwen3Config(eos_token_id=2, vocab_size=64, hidden_size=8, num_hidden_layers=1,
                               num_attention_heads=1, num_key_value_heads=1, intermediate_size=8)
    model.generation_config = GenerationConfig(eos_token_id=[7, 2])
    assert stop_token_ids(model) == [2, 7]
    model.generation_config = GenerationConfig()
    assert stop_token_ids(model) == [2]


def _rows(rng: np.random.Generator):
    prompt_lens = rng.integers(2, 6, 12).tolist()
    responses = [rng.integers(0, 9, int(t)).tolist() for t in rng.integers(0, 6, 12)]
    reasons = rng.choice(["stop", "length", "abort"], 12).tolist()
    teacher = [None if rng.random() < 0.25 else np.log(rng.random(len(r))).tolist() for r in responses]
    counted = (rng.random(12) > 0.2).tolist()
    return prompt_lens, responses, reasons, teacher, counted


@pytest.mark.parametrize("seed", range(5))
def test_the_stop_statistics_equal_a_row_by_row_brute_force(seed):
    rng = np.random.default_rng(seed)
    prompt_lens, responses, reasons, teacher, counted = _rows(rng)
    last = LastPositions.of(prompt_lens, responses, reasons, teacher, counted=counted)
    student = rng.random(len(last.kinds))
    stats = stop_metrics(stop_sums(student, last))

    # Row by row, as the definition says: the last position of each counted row that ended by
    # stopping or by the length cap, the teacher where it was measured.
    kept = [j for j in range(12) if responses[j] and reasons[j] in ("stop", "length") and counted[j]]
    assert last.rows.tolist() == kept
    assert last.cols.tolist() == [prompt_lens[j] + len(responses[j]) - 2 for j in kept]
    for kind, reason in (("truncated", "length"), ("finished", "stop")):
        mine = [i for i, j in enumerate(kept) if reasons[j] == reason]
        pairs = [(math.exp(teacher[kept[i]][-1]), student[i]) for i in mine if teacher[kept[i]] is not None]
        want_student = sum(student[i] for i in mine) / len(mine) if mine else None
        want_teacher = sum(t for t, _ in pairs) / len(pairs) if pairs else None
        want_gap = sum(t - s for t, s in pairs) / len(pairs) if pairs else None
        for key, want in ((f"stop_prob_student_{kind}", want_student), (f"stop_prob_teacher_{kind}", want_teacher),
                          (f"stop_gap_{kind}", want_gap)):
            assert (stats[key] is None) == (want is None), key
            if want is not None:
                assert stats[key] == pytest.approx(want, rel=1e-9), key


def test_the_counted_rows_are_those_whose_context_applied_whatever_their_mask():
    # Rows: trained; cut and out of the loss (loss.mask_truncated); left out by its context; empty
    # response under loss.skip_first.
    masks = [[True, True], [False, False, False], [False, False], [False]]
    assert counted_rows(masks, [True, True, False, True]) == [True, True, False, True]
    # Without a teacher the column is null: no context can leave a row out.
    assert counted_rows(masks, [None] * 4) == [True] * 4
    # A batch of schema version < 5 lacks the column: only a loss token says the context applied.
    assert counted_rows(masks, None) == [True, False, False, False]


def test_the_stop_statistics_add_up_over_micro_batches():
    """The learner sums every statistic over micro-batches and ranks: the sums of two halves give
    the means of the whole."""
    rng = np.random.default_rng(7)
    prompt_lens, responses, reasons, teacher, counted = _rows(rng)
    whole = LastPositions.of(prompt_lens, responses, reasons, teacher, counted=counted)
    student = rng.random(len(whole.kinds))
    parts = [LastPositions.of(prompt_lens[a:b], responses[a:b], reasons[a:b], teacher[a:b], counted=counted[a:b])
             for a, b in ((0, 5), (5, 12))]
    split = len(parts[0].kinds)
    summed: dict[str, float] = {}
    for part, p in zip(parts, (student[:split], student[split:])):
        for k, v in stop_sums(p, part).items():
            summed[k] = summed.get(k, 0.0) + v
    got, want = stop_metrics(summed), stop_metrics(stop_sums(student, whole))
    assert got.keys() == want.keys() and any(v is not None for v in want.values())
    for key in want:
        assert (got[key] is None and want[key] is None) or got[key] == pytest.approx(want[key], rel=1e-12), key
    # Nothing measured: every mean is missing, not 0.
    assert set(stop_metrics({}).values()) == {None}

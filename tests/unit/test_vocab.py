"""opsd/vocab.py: whether another model can teach the student, on small tokenizers built here."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd.assets.tiny import IM_END, PAD_TOKEN, build_tokenizer
from opsd.vocab import OK, REFUSED, UNCHECKED, compare

# Two corpora of the same shape and other words: BPE learns other merges from each.
WORDS_A = [f"the sum of {i} and {i + 3} is {2 * i + 3}" for i in range(40)]
WORDS_B = [f"take away {i} from {i + 9} to leave nine" for i in range(40)]


def _save(directory: Path, tok, *, rows: int | None = None, stop: list[int] | None = None) -> str:
    """A model directory as far as the check reads one: the tokenizer, and optionally config.json
    (its vocab_size: the embedding rows) and generation_config.json (its stop ids)."""
    from transformers import GenerationConfig, Qwen3Config

    directory.mkdir(parents=True)
    tok.save_pretrained(directory)
    if rows is not None:
        Qwen3Config(vocab_size=rows, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                    num_key_value_heads=1, head_dim=32, intermediate_size=64).save_pretrained(directory)
    if stop is not None:
        GenerationConfig(eos_token_id=stop).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def small():
    return build_tokenizer(WORDS_A, vocab_size=300)


@pytest.fixture
def student(tmp_path, small) -> str:
    return _save(tmp_path / "student", small, rows=320, stop=[2, 0])


def test_the_same_tokenizer_is_ok(tmp_path, student, small):
    # Built again from the same corpus: another object, the same vocabulary and special tokens.
    teacher = _save(tmp_path / "teacher", build_tokenizer(WORDS_A, vocab_size=300), rows=320, stop=[0, 2])
    answer = compare(student, teacher, local_only=True)
    assert answer.verdict == OK, answer.line
    assert answer.line == f"the student's tokenizer ({len(small)} tokens, eos '<|im_end|>' (id 2), stop ids [0, 2])"


def test_another_vocabulary_is_refused_naming_both_sizes(tmp_path, student, small):
    other = build_tokenizer(WORDS_A, vocab_size=280)
    assert len(other) != len(small)
    answer = compare(student, _save(tmp_path / "teacher", other), local_only=True)
    assert answer.verdict == REFUSED
    assert f"the teacher's has {len(other):,} tokens, the student's {len(small):,}" in answer.line
    assert answer.line.startswith("config key 'teacher.model'")


def test_the_same_size_with_another_token_map_is_refused(tmp_path, student, small):
    other = build_tokenizer(WORDS_B, vocab_size=300)
    assert len(other) == len(small) and other.get_vocab() != small.get_vocab()
    answer = compare(student, _save(tmp_path / "teacher", other), local_only=True)
    assert answer.verdict == REFUSED
    assert "another token -> id map" in answer.line and "for the student" in answer.line


def test_another_eos_token_is_refused_naming_both(tmp_path, student):
    other = build_tokenizer(WORDS_A, vocab_size=300)
    other.eos_token = PAD_TOKEN  # the same vocabulary; the turn ends on another token
    answer = compare(student, _save(tmp_path / "teacher", other), local_only=True)
    assert answer.verdict == REFUSED
    assert f"the eos token: the student's '{IM_END}' (id 2), the teacher's '{PAD_TOKEN}' (id 0)" in answer.line


def test_other_stop_ids_are_refused(tmp_path, student):
    teacher = _save(tmp_path / "teacher", build_tokenizer(WORDS_A, vocab_size=300), stop=[2])
    answer = compare(student, teacher, local_only=True)
    assert answer.verdict == REFUSED
    assert "the stop ids (generation_config.json eos_token_id): the student's [0, 2], the teacher's [2]" in answer.line


def test_a_teacher_with_more_embedding_rows_is_refused_and_fewer_is_not(tmp_path, student):
    tok = build_tokenizer(WORDS_A, vocab_size=300)
    more = compare(student, _save(tmp_path / "more", tok, rows=384), local_only=True)
    assert more.verdict == REFUSED and "384 embedding rows" in more.line and "student's 320" in more.line
    # Fewer rows than the student's (but all of the tokenizer's): every id it names has a student logit.
    assert compare(student, _save(tmp_path / "fewer", tok, rows=300), local_only=True).verdict == OK


def test_a_hub_id_that_is_not_on_this_machine_cannot_be_checked_without_fetching(student, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: local_only must not reach the network
    answer = compare(student, "opsd-tests-no-such-org/no-such-model", local_only=True)
    assert answer.verdict == UNCHECKED
    assert answer.line.startswith("cannot check without fetching") and "no-such-model" in answer.line


def test_a_local_directory_whose_tokenizer_cannot_be_read_is_refused_not_left_unchecked(tmp_path, student):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("not a tokenizer")
    answer = compare(student, str(broken), local_only=True)
    assert answer.verdict == REFUSED
    assert answer.line.startswith(f"config key 'teacher.model' = '{broken}': cannot compare the teacher's tokenizer")

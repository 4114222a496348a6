import copy
import random

import numpy as np
import pytest
import torch

from opsd.config import PromptConfig
from opsd.data import Problem
from opsd.prompts import PromptBuilder, PromptTooLongError, response_loss_mask
from opsd.scoring import pad_right
from opsd.assets.tiny import IM_END, SPECIAL_TOKENS, build_tokenizer

GEN_PROMPT = "<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"

PROBLEM = "Compute 17 + 25."
SOLUTION = "Add the ones: 7 + 5 = 12, write 2 carry 1. Then 1 + 2 + 1 = 4. So \\boxed{42}."
RESPONSE_TEXT = "We add 17 and 25 to get 42, so the answer is \\boxed{42}."


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _builder(tok, **cfg) -> PromptBuilder:
    return PromptBuilder(tok, PromptConfig(**cfg), max_model_len=512, max_new_tokens=96)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_teacher_prompt_holds_the_solution_and_the_student_prompt_does_not(tok):
    b = _builder(tok)
    student = tok.decode(b.student_ids(PROBLEM))
    teacher = tok.decode(b.teacher_ids(PROBLEM, SOLUTION))
    assert PROBLEM in student and PROBLEM in teacher
    assert SOLUTION in teacher
    assert SOLUTION not in student and "reference solution" not in student
    assert PromptConfig().student_instruction in student
    assert PromptConfig().student_instruction in teacher
    # Problem before solution in the teacher's turn, as the template says.
    assert teacher.index(PROBLEM) < teacher.index(SOLUTION)


def test_a_teacher_system_message_keeps_the_students_very_user_turn(tok):
    b = _builder(tok, teacher_system="Reference solution of the next problem:\n{solution}")
    student = tok.decode(b.student_ids(PROBLEM))
    teacher = tok.decode(b.teacher_ids(PROBLEM, SOLUTION))
    system = f"<|im_start|>system\nReference solution of the next problem:\n{SOLUTION}<|im_end|>\n"
    # The teacher's prompt is the student's with a system message in front, nothing else.
    assert teacher == system + student
    assert b.teacher_messages(PROBLEM, SOLUTION)[1:] == b.student_messages(PROBLEM)


def test_prompt_ids_are_the_rendered_chat_template(tok):
    b = _builder(tok)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": f"{PROBLEM}\n{PromptConfig().student_instruction}"}],
        tokenize=True, add_generation_prompt=True, enable_thinking=False, return_dict=False,
    )
    assert b.student_ids(PROBLEM) == list(expected)
    assert all(isinstance(i, int) for i in b.student_ids(PROBLEM))


@pytest.mark.parametrize("student_thinking,teacher_thinking", [(False, False), (True, False), (False, True), (True, True)])
def test_thinking_flags_give_each_role_its_own_generation_prompt(tok, student_thinking, teacher_thinking):
    b = _builder(tok, student_thinking=student_thinking, teacher_thinking=teacher_thinking)
    gen_only = _encode(tok, GEN_PROMPT)
    gen_think = _encode(tok, GEN_PROMPT + EMPTY_THINK)
    for ids, thinking in ((b.student_ids(PROBLEM), student_thinking), (b.teacher_ids(PROBLEM, SOLUTION), teacher_thinking)):
        text = tok.decode(ids)
        if thinking:
            # The model opens <think> itself: the prompt stops right after the assistant header.
            assert ids[-len(gen_only):] == gen_only
            assert "<think>" not in text
        else:
            assert ids[-len(gen_think):] == gen_think
            assert text.endswith(GEN_PROMPT + EMPTY_THINK)
            assert text.count("<think>") == 1


def test_student_and_teacher_share_the_response_ids_byte_for_byte(tok):
    b = _builder(tok)
    s_ids = b.student_ids(PROBLEM)
    t_ids = b.teacher_ids(PROBLEM, SOLUTION)
    assert len(t_ids) > len(s_ids)
    response = _encode(tok, RESPONSE_TEXT) + [tok.eos_token_id]
    student_full = np.asarray(s_ids + response, dtype=np.int32)
    teacher_full = np.asarray(t_ids + response, dtype=np.int32)
    # Both contexts start with the prompt exactly as built, and the response slices are identical.
    assert student_full[: len(s_ids)].tolist() == s_ids
    assert teacher_full[: len(t_ids)].tolist() == t_ids
    assert student_full[len(s_ids):].tobytes() == teacher_full[len(t_ids):].tobytes() == np.asarray(response, np.int32).tobytes()


def test_decode_then_encode_can_change_a_response_so_we_never_reencode(tok):
    """Why prompts are ids: the sampled ids are not always the tokenizer's own encoding of their
    text (a sampler may emit a non-canonical split, and merges may span the prompt boundary), so
    encode(prompt_text + decode(response)) would move the teacher's targets to other positions."""
    b = _builder(tok)
    t_ids = b.teacher_ids(PROBLEM, SOLUTION)
    t_text = tok.decode(t_ids)
    assert _encode(tok, t_text) == t_ids  # the prompt itself round-trips ...
    rng = random.Random(0)
    changed_alone = changed_in_context = 0
    for _ in range(50):
        response = [rng.randrange(len(SPECIAL_TOKENS), len(tok)) for _ in range(6)]
        if _encode(tok, tok.decode(response)) != response:
            changed_alone += 1
        if _encode(tok, t_text + tok.decode(response)) != t_ids + response:
            changed_in_context += 1
    # ... but a response often does not, alone or appended to the teacher's text.
    assert changed_alone > 0
    assert changed_in_context > 0
    # A concrete non-canonical split: the characters of a merged token, one id each.
    vocab = tok.get_vocab()
    merged = next(t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
                  if i >= len(SPECIAL_TOKENS) and len(t) >= 2 and all(c in vocab for c in t))
    split = [vocab[c] for c in merged]
    assert tok.decode(split) == tok.decode([vocab[merged]])
    assert _encode(tok, tok.decode(split)) != split


def test_build_returns_pairs_with_uid_and_answer(tok):
    b = _builder(tok)
    problems = [Problem("toy:0", PROBLEM, SOLUTION, "42"), Problem("toy:1", "Compute 3 + 4.", "3 + 4 = \\boxed{7}", "7")]
    pairs, skipped = b.build(problems)
    assert skipped == []
    assert [p.uid for p in pairs] == ["toy:0", "toy:1"]
    assert [p.answer for p in pairs] == ["42", "7"]
    assert pairs[1].student_ids == b.student_ids("Compute 3 + 4.")
    assert pairs[1].teacher_ids == b.teacher_ids("Compute 3 + 4.", "3 + 4 = \\boxed{7}")


def _long_problems():
    return [
        Problem("toy:0", "Compute 1 + 1.", "1 + 1 = \\boxed{2}", "2"),
        Problem("toy:7", "Compute 2 + 2.", "2 + 2 = 4. " * 40 + "\\boxed{4}", "4"),  # long solution
        Problem("toy:9", "Compute 3 + 3.", "3 + 3 = \\boxed{6}", "6"),
    ]


def test_overlong_prompt_raises_naming_the_row(tok):
    b = _builder(tok, max_prompt_len=160)
    short = _long_problems()[0]
    assert len(b.teacher_ids(short.problem, short.solution)) <= 160  # the first row fits
    with pytest.raises(PromptTooLongError) as info:
        b.build(_long_problems(), source="data/toy/train.jsonl")
    msg = str(info.value)
    assert "row toy:7" in msg and "data/toy/train.jsonl" in msg
    assert "prompt.overlong" in msg and "teacher" in msg
    assert isinstance(info.value, ValueError)


def test_overlong_prompt_is_skipped_and_returned(tok):
    b = _builder(tok, max_prompt_len=160, overlong="skip")
    pairs, skipped = b.build(_long_problems())
    assert [p.uid for p in pairs] == ["toy:0", "toy:9"]
    assert skipped == ["toy:7"]


def test_prompt_limit_leaves_room_for_the_response(tok):
    # max_prompt_len is generous; the model length minus the new tokens is the binding limit.
    problem = _long_problems()[0]
    t_len = len(_builder(tok).teacher_ids(problem.problem, problem.solution))
    fits = PromptBuilder(tok, PromptConfig(max_prompt_len=10_000), max_model_len=t_len + 50, max_new_tokens=50)
    assert fits.build([problem])[1] == []
    tight = PromptBuilder(tok, PromptConfig(max_prompt_len=10_000), max_model_len=t_len + 49, max_new_tokens=50)
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        tight.build([problem])


def test_tokenizer_without_chat_template_is_rejected(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        _builder(bare)


# --- loss mask and padding ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pad_is_eos(tok):
    t = copy.deepcopy(tok)
    t.pad_token = t.eos_token
    assert t.pad_token_id == t.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert tok.pad_token_id != tok.eos_token_id  # the copy did not change the original
    return t


def test_eos_is_kept_in_the_loss_mask_when_pad_equals_eos(pad_is_eos):
    tok = pad_is_eos
    response = _encode(tok, RESPONSE_TEXT) + [tok.eos_token_id]
    mask = response_loss_mask(len(response))
    assert len(mask) == len(response)
    assert all(mask) and mask[-1] is True
    # The tempting id test would drop exactly the EOS the student must learn to emit.
    id_based = [i != tok.pad_token_id for i in response]
    assert id_based[-1] is False and mask != id_based


@pytest.mark.parametrize("n,skip,expected", [
    (4, 0, [True, True, True, True]),
    (4, 2, [False, False, True, True]),
    (2, 5, [False, False]),
    (0, 1, []),
])
def test_skip_first(n, skip, expected):
    assert response_loss_mask(n, skip_first=skip) == expected


def test_pad_right_attention_comes_from_lengths(pad_is_eos):
    tok = pad_is_eos
    eos = tok.eos_token_id
    rows = [[7, 8, eos], [9, eos, 10, 11, eos], [12]]
    ids, mask = pad_right(rows, tok.pad_token_id)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[7, 8, eos, eos, eos], [9, eos, 10, 11, eos], [12, eos, eos, eos, eos]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    # An EOS inside a row (ids equal to the pad id) keeps attention 1.
    assert ids[1, 1].item() == tok.pad_token_id and mask[1, 1].item() == 1
    assert mask.sum(1).tolist() == [len(r) for r in rows]


def test_pad_right_edge_cases():
    ids, mask = pad_right([], 0)
    assert ids.shape == (0, 0) and mask.shape == (0, 0)
    ids, mask = pad_right([[], [5]], 3)
    assert ids.tolist() == [[3], [5]] and mask.tolist() == [[0], [1]]



def _teacher_tokenizer(tok):
    """The same tokenizer with another model's chat template (teacher.model): a system turn first."""
    other = copy.deepcopy(tok)
    other.chat_template = "{{- '<|im_start|>system\\nTeacher.<|im_end|>\\n' }}" + tok.chat_template
    return other


def test_another_models_builder_renders_the_teacher_prompts_and_the_student_keeps_its_own(tok):
    b = _builder(tok)
    tb = _builder(_teacher_tokenizer(tok))
    problem = Problem("toy:0", PROBLEM, SOLUTION, "42")
    (pair,), skipped = b.build([problem], teacher_builder=tb)
    assert skipped == []
    assert pair.student_ids == b.student_ids(PROBLEM)
    assert pair.teacher_ids == tb.teacher_ids(PROBLEM, SOLUTION) != b.teacher_ids(PROBLEM, SOLUTION)
    assert tok.decode(pair.teacher_ids) == "<|im_start|>system\nTeacher.<|im_end|>\n" + tok.decode(
        b.teacher_ids(PROBLEM, SOLUTION))


def test_a_teacher_prompt_over_its_limit_names_the_teachers_template(tok):
    problem = Problem("toy:0", PROBLEM, SOLUTION, "42")
    b = _builder(tok)
    tb = _builder(_teacher_tokenizer(tok))
    # A limit the student's rendering of the teacher prompt fits and the teacher's (longer) does not.
    limit = len(b.teacher_ids(PROBLEM, SOLUTION))
    assert len(tb.teacher_ids(PROBLEM, SOLUTION)) > limit
    b, tb = _builder(tok, max_prompt_len=limit), _builder(_teacher_tokenizer(tok), max_prompt_len=limit)
    assert b.build([problem])[1] == []
    n = len(tb.teacher_ids(PROBLEM, SOLUTION))
    with pytest.raises(PromptTooLongError, match=rf"row toy:0: the teacher prompt \(teacher.model's chat template\) "
                                                 rf"has {n} tokens, more than {limit} "):
        b.build([problem], teacher_builder=tb)

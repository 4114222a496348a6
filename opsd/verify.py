"""Answer verification: pull the final answer out of a response and decide whether it matches gold.

Equivalence is math-verify's (sympy-backed: 1/2 == \\frac{1}{2} == 0.5, {1,2} == {2,1}). Its only
time limit is signal.alarm, which works in the main thread alone, while our callers are Ray actors
that may score from worker threads. So the limit is enforced in one of two ways:

- main thread: in-process, with math-verify's own alarms. signal.alarm counts whole seconds
  (`timeout_s` is rounded up) and math-verify arms it per stage (parse gold, parse prediction,
  each candidate pair), so one call may take a small multiple of `timeout_s` on pathological
  input. No child process, no IPC.
- any other thread: math-verify never runs in this process (so its signal timeouts are never
  touched here); a long-lived child interpreter runs it instead, and the caller waits at most
  `timeout_s` for the reply, killing the child when the reply is late. A thread cannot be
  interrupted and sympy can spin inside one C call (huge integers), so only a process gives a
  hard bound. The child is started on first use (not billed to the call), replaced after a kill,
  and serves one request at a time: concurrent callers queue on a lock before their clock starts.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time

__all__ = ["EXTRACTORS", "extract_answer", "extract_boxed", "extract_code", "extract_last_number", "is_equivalent", "normalise_answer",
           "score_response"]

# `\boxed` and `\fbox`, but not a longer command that starts the same way (`\boxedfoo`).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")

# How long a freshly started child may take to import sympy and math-verify on a busy machine;
# not part of any call's answer budget.
_STARTUP_TIMEOUT_S = 120.0


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`) in `text`.

    Braces are counted, so nested groups such as `\\frac{1}{2}` stay whole; escaped braces
    (`\\{`, `\\}`) are content, not grouping. Returns None when there is no box or the last
    box never closes (a response cut off mid-answer).
    """
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None
    n = len(text)
    i = last.end()
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        depth = 0
        j = i
        while j < n:
            c = text[j]
            if c == "\\":
                j += 2  # an escaped character never opens or closes a group
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None
    # `\boxed 5`: TeX takes the next token as the argument. The space is required so that a
    # bare `\boxed` at the end of a truncated response is not read as an answer.
    if i == last.end():
        return None
    m = re.match(r"[^\s$]+", text[i:])
    return m.group(0) if m else None


# A number as people write one in a sentence: "-12", "3.5", "1,250", "3/4". A trailing period
# ends the sentence, not the number.
# A minus right after a digit or letter is an operator ("10-5"), not a sign.
_NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number written in `text` (commas of thousands dropped), or None."""
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    return found[-1].rstrip(",").replace(",", "")


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """The final answer of a response under one of :data:`EXTRACTORS`.

    ``strict``: the last ``\\boxed{}`` (None without one). ``lenient``: the last ``\\boxed{}``
    when there is a non-empty one, else the last number in the response, as GSM8K evaluations'
    "flexible" extraction does: a model that computes right but never boxes is still measured.
    """
    if mode not in EXTRACTORS:
        raise ValueError(f"answer extraction {mode!r}; expected one of {list(EXTRACTORS)}")
    boxed = extract_boxed(text)
    if mode == "strict" or (boxed is not None and boxed.strip()):
        return boxed
    return extract_last_number(text)


EXTRACTORS = ("strict", "lenient")

# A fenced code block: ```python (or ```py, or no language) ... ```, closed.
_FENCE_RE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The code a response gives: its first closed fenced block marked python (or py), else its
    first closed block with no language; None without one (a cut-off block is no answer). Text only:
    nothing here runs it (opsd/sandbox.py does)."""
    found = [(m.group(1), m.group(2)) for m in _FENCE_RE.finditer(text)]
    for wanted in (True, False):
        for lang, body in found:
            if bool(lang) == wanted and body.strip():
                return body
    return None


def is_equivalent(pred: str | None, gold: str, *, timeout_s: float = 5.0) -> bool:
    """Whether the predicted answer means the same as the gold answer (False when pred is None).

    Both are bare answers ("3/4", "\\frac{\\sqrt2}{2}", "\\{1,2\\}"), e.g. the output of
    `extract_boxed`. A comparison that runs out of time counts as not equivalent.
    """
    if pred is None:
        return False
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if threading.current_thread() is threading.main_thread():
        return _equivalent(pred, gold, stage_timeout_s=max(1, math.ceil(timeout_s)))
    return _WORKER.equivalent(pred, gold, timeout_s)


def score_response(text: str, gold: str, mode: str = "strict") -> float:
    """1.0 when the answer `extract_answer(text, mode)` is equivalent to `gold`, else 0.0. A procedural
    task's own grader is applied above this module: :func:`opsd.evaluation.reward`."""
    return 1.0 if is_equivalent(extract_answer(text, mode), gold) else 0.0


def _as_boxed(answer: str) -> str:
    # math-verify extracts answers from text; a box is its highest-priority target and, unlike
    # `$...$`, still parses when the answer ends in a period ("\frac{1}{2}.").
    s = answer.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$").strip()
    return "\\boxed{" + s + "}"


def _equivalent(pred: str, gold: str, *, stage_timeout_s: int | None) -> bool:
    # deferred: math-verify pulls in sympy (~1 s), which most importers of opsd never need
    from math_verify import parse, verify

    gold_parsed = parse(_as_boxed(gold), parsing_timeout=stage_timeout_s)
    pred_parsed = parse(_as_boxed(pred), parsing_timeout=stage_timeout_s)
    if not gold_parsed or not pred_parsed:
        # Nothing extracted at all (empty or brace soup): the only evidence left is the text,
        # and two blanks agreeing is no evidence.
        norm_pred = normalise_answer(pred)
        return bool(norm_pred) and norm_pred == normalise_answer(gold)
    # Gold goes first: math-verify is asymmetric (an equation "x=5" in gold accepts "5").
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=stage_timeout_s))


_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox)\{([^{}]*)\}")
_SIZING_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[ ,;:!]|~")


def normalise_answer(answer: str) -> str:
    """An answer as written, minus what does not change it: text wrappers, \\dfrac, \\left/\\right,
    spacing commands, dollars, whitespace, a final period, case."""
    s = answer
    while True:
        unwrapped = _TEXT_WRAPPER_RE.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SIZING_RE.sub("", s)
    s = _SPACING_RE.sub("", s)
    s = s.replace("$", "")
    s = "".join(s.split())
    s = s.rstrip(".")
    return s.casefold()


class _Worker:
    """The child interpreter that runs math-verify for callers off the main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""

    def equivalent(self, pred: str, gold: str, timeout_s: float) -> bool:
        request = json.dumps({"pred": pred, "gold": gold, "timeout_s": timeout_s}) + "\n"
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(request.encode())
                self._proc.stdin.flush()
                reply = self._read_line(time.monotonic() + timeout_s)
            except (OSError, TimeoutError, EOFError):
                # Late or dead: the child may still be spinning, so it is replaced, not reused.
                self.close()
                return False
            return bool(json.loads(reply)["equal"])

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._buf = b""

    def _start(self) -> None:
        env = dict(os.environ)
        # The child must import this very module and math-verify from wherever this process
        # found them (an uninstalled checkout, a Ray working_dir).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from opsd.verify import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        try:
            ready = self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
        except (TimeoutError, EOFError) as e:
            self.close()
            raise RuntimeError(
                "the math-verify child process did not start (its stderr is above)"
            ) from e
        assert json.loads(ready) == {"ready": True}

    def _read_line(self, deadline: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line


def _serve() -> None:
    """The child's loop: one JSON request per stdin line, one JSON reply per stdout line."""
    # The parent already counts a late reply as a miss; math-verify's own warnings about it
    # would only be noise on the shared stderr.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (imported before "ready" so startup is not billed to a call)

    # The reply channel gets a private copy of stdout, and fd 1 itself goes to stderr, so a
    # stray print inside sympy cannot corrupt a reply.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(b'{"ready": true}\n')
    for line in sys.stdin.buffer:
        request = json.loads(line)
        # This is the child's main thread, so math-verify's alarms work here; they stop a
        # runaway comparison even if the parent has gone and nobody will kill this process.
        stage_timeout_s = math.ceil(request["timeout_s"]) + 1
        equal = _equivalent(request["pred"], request["gold"], stage_timeout_s=stage_timeout_s)
        out.write(json.dumps({"equal": equal}).encode() + b"\n")


_WORKER = _Worker()
atexit.register(_WORKER.close)

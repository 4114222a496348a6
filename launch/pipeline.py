"""From prompts to an Arrow batch: rollouts, the samples made of them and the teacher's scores, with
later steps' rollouts kept in flight (``rollout.max_staleness``) and their scoring overlapped with
training (``scorer.overlap``); docs/DESIGN.md, "One step".

``Trainer.train_one_step`` calls, in this order::

    ready = pipeline.take(step, policy_version)   # this step's samples: rollouts collected, too-stale ones dropped
    pipeline.fill(step, policy_version)           # later steps' rollouts in flight, up to max_staleness
    batch = pipeline.score(ready, teacher_version)  # the Arrow batch
    pipeline.score_ahead(training, policy_version + 1, teacher_version)  # while the learner trains

A sample is one :class:`opsd.batch.Sample` from the moment its rollout comes back to the batch:
the scorer adds the teacher's targets to the same records, and without a scorer they become the
batch as they are. Its teacher prompts are the teacher context's (:class:`TeacherPrompts`): built
once per problem for a context that does not read the samples, here after each rollout for one
that does (the majority of the prompt's samples, a contrastive teacher's wrong samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from opsd.batch import ContextScores, Sample, build_batch, concat_batches, from_ipc_bytes
from opsd.config import Config, distills, trains_on_references
from opsd.contexts import context
from opsd.contexts.base import PRIMARY, ContextInput, GroupSample
from opsd.launch.cluster import ActorPool, Pending, round_robin, sample_seed, unshard
from opsd.launch.problems import TrainingSet
from opsd.launch.teachers import RoutedCalls, TeacherPools
from opsd.objectives import objective, scored_contexts
from opsd.prompts import PromptBuilder, PromptPair, response_loss_mask
from opsd.teachers import teacher_config
from opsd.verify import extract_answer


class TeacherPrompts:
    """The teacher's prompt ids of each sample: the primary context's, and those of the other
    named contexts the objective reads. None for a context that does not apply to a sample (or
    whose prompt and response would not fit model.max_model_len); None for the primary one leaves
    the sample out of the loss."""

    def __init__(self, cfg: Config, data: TrainingSet, builder: PromptBuilder | None = None):
        # builder: what renders the teacher's prompts (one of several teachers'); by default the run's
        self.cfg, self.data = cfg, data
        self.builder = builder or data.teacher_builder
        self.reads_context = distills(cfg)  # else the scorer reads the student's own prompt (or nothing)
        self.context = context(cfg.teacher.context) if self.reads_context else None
        # Reference contexts (an anchor) are the student's own prompt; the others, the context's.
        self.references = objective(cfg.algo).reference_contexts(cfg)
        self.others = [n for n in scored_contexts(cfg) if n != PRIMARY and n not in self.references]
        self.templates = data.builder.templates()

    def of_group(self, pair: PromptPair, rollouts: list, step: int) -> list[tuple[list[int] | None, dict]]:
        """(primary ids, {other context: ids}) for each of a prompt's rollouts."""
        references = {name: pair.student_ids for name in self.references}
        return [(primary, {**others, **references}) for primary, others in self._of_group(pair, rollouts, step)]

    def _of_group(self, pair: PromptPair, rollouts: list, step: int) -> list[tuple[list[int] | None, dict]]:
        n = len(rollouts)
        if not self.reads_context:
            return [(pair.student_ids, {})] * n
        if not self.context.uses_samples and not self.others:
            return [(pair.teacher_ids, {})] * n
        extract = self.cfg.grading.extract
        group = tuple(GroupSample(r.text, extract_answer(r.text, extract), r.reward, len(r.response_ids))
                      for r in rollouts)
        problem = self.data.problems[pair.uid]
        other = self.data.view.other(pair.uid)
        seed = sample_seed(self.cfg.train.seed, step, pair.uid)
        built: dict = {}
        out = []
        for j, r in enumerate(rollouts):
            key = j if getattr(self.context, "per_sample", False) else None
            if key not in built:
                built[key] = self.context.build(self.cfg, ContextInput(problem, group, key, other, seed), self.templates)
            messages = built[key]
            fit = len(r.response_ids)
            primary = pair.teacher_ids if not self.context.uses_samples else self._ids(messages.get(PRIMARY), fit)
            out.append((primary, {name: self._ids(messages.get(name), fit) for name in self.others}))
        return out

    def _ids(self, messages: list[dict] | None, response_tokens: int) -> list[int] | None:
        if messages is None:
            return None
        builder = self.builder  # another model's chat template (teacher.model, teachers:), or the student's
        ids = builder.teacher_context_ids(messages)
        return ids if len(ids) + response_tokens <= builder.max_model_len else None


@dataclass
class InFlight:
    """One later step's batch whose rollouts are running (rollout.max_staleness > 0)."""

    indices: list[int]  # its prompts, as the sampler drew them (a checkpoint records them)
    pairs: list[PromptPair]
    rollouts: Pending
    # Once the rollouts are back and being scored while the learner trains (scorer.overlap): the
    # samples sent to the scorers and their calls, and how many were too stale for the step that
    # will train on them.
    scoring: tuple[list[Sample], Pending] | None = None
    dropped: int = 0
    skipped: int = 0
    step: int = 0  # the step that will train on it


@dataclass
class Ready:
    """One step's samples, in the sampler's order."""

    step: int
    samples: list[Sample]
    dropped: int = 0  # rollouts too stale for this step's policy
    generated: bool = True  # False: the responses are reference solutions (SFT, KD from references)
    scoring: Pending | None = None  # scored since the last step trained (scorer.overlap)
    skipped: int = 0  # samples left out of the loss: their teacher context did not apply


class Pipeline:
    def __init__(self, cfg: Config, data: TrainingSet, rollouts: ActorPool, scorers: ActorPool | None,
                 tokenizer: Any):
        self.cfg = cfg
        self.data = data
        self.rollouts = rollouts
        self.scorers = scorers
        self.tokenizer = tokenizer
        self.inflight: list[InFlight] = []  # later steps' batches, oldest first
        self.pending: list[list[int]] = []  # prompt batches to redo first after a resume, oldest first
        self.teachers = TeacherPrompts(cfg, data)
        # Several teachers (teachers:): each row's teacher prompts are its teacher's context's.
        self.routed = {name: TeacherPrompts(teacher_config(cfg, name), data, data.teacher_builders[name])
                       for name in cfg.teachers}
        self.responses = objective(cfg.algo).responses(cfg)

    # --- what train_one_step calls ---------------------------------------------------------------

    def take(self, step: int, policy_version: int) -> Ready:
        """This step's samples: the oldest batch in flight, or rollouts started now."""
        if trains_on_references(self.cfg):
            return Ready(step, self.reference_samples(self.next_prompts()[1], policy_version), generated=False)
        ahead = self.inflight.pop(0) if self.inflight else None
        if ahead is not None and ahead.scoring is not None:
            samples, scoring = ahead.scoring
            return Ready(step, samples, ahead.dropped, scoring=scoring, skipped=ahead.skipped)
        if ahead is None:
            pairs = self.next_prompts()[1]
            pending = self.submit_rollouts(pairs, step, policy_version)
        else:
            pairs, pending = ahead.pairs, ahead.rollouts
        samples, skipped = self.samples_of(pairs, self.rollouts.collect(pending), step)
        samples, dropped = self.fresh(samples, policy_version)
        return Ready(step, samples, dropped, skipped=skipped)

    def fill(self, step: int, policy_version: int) -> None:
        """Off-policy by at most max_staleness = s: up to s later steps' rollouts run on the current
        weights while the learner trains on this step's. The batch of step step + j is sampled
        with that step's seeds, so a resumed run draws the same samples."""
        s = self.cfg.rollout.max_staleness
        if s == 0 or trains_on_references(self.cfg):
            return
        while len(self.inflight) < s and step + len(self.inflight) < self.cfg.train.steps:
            indices, pairs = self.next_prompts()
            ahead_step = step + 1 + len(self.inflight)
            self.inflight.append(InFlight(indices, pairs, self.submit_rollouts(pairs, ahead_step, policy_version),
                                          step=ahead_step))

    def score(self, ready: Ready, teacher_version: int) -> pa.Table:
        """Samples -> the Arrow batch; with a scorer running, holding the teacher's targets.

        For GRPO the scorer is the frozen reference policy: it sees the student's own prompt, and
        its sampled-token logprobs feed the KL term."""
        if ready.scoring is not None:
            return self.collect_score(ready.samples, ready.scoring)
        if self.scorers is None:
            return build_batch(ready.samples, k=self.cfg.scorer.topk, temperature=self.cfg.loss.temperature,
                               teacher_mode="none")
        return self.collect_score(ready.samples, self.submit_score(ready.samples, teacher_version))

    def score_ahead(self, training: list, version: int, teacher_version: int) -> None:
        """While the learner trains (``training``: its refs), wait for the next batch's rollouts and
        start scoring them, for the policy ``version`` that will train on them. Only a teacher whose
        weights the push leaves alone scores a batch now as it would after the push. A rollout call
        that failed is left to the next step's take, which recovers its actor while the learner is
        idle (a catch-up push needs the pushed weights); a learner rank that failed ends the wait,
        and collect_train reports it."""
        import ray

        if not self._overlaps_scoring() or not self.inflight or self.inflight[0].scoring is not None:
            return
        ahead = self.inflight[0]
        refs = [ahead.rollouts.refs[i] for i in range(len(ahead.rollouts.args))]
        rolling, waiting = set(refs), refs + list(training)
        while rolling & set(waiting):
            (ref,), waiting = ray.wait(waiting, num_returns=1)
            if ref not in rolling:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError:
                    return
        try:
            results = ray.get(refs)
        except ray.exceptions.RayError:
            return
        samples, ahead.skipped = self.samples_of(ahead.pairs, results, ahead.step)
        samples, ahead.dropped = self.fresh(samples, version)
        ahead.scoring = samples, self.submit_score(samples, teacher_version)

    def drain(self) -> None:
        """Wait until every call in flight has finished (before a collective push, whose receivers
        must all take part at once, and before the learner restarts)."""
        import ray

        refs = [r for f in self.inflight for r in f.rollouts.refs.values()]
        refs += [r for f in self.inflight if f.scoring for r in f.scoring[1].refs.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs))

    def in_flight_prompts(self) -> list[list[int]]:
        """The prompts of every batch in flight, oldest first: drawn from the sampler already, so a
        checkpoint records them and a resumed run does them first."""
        return [f.indices for f in self.inflight]

    # --- the parts ---------------------------------------------------------------------------

    def next_prompts(self) -> tuple[list[int], list[PromptPair]]:
        """The next prompts (indices and pairs): those in flight at the last checkpoint first."""
        indices = self.pending.pop(0) if self.pending else self.data.sampler.next_batch(self.cfg.train.prompts_per_step)
        return indices, [self.data.pairs[i] for i in indices]

    def submit_rollouts(self, pairs: list[PromptPair], step: int, policy_version: int) -> Pending:
        """prompts -> vLLM: each prompt goes to one worker, n samples each (returns at once)."""
        cfg = self.cfg.rollout
        shards = round_robin(pairs, len(self.rollouts.actors))
        # KD from teacher samples: the responses are sampled from the teacher's context.
        teacher = self.responses == "teacher"
        # Each worker also grades its own samples: the answers travel with the prompts.
        args = [([p.teacher_ids if teacher else p.student_ids for p in s],
                 [sample_seed(self.cfg.train.seed, step, p.uid) for p in s], [p.answer for p in s],
                 [p.verifier for p in s]) for s in shards]
        return self.rollouts.submit(
            "generate", args, n=cfg.n, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, expect_version=policy_version, extract=self.cfg.grading.extract,
        )

    def samples_of(self, pairs: list[PromptPair], results: list, step: int) -> tuple[list[Sample], int]:
        """The rollout workers' results (sharded as submit_rollouts dealt them) -> one sample per
        response, in the sampler's order, with the teacher prompts of its contexts; and how many
        are left out of the loss because their teacher context did not apply."""
        samples = []
        for pair, rollouts in zip(pairs, unshard(results, len(pairs))):
            prompts = self.routed.get(pair.teacher, self.teachers)
            for j, (r, (teacher, others)) in enumerate(zip(rollouts, prompts.of_group(pair, rollouts, step))):
                samples.append(self._sample(pair, j, r.response_ids, r.logprobs, r.reward, r.policy_version,
                                            r.finish_reason, teacher, others))
        return samples, sum(not s.context_applied for s in samples)

    def reference_samples(self, pairs: list[PromptPair], policy_version: int) -> list[Sample]:
        """SFT and KD from references: the reference solutions play the part of the responses
        (nothing is generated). For KD the teacher reads them after its own, longer prompt."""
        eos = self.tokenizer.eos_token_id
        limit = self.cfg.model.max_model_len
        teacher = distills(self.cfg)
        samples = []
        for pair in pairs:
            # The reference is text; it is tokenised once here, and EOS closes the turn.
            solution = self.data.problems[pair.uid].solution
            ids = list(self.tokenizer(solution, add_special_tokens=False)["input_ids"]) + [eos]
            prompt = len(pair.teacher_ids if teacher else pair.student_ids)
            if prompt + len(ids) > limit:
                if self.cfg.prompt.overlong == "skip":
                    self.data.skipped.append(pair.uid)
                    continue
                raise ValueError(
                    f"row {pair.uid}: {'teacher ' if teacher else ''}prompt ({prompt} tokens) + reference solution "
                    f"({len(ids)}) is longer than model.max_model_len={limit}; raise it or set prompt.overlong=skip"
                )
            context_ids = pair.teacher_ids if teacher else pair.student_ids
            references = {name: pair.student_ids for name in self.teachers.references}
            samples.append(self._sample(pair, 0, ids, [0.0] * len(ids), 0.0, policy_version, "stop", context_ids,
                                        references))
        return samples

    def _sample(self, pair: PromptPair, j: int, response: list[int], logprobs: list[float], reward: float | None,
                version: int, finish_reason: str, teacher: list[int] | None, others: dict) -> Sample:
        mask = response_loss_mask(len(response), skip_first=self.cfg.loss.skip_first)
        if self.cfg.loss.mask_truncated and finish_reason == "length":
            # DAPO's overlong filtering: a cut answer is out of the loss; it stays in the batch (and
            # in its group's reward statistics).
            mask = [False] * len(response)
        applied = teacher is not None
        if not applied:
            # Its teacher context does not apply (its prompt's samples do not agree enough): scored
            # on the student's own prompt, but not trained on.
            teacher, mask = pair.student_ids, [False] * len(response)
        return Sample(
            sample_id=f"{pair.uid}#{j}", prompt_ids=pair.student_ids, teacher_prompt_ids=teacher,
            response_ids=response, rollout_logprobs=logprobs, loss_mask=mask, reward=reward,
            policy_version=version, finish_reason=finish_reason, context_applied=applied,
            others={name: ContextScores(ids) for name, ids in others.items()}, teacher=pair.teacher,
        )

    def fresh(self, samples: list[Sample], version: int) -> tuple[list[Sample], int]:
        """The samples at most rollout.max_staleness versions behind ``version`` (the policy that
        trains on them), and how many were dropped."""
        kept = [s for s in samples if version - s.policy_version <= self.cfg.rollout.max_staleness]
        return kept, len(samples) - len(kept)

    def submit_score(self, samples: list[Sample], teacher_version: int) -> Pending:
        """Samples -> the scorers, in interleaved shards (returns at once); with several teachers,
        each sample to its teacher's pool."""
        if isinstance(self.scorers, TeacherPools):
            return self.scorers.submit(samples, teacher_version)
        ns = len(self.scorers.actors)
        return self.scorers.submit("score", [(samples[i::ns],) for i in range(ns)], expect_version=teacher_version)

    def collect_score(self, samples: list[Sample], pending: Pending | RoutedCalls) -> pa.Table:
        if isinstance(pending, RoutedCalls):
            return self.scorers.collect(samples, pending)
        table = concat_batches([from_ipc_bytes(p) for p in self.scorers.collect(pending)])
        # Restore the sampler's row order, which the shards interleaved.
        order = {s.sample_id: i for i, s in enumerate(samples)}
        ids = table.column("sample_id").to_pylist()
        return table.take(pa.array(sorted(range(len(ids)), key=lambda i: order[ids[i]]), pa.int64()))

    def _overlaps_scoring(self) -> bool:
        cfg = self.cfg
        return (cfg.scorer.overlap and cfg.rollout.max_staleness > 0 and self.scorers is not None
                and cfg.teacher.mode == "fixed" and not trains_on_references(cfg))


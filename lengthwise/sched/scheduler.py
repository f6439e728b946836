"""The step scheduler: which tokens of which sequences run in the next forward pass.

Each step it first continues the running requests (decodes, unfinished prefill chunks, the
recomputation of preempted sequences), then admits waiting requests in the order the policy
offers them, all within a token budget (`max_num_batched_tokens`) and a sequence limit
(`max_num_seqs`). A long prompt is prefilled in chunks across steps. When the KV cache runs out
of blocks, the policy names a running request to preempt; its blocks are freed and it waits
again, to be recomputed later: nothing is dropped and nothing crashes.

With a `DraftProposer` (speculative decoding), decode rows also carry the tokens the proposer
drafts after their input token. Drafts are planned last, once every running request's tokens
and the admitted prompts have their budget and blocks, from what is left of the budget, within
each row's token limit, and in KV blocks beyond the headroom running rows need to grow: a draft
never takes a token or a block from anything the step would otherwise have run. The engine
verifies them and reports how many were kept (`accept_draft`). With a `DraftLengthPlanner`
(adaptive drafts), each row drafts only as many tokens as its acceptance so far and the measured
step cost say will pay for themselves (sched/draft_length.py).

Progress counters (`Request.num_prompt_computed`, `Sequence.num_computed`) advance here, when a
chunk is scheduled (and for kept drafts); the engine only appends the tokens it samples. Pure
Python: no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lengthwise.kv.block_manager import KVBlockManager
from lengthwise.sched.draft import DraftProposer
from lengthwise.sched.draft_length import DraftLengthPlanner
from lengthwise.sched.policy import SchedulerView, SchedulingPolicy
from lengthwise.sequence import Request, RequestStatus, Sequence


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens `start:end` of one segment, fed in this step.

    `seq is None`: a chunk of the request's prompt, written to its prompt segment. Otherwise
    tokens of `seq.output_ids`, written to that sequence's response segment. `sample`: the
    chunk ends the context, so the logits at its last token are sampled from (once per waiting
    sequence of the request for a prompt chunk). `draft`: speculated tokens fed after the chunk's
    (a decode row only, which then samples at each of its 1 + len(draft) positions).
    """

    request: Request
    seq: Sequence | None
    start: int
    end: int
    sample: bool
    draft: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start + len(self.draft)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Collected with fcr="recompute": their outputs were discarded and they wait to start again.
    restarted: list[Request] = field(default_factory=list)
    rows: int = 0  # batch rows this step occupies, idle rows included (policy.rows)
    padding_rows: int = 0  # idle rows the executor computes anyway (static:pad=true), in decode steps

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Token-budgeted continuous batching over a `KVBlockManager`, ordered by a `SchedulingPolicy`."""

    def __init__(self, policy: SchedulingPolicy, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, clock: Callable[[], float] = time.monotonic,
                 enable_prefix_caching: bool = False, proposer: DraftProposer | None = None,
                 draft_max_batch: int | None = None, draft_step_tokens: int | None = None,
                 draft_planner: DraftLengthPlanner | None = None, max_loras: int | None = None,
                 lora_turn_steps: int = 256) -> None:
        if max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
        if max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {max_num_batched_tokens}")
        self.policy = policy
        self.clock = clock
        self.kv = KVBlockManager(num_blocks, block_size, enable_prefix_caching)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Admission keeps a little headroom so running sequences can grow before anyone is preempted.
        self.watermark_blocks = max(1, num_blocks // 100)
        self.running: list[Request] = []
        self.suspended: list[Request] = []  # collected with fcr="continue", holding their KV blocks
        self.num_preemptions = 0
        self.num_collected = 0
        self.proposer = proposer
        self.draft_max_batch = draft_max_batch  # more running sequences than this: no drafts
        # Drafts keep a step that fits in this many tokens within it (the executor's fast path).
        self.draft_step_tokens = draft_step_tokens
        self.draft_planner = draft_planner  # None: every row drafts what the proposer offers
        # At most this many LoRA adapters among the running requests (vLLM's max_loras); None: any.
        self.max_loras = max_loras
        self.lora_turn_steps = lora_turn_steps
        self._adapter_since: dict[int, int] = {}  # adapter -> the step it last entered the running set
        self._preempted_now: set[int] = set()  # by priority preemption this step: not re-admitted in it
        self.num_steps = 0

    # -- requests in and out -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request. The caller has checked that it fits the cache on its own."""
        request.status = RequestStatus.WAITING
        self.policy.add(request)

    def abort(self, request: Request) -> bool:
        """Stop a waiting or running request and free its blocks now. `False` if already finished."""
        if request.status is RequestStatus.FINISHED:
            return False
        if request.status is RequestStatus.WAITING:
            self.policy.remove(request)
        if request.suspended:
            self.suspended.remove(request)
            request.suspended = False
        for seq in request.active_seqs:
            seq.finish_reason = "abort"
        self._release(request)
        return True

    def finish_sequence(self, seq: Sequence, reason: str) -> None:
        """End one sequence (its response blocks are freed now); the request ends with its last one."""
        seq.finish_reason = reason
        self._discard(seq)
        if seq.request.finished:
            self._release(seq.request)

    def accept_draft(self, seq: Sequence, num_drafted: int, num_kept: int) -> None:
        """The engine kept the first `num_kept` of the `num_drafted` tokens of `seq`'s draft in this
        step: their keys and values, written when they were fed, are the sequence's own, so they
        need no computing."""
        seq.num_computed += num_kept
        if self.draft_planner is not None:
            self.draft_planner.observe_draft(seq, num_drafted, num_kept)

    def _discard(self, seq: Sequence) -> None:
        """Free the sequence's response blocks and what the proposer kept for it: it ended, or its
        outputs are thrown away (a preempted sequence keeps its tokens, and its proposer index)."""
        self.kv.free_sequence(seq.seq_id)
        if self.proposer is not None:
            self.proposer.forget(seq)
        if self.draft_planner is not None:
            self.draft_planner.forget(seq)

    def _release(self, request: Request) -> None:
        for seq in request.seqs:
            self._discard(seq)
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self.policy.finished(request)
        request.status = RequestStatus.FINISHED

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    @property
    def num_running_seqs(self) -> int:
        return sum(len(r.active_seqs) for r in self.running)

    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.policy) > 0

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan the next forward pass; advances the computed-token counters of what it schedules."""
        self.num_steps += 1
        out = SchedulerOutput()
        for request in list(self.running):
            cap = self.policy.cap(request)
            if cap is not None and request.prompt_done and max(len(s.output_ids) for s in request.active_seqs) >= cap:
                self._collect(request, out)
        self._preempted_now.clear()
        if self.policy.supports_priority and self.running:
            # The most urgent class (lowest value) is continued first (stable: admission order
            # within a class), so a block shortage mid-step preempts from the other end (`victim`
            # sees only the requests not yet planned).
            self.running.sort(key=lambda r: r.priority)
            self._preempt_for_priority(out)
        budget = self.max_num_batched_tokens
        drafting = self.proposer is not None and (
            self.draft_max_batch is None or self.num_running_seqs <= self.draft_max_batch)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            chunks = self._plan(request, budget)
            while chunks is None:  # out of blocks: someone at or after `request` in priority yields
                victim = self.policy.victim(self.running[i:], self.clock())
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
                chunks = self._plan(request, budget)
            if chunks is None:
                continue  # `request` itself was preempted; `i` now points at the next one
            budget -= self._apply(chunks, out)
            i += 1
        num_seqs = self._admit(out, budget)
        if drafting:
            self._add_drafts(out)
        out.rows = self.policy.rows(num_seqs)
        padding = self.policy.padding_rows(num_seqs)
        if padding and any(c.seq is not None and c.sample for c in out.chunks):  # it rides along decode rows
            out.padding_rows = padding
        return out

    def _collect(self, request: Request, out: SchedulerOutput) -> None:
        """FCR: `request` reached its batch's cap unfinished. It leaves the batch and waits: with
        its KV blocks ("continue") or from scratch, its output discarded ("recompute")."""
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_collected += 1
        self.num_collected += 1
        if self.policy.fcr == "continue":
            request.suspended = True
            self.suspended.append(request)
        else:
            for seq in request.seqs:
                self._discard(seq)
                seq.output_ids.clear()
                seq.num_computed = 0
                seq.finish_reason = None
            request.num_prompt_computed = 0
            out.restarted.append(request)
        self.policy.collected(request)

    def _preempt_for_priority(self, out: SchedulerOutput) -> None:
        """Priority preemption (vLLM V0's): when the waiting request the policy offers first is of a
        more urgent class (lower `priority`) than some running ones and could not start now, but
        could once those were gone, preempt them, the one the policy ranks last first, until it
        can. Without it an urgent request would wait for a long, unimportant batch to finish; a
        request that preempting could not let in (a busier class holds the cache) preempts no one."""
        now = self.clock()
        head = self.policy.most_urgent(now)
        if head is None:
            return
        lower = [r for r in self.running if r.priority > head.priority]
        if not lower or self._admissible(head, now) or not self._admissible(head, now, without=lower):
            return
        while not self._admissible(head, now):
            victim = self.policy.victim(self.running, now)
            if victim.priority <= head.priority:  # (cannot happen: preempting all of `lower` lets it in)
                return
            self._preempt(victim)
            out.preempted.append(victim)
            self._preempted_now.add(id(victim))

    def _admissible(self, request: Request, now: float, without: list[Request] | None = None) -> bool:
        """Whether `request` could start now, were the running requests `without` preempted first: a
        sequence slot, its adapter's place, blocks for its prompt (less a cached prefix running
        requests hold) and first token above the watermark, and the policy's own test
        (`admits`: predictive admission)."""
        gone = {id(r) for r in without or ()}
        running = [r for r in self.running if id(r) not in gone]
        num_seqs = sum(len(r.active_seqs) for r in running)
        seqs = request.active_seqs
        if num_seqs + len(seqs) > self.max_num_seqs:
            return False
        if self.max_loras is not None and request.lora_id:
            adapters = {r.lora_id for r in running if r.lora_id}
            if request.lora_id not in adapters and len(adapters) >= self.max_loras:
                return False
        kv = self.kv
        free = kv.num_free_blocks + sum(kv.reclaimable([s.seq_id for s in r.seqs]) for r in without or ())
        shared = (0 if request.reads_every_prompt_position
                  else kv.shared_prefix_blocks(request.prompt_ids, request.lora_id))
        need = kv.blocks_for(request.prompt_len) - shared + self._first_response_blocks(request, seqs)
        if free - need < (self.watermark_blocks if running else 0):
            return False
        view = SchedulerView(now=now, num_running_requests=len(running), num_running_seqs=num_seqs,
                             num_free_blocks=free, num_blocks=kv.pool.num_blocks,
                             seq_slots=self.max_num_seqs - num_seqs, block_size=kv.block_size,
                             max_num_seqs=self.max_num_seqs, running=tuple(running))
        return self.policy.admits(request, view)

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """Admit waiting requests in the policy's order while they fit; returns the running sequences."""
        num_seqs = self.num_running_seqs
        view = SchedulerView(now=self.clock(), num_running_requests=len(self.running), num_running_seqs=num_seqs,
                             num_free_blocks=self.kv.num_free_blocks, num_blocks=self.kv.pool.num_blocks,
                             seq_slots=self.max_num_seqs - num_seqs, block_size=self.kv.block_size,
                             max_num_seqs=self.max_num_seqs, running=tuple(self.running))
        adapters = {r.lora_id for r in self.running if r.lora_id} if self.max_loras is not None else None
        waiting_for_adapter = False
        for request in self.policy.candidates(view):
            if budget <= 0:
                break
            if id(request) in self._preempted_now:
                continue
            seqs = request.active_seqs
            if num_seqs + len(seqs) > self.max_num_seqs:
                break
            if adapters is not None and request.lora_id and not self._adapter_admits(request.lora_id, adapters,
                                                                                     waiting_for_adapter):
                waiting_for_adapter = True
                continue
            if request.suspended:  # its blocks are still held: it resumes where it stopped
                chunks = self._plan(request, budget)
                if chunks is None:
                    self._spill_suspended(keep=request)
                    chunks = self._plan(request, budget)
                if chunks is None:
                    break
                self.suspended.remove(request)
                request.suspended = False
                self._start(request, chunks, out)
                num_seqs += len(seqs)
                budget -= sum(c.num_tokens for c in chunks)
                continue
            for seq in seqs:
                self.kv.add_sequence(seq.seq_id, request.request_id)
            # Prompt logprobs and mean/CLS pooling read every prompt position: no cached prefix.
            cached = (0 if request.reads_every_prompt_position
                      else self.kv.match_prefix(request.request_id, request.prompt_ids, request.lora_id))
            # The rest of the prompt (and a first response block per sample) must fit beside the
            # headroom, or admitting it now would only preempt someone a few steps later.
            need = (self.kv.blocks_for(request.prompt_len) - cached // self.kv.block_size
                    + self._first_response_blocks(request, seqs))
            headroom = self.watermark_blocks if self.running else 0
            if self.kv.num_free_blocks - need < headroom and self.suspended:
                # Parked KV yields to the batch being admitted: its owners keep their tokens and
                # recompute them on resume, as a preempted request does.
                self._spill_suspended(keep=None, need=need + headroom)
            chunks = None
            if self.kv.num_free_blocks - need >= headroom:
                request.num_prompt_computed = request.num_cached_tokens = cached
                chunks = self._plan(request, budget)
            if chunks is None:
                request.num_prompt_computed = 0
                for seq in seqs:
                    self.kv.free_sequence(seq.seq_id)
                break
            self._start(request, chunks, out)
            num_seqs += len(seqs)
            budget -= sum(c.num_tokens for c in chunks)
        return num_seqs

    def _first_response_blocks(self, request: Request, seqs: list[Sequence]) -> int:
        """Blocks the samples' next tokens need once admitted; none for an embedding request, which
        ends with its prompt."""
        if request.pooling is not None:
            return 0
        return sum(self.kv.blocks_for(len(s.output_ids) + 1) for s in seqs)

    def _adapter_admits(self, lora_id: int, adapters: set[int], someone_waits: bool) -> bool:
        """Whether a request of adapter `lora_id` may join the running requests, whose adapters are
        `adapters` (updated when it may), under `max_loras`. A new adapter needs a free place. A
        running adapter's turn lasts `lora_turn_steps` steps from when it (re)entered: after that,
        while a request of another adapter waits for a place (`someone_waits`), its new requests
        wait too, so that its rows drain and the other gets its turn (else a steady stream of one
        adapter would keep the others waiting for ever)."""
        if lora_id in adapters:
            since = self._adapter_since.get(lora_id, self.num_steps)
            return not someone_waits or self.num_steps - since < self.lora_turn_steps
        if len(adapters) >= self.max_loras:  # type: ignore[operator]
            return False
        adapters.add(lora_id)
        self._adapter_since[lora_id] = self.num_steps
        return True

    def _start(self, request: Request, chunks: list[ScheduledChunk], out: SchedulerOutput) -> None:
        self.policy.admitted(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._apply(chunks, out)

    def _spill_suspended(self, keep: Request | None, need: int = 0) -> None:
        """Free the KV of suspended requests other than `keep` (newest first) until `need` blocks
        are free (`keep` given: all of them): they keep their tokens and will recompute them, like
        a preempted request."""
        for request in reversed(list(self.suspended)):
            if request is keep or (keep is None and self.kv.num_free_blocks >= need):
                continue
            for seq in request.seqs:
                self.kv.free_sequence(seq.seq_id)
                seq.num_computed = 0
            request.num_prompt_computed = 0
            request.suspended = False
            self.suspended.remove(request)
    def _plan(self, request: Request, budget: int) -> list[ScheduledChunk] | None:
        """The request's chunks for this step, with their blocks allocated; `None` if blocks ran out.
        Counters are not touched, so a failed plan can simply be retried after a preemption."""
        chunks: list[ScheduledChunk] = []
        if request.num_prompt_computed < len(request.prompt_ids):  # not request.prompt_done, inlined
            start = request.num_prompt_computed
            end = start + min(budget, request.prompt_len - start)
            if not self.kv.grow_prompt(request.request_id, end):
                return None
            # A fresh request samples its first tokens from the prompt's last logits; a recomputed
            # one already has them and re-feeds its outputs once the prompt is back.
            fresh = end == request.prompt_len and not any(s.output_ids for s in request.seqs)
            chunks.append(ScheduledChunk(request, None, start, end, sample=fresh))
            budget -= end - start
            if end < request.prompt_len or fresh:
                return chunks
        seqs = request.active_seqs
        # A beam search request's beams are sampled together (their tokens are chosen among all of
        # theirs): when the budget cannot take every beam's pending tokens, none reaches its last.
        together = request.beam is None or sum(len(s.output_ids) - s.num_computed for s in seqs) <= budget
        for seq in seqs:
            if budget <= 0:
                break
            computed, generated = seq.num_computed, len(seq.output_ids)
            end = computed + min(budget, generated - computed)
            if not together:
                end = min(end, generated - 1)
            if end <= computed:  # nothing pending (or nothing a beam may feed this step)
                continue
            if not self.kv.grow_response(seq.seq_id, end):
                return None
            chunks.append(ScheduledChunk(request, seq, computed, end, sample=end == generated))
            budget -= end - computed
        return chunks

    def _add_drafts(self, out: SchedulerOutput) -> None:
        """Give the step's decode rows the proposer's drafts from the budget the step left unused
        (rows in running order: the policy's priority first), and within `draft_step_tokens` if
        the step fits in it without drafts (drafts that pushed it off the executor's fast path
        would cost more than they save)."""
        limit = self.max_num_batched_tokens
        if self.draft_step_tokens is not None and out.num_tokens <= self.draft_step_tokens:
            limit = min(limit, self.draft_step_tokens)
        budget = limit - out.num_tokens
        if self.draft_planner is not None:
            # Rows sampled this step: a decode row, or each sample of a prompt that completes.
            self.draft_planner.begin_step(sum(1 if c.seq is not None else len(c.request.active_seqs)
                                              for c in out.chunks if c.sample))
        for c in out.chunks:
            if budget <= 0:
                break
            seq = c.seq
            if seq is not None and c.sample and c.num_tokens == 1 and c.end == len(seq.output_ids):
                c.draft = self._draft(c.request, seq, budget + 1)
                budget -= len(c.draft)

    def _draft(self, request: Request, seq: Sequence, budget: int) -> list[int]:
        """The proposer's draft for the decode row of `seq` (`budget`: its input token and the
        draft), its KV slots taken. None for a structured request (its grammar is not walked
        ahead) or a beam search (its beams change each step). Cut to the row's token limit (or its
        batch's FCR cap), and to the blocks the row holds plus those free beyond the headroom every
        running row may need to grow."""
        if request.params.structured_outputs is not None or request.beam is not None:
            return []
        generated = len(seq.output_ids)
        limit = request.token_limit
        cap = self.policy.cap(request)
        if cap is not None:
            limit = min(limit, cap)
        # Up to all the draft kept plus the token sampled after it, within the limit.
        room = min(budget - 1, limit - generated - 1)
        if self.draft_planner is not None:
            room = self.draft_planner.max_draft(seq, room)
        draft = self.proposer.propose(seq, room) if room > 0 else []
        if not draft:
            return []
        held = len(self.kv.response_segment(seq.seq_id).blocks)
        spare = max(0, self.kv.num_free_blocks - self.watermark_blocks - len(self.running))
        draft = draft[:(held + spare) * self.kv.block_size - generated]
        if draft and not self.kv.grow_response(seq.seq_id, generated + len(draft)):
            return []
        return draft

    def _apply(self, chunks: list[ScheduledChunk], out: SchedulerOutput) -> int:
        used = 0
        for c in chunks:
            if c.seq is None:
                c.request.num_prompt_computed = c.end
                self.kv.cache_prompt(c.request.request_id, c.request.prompt_ids, c.end, c.request.lora_id)
            else:
                c.seq.num_computed = c.end
            used += c.num_tokens
        out.chunks.extend(chunks)
        return used

    def _preempt(self, request: Request) -> None:
        for seq in request.seqs:
            self.kv.free_sequence(seq.seq_id)
            seq.num_computed = 0
        request.num_prompt_computed = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        self.policy.preempted(request)

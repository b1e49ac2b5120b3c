"""Waiting and running queues, admission, the chunked-prefill budget and preemption.

Each step: running requests first (decodes, then unfinished prefill chunks), then new requests
from the waiting queue while the token budget, KV blocks, `max_running_requests` and adapter
residency allow. When a running request needs a block and none is free, the most recently
admitted running request is preempted by recompute: its blocks are freed and it goes back to the
front of the waiting queue with its generated tokens kept.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from runtime.kv_cache import BlockManager, root_digest
from runtime.request import Request, RequestStatus


class AdapterAdmission(Protocol):
    """What the scheduler needs from the adapter manager."""

    def admit(
        self, name: str, batch_slots: set[int], overlap: bool | None, max_wait_s: float = 0.0
    ) -> int | None: ...

    def slot_of(self, name: str) -> int | None: ...

    def has_slot_for(self, batch_slots: set[int]) -> bool: ...

    def drain_slot(self, steps_left: dict[int, int]) -> int | None: ...

    def needs_only_slot(self, name: str) -> bool: ...

    def hurry(self, name: str) -> None: ...

    def uid_of(self, name: str) -> int | None: ...


@dataclass
class ScheduledBatch:
    """The plan of one step. Requests are ordered by adapter slot (base rows first)."""

    requests: list[Request]
    num_new_tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 and not r.is_prefilling
                   for r, n in zip(self.requests, self.num_new_tokens))

    @property
    def slots(self) -> set[int]:
        return {r.lora_slot for r in self.requests if r.lora_slot >= 0}


@dataclass
class SchedulerCounters:
    """What happened, for tests and logs: they assert from these that batching really ran."""

    num_steps: int = 0
    num_rows: int = 0  # requests over all steps (mean batch size = num_rows / num_steps)
    num_prefill_steps: int = 0  # steps with a prefill chunk (these run eagerly on CUDA)
    num_preemptions: int = 0
    num_prefill_chunks: int = 0
    max_batch_size: int = 0
    num_mixed_adapter_steps: int = 0
    max_adapters_in_step: int = 0
    history: list[int] = field(default_factory=list)  # batch size of recent steps


# A request waiting behind others is passed over at most this many scheduling rounds; then it
# is starved. Once its adapter is in host memory, requests behind it join only with adapters
# that already hold a GPU slot, and one of those slots (the one whose rows finish soonest) takes
# no new requests until it empties and the starved request's adapter can have it; before that,
# its adapter's read goes first. No adapter waits forever, and the batch keeps the rows of the
# other slots' adapters meanwhile.
MAX_PASSED_OVER = 64
# Adaptive overlap loading: the longest a batch may wait on an upload, as a fraction of a step.
ADAPTIVE_WAIT_FRACTION = 0.5


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_running_requests: int,
        chunked_prefill_size: int,
        adapters: AdapterAdmission | None = None,
        overlap_loading: bool | None = None,
        context_length: int | None = None,
    ) -> None:
        self.bm = block_manager
        self.max_running = max_running_requests
        self.token_budget = chunked_prefill_size
        self.adapters = adapters
        self.context_length = context_length
        # True: requests whose adapter is still uploading wait; False: they join and the GPU
        # orders the upload first; None (default): they join when the upload should end
        # within ADAPTIVE_WAIT_FRACTION of a step, so waiting costs less than splitting.
        self.overlap = overlap_loading
        self.step_time_s = 0.0  # moving average of recent step times, kept by the engine
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = SchedulerCounters()

    def observe_step(self, seconds: float) -> None:
        """Fold one step's duration into the step-time average the adaptive policy uses."""
        if self.step_time_s == 0.0:
            self.step_time_s = seconds
        else:
            self.step_time_s = 0.8 * self.step_time_s + 0.2 * seconds

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.bm.prefix_cache:
            self.bm.register(req)
        self.bm.free(req)

    def schedule(self) -> ScheduledBatch | None:
        if self.bm.prefix_cache:  # the blocks launched steps filled become shareable
            bs = self.bm.block_size
            for req in self.running:  # a decode row fills a block once in `bs` steps
                if req.num_computed_tokens // bs > req.num_registered_blocks:
                    self.bm.register(req)
        batch: list[Request] = []
        counts: list[int] = []
        slots: set[int] = set()
        budget = self.token_budget
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this round
                continue
            if req.num_pending and self._reaches_limit(req):
                continue  # its token in flight is its last: it finishes when that arrives
            n = min(req.num_uncomputed_tokens, budget) if req.is_prefilling else 1
            if n <= 0 or not self._admit_adapter(req, slots):
                continue
            if not self._reserve(req, n, batch):
                continue
            batch.append(req)
            counts.append(n)
            budget -= n
        if self._admit_waiting(batch, counts, slots, budget) and not batch:
            # A starved request held every new slot and nothing could run: never let that stop
            # the server (its adapter may not be able to use a slot yet); the others go.
            self._admit_waiting(batch, counts, slots, budget, fair=False)
        if not batch:
            return None
        return self._finish_plan(batch, counts)

    def _admit_waiting(
        self, batch: list[Request], counts: list[int], slots: set[int], budget: int,
        fair: bool = True,
    ) -> bool:
        """Admit waiting requests in queue order, passing over those whose adapter cannot join.
        A pass-over costs a set lookup or two: the queue may hold thousands of requests for
        adapters without a slot, and each round scans it whole. Returns whether a starved
        request held back the requests behind it (never when not `fair`)."""
        skipped: list[Request] = []
        num_admitted = 0
        refused: set[str] = set()  # adapters that cannot join this round (it only takes slots)
        no_new_slot = False  # every slot is held by the batch: adapters without one wait
        starved = False  # a request ahead, passed over MAX_PASSED_OVER rounds, needs a slot
        drain: int | None = None  # the slot left to empty for it
        hurried = False  # one such request's adapter is still read from disk: it goes first
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            if req.num_pending:
                break  # preempted with a token in flight: recompute once it has arrived
            name = req.adapter  # the version's key (AdapterManager.key_of)
            joins = name is None or not (
                name in refused or self._waits_for_slot(name, no_new_slot, starved, drain))
            hit: list[int] | None = None
            if joins:
                hit = self._prefix_hit(req)
                done = len(hit or ()) * self.bm.block_size  # tokens the cache holds
                n = min(req.num_tokens - done, budget)
                need = -(-(done + n) // self.bm.block_size) - len(hit or ())
                taken = self.bm.idle_among(hit) if hit else 0  # free blocks the hit takes
                if not self.bm.can_allocate(need + taken + self._watermark()):
                    break
                joins = self._admit_adapter(req, slots)
            self.waiting.popleft()
            if not joins:
                assert name is not None and self.adapters is not None
                skipped.append(req)
                refused.add(name)
                if not no_new_slot and self.adapters.slot_of(name) is None:
                    no_new_slot = not self.adapters.has_slot_for(slots)
                if fair and not starved and req.passed_over >= MAX_PASSED_OVER:
                    if self.adapters.needs_only_slot(name):
                        starved = True
                        drain = self._drain_slot(batch)
                    elif not hurried:
                        # Its adapter waits for a host row. Others keep taking slots: once an
                        # adapter holds one, its host copy may go, so that row frees (held for
                        # a slot, the rows of adapters whose requests wait could all stay taken,
                        # and nothing would ever run again).
                        self.adapters.hurry(name)
                        hurried = True
                continue
            if hit is not None:
                self.bm.take_prefix(req, hit)
                if req.num_output_tokens == 0:
                    req.cached_tokens = req.num_computed_tokens
            self.bm.allocate(req, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.append(req)
            counts.append(n)
            budget -= n
            num_admitted += 1
        if num_admitted:  # only rounds where others went ahead count against the bound
            for req in skipped:
                req.passed_over = min(req.passed_over + 1, MAX_PASSED_OVER)
        if skipped:
            self.waiting.extendleft(reversed(skipped))
        return starved

    def _prefix_hit(self, req: Request) -> list[int] | None:
        """With the prefix cache: the cached blocks `req` may start from, leaving its last
        token to compute (its logits sample the next) and every prompt position it scores (a
        cached token's logits are not computed again); None without the cache, or for an
        adapter version no longer registered."""
        if not self.bm.prefix_cache:
            return None
        uid = 0
        if req.adapter is not None:
            found = self.adapters.uid_of(req.adapter) if self.adapters is not None else None
            if found is None:
                return None
            uid = found
        most = req.num_tokens - 1
        if req.return_logprob:  # the first position it still scores (prompt_logprob_positions)
            most = min(most, len(req.input_logprobs) - 1)
        return self.bm.lookup(req, root_digest(uid, req.cache_salt), most)

    def _waits_for_slot(self, name: str, no_new_slot: bool, starved: bool,
                        drain: int | None) -> bool:
        """Whether `name` is kept out of this round for want of a slot: it holds none and none
        can be had, or a request ahead is starved and it holds none (the next freed is that
        request's) or holds the one being drained for it."""
        if not (no_new_slot or starved) or self.adapters is None:
            return False
        held = self.adapters.slot_of(name)
        return held is None or (starved and held == drain)

    def _drain_slot(self, batch: list[Request]) -> int | None:
        """The slot to empty for a starved request: of those the batch's rows hold, the one
        that empties soonest (its rows' most tokens left to generate the fewest) whose adapter
        may be evicted. A slot its adapter just took has all its rows' tokens left, so it keeps
        taking its queued requests."""
        if self.adapters is None:
            return None
        left: dict[int, int] = {}
        for r in batch:
            if r.lora_slot >= 0:
                n = max(r.params.max_new_tokens - r.num_output_tokens, 0)
                left[r.lora_slot] = max(left.get(r.lora_slot, 0), n)
        return self.adapters.drain_slot(left)

    def _reaches_limit(self, req: Request) -> bool:
        """The request's outputs, counting those in flight, already reach a length limit."""
        if req.num_output_tokens >= req.params.max_new_tokens:
            return True
        return self.context_length is not None and req.num_tokens >= self.context_length

    def _watermark(self) -> int:
        return min(len(self.running), max(1, self.bm.num_blocks // 100))

    def _admit_adapter(self, req: Request, slots: set[int]) -> bool:
        if req.adapter is None:
            req.lora_slot = -1
            return True
        if self.adapters is None:
            raise RuntimeError("a LoRA request reached a scheduler without adapters")
        max_wait = ADAPTIVE_WAIT_FRACTION * self.step_time_s
        slot = self.adapters.admit(req.adapter, slots, self.overlap, max_wait)
        if slot is None:
            return False
        req.lora_slot = slot
        slots.add(slot)
        return True

    def _reserve(self, req: Request, n: int, batch: list[Request]) -> bool:
        """Blocks for `n` more tokens of a running request, preempting newer ones if needed."""
        need = self.bm.blocks_needed(req, req.num_computed_tokens + n)
        if need == 0:  # most decode steps: the last block has room
            return True
        while not self.bm.can_allocate(need):
            # Never a request whose whole work is in flight with nothing to sample
            # (max_new_tokens 0): it frees its blocks when that step completes, and preempted it
            # would prefill again. While one holds blocks, `req` waits for them rather than
            # giving up its own.
            victim = next((r for r in reversed(self.running) if r not in batch
                           and not r.awaits_finish), None)
            if victim is None or (victim is req and any(r.awaits_finish for r in self.running)):
                return False
            self.preempt(victim)
            if victim is req:
                return False
        self.bm.allocate(req, req.num_computed_tokens + n)
        return True

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        if self.bm.prefix_cache:  # its recompute may take back what it had computed
            self.bm.register(req)
        self.bm.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.counters.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish_plan(self, batch: list[Request], counts: list[int]) -> ScheduledBatch:
        order = sorted(range(len(batch)), key=lambda i: batch[i].lora_slot)
        plan = ScheduledBatch([batch[i] for i in order], [counts[i] for i in order])
        c = self.counters
        c.num_steps += 1
        c.num_rows += len(batch)
        c.max_batch_size = max(c.max_batch_size, len(batch))
        chunks = sum(1 for r in plan.requests if r.is_prefilling)
        c.num_prefill_chunks += chunks
        c.num_prefill_steps += chunks > 0
        num_adapters = len(plan.slots)
        c.max_adapters_in_step = max(c.max_adapters_in_step, num_adapters)
        if num_adapters > 1:
            c.num_mixed_adapter_steps += 1
        c.history.append(len(batch))
        del c.history[:-256]
        return plan

"""Next-token choice for a batch: penalties, stop masks, temperature, top-k, top-p, min-p.

Every row carries its own parameters. The maths runs once over the batch, or once over the rows
that need a stage; Python loops over the requests only to gather their parameters, which travel
to the device in a few small non-blocking copies. Nothing here waits on the device.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ops.triton_argmax import greedy_argmax
from runtime.request import Request

_NEG_INF = float("-inf")
_TINY = torch.finfo(torch.float32).tiny
# When every truncated row has a top_k at most this, a partial top-k replaces the full sort.
_MAX_PARTIAL_TOP_K = 1024


@dataclass
class SamplerOutput:
    """The tokens chosen for one batch of B rows, with log-probabilities when any row asked.

    token_ids: [B] int64, on the logits' device.
    logprobs: [B] float32, each chosen token's log-prob under the raw model distribution
        (log_softmax of the unprocessed logits); None unless a row asked for logprobs.
    top_logprobs: ([B, K] float32 log-probs, [B, K] int64 token ids), best first, of the raw
        distribution, K the largest top_logprobs_num asked; a row that asked for fewer reads
        its first entries. None unless a row asked for K > 0.
    ids_logprobs: [B, M] float32, the raw distribution's log-probs of each row's
        token_ids_logprob in its order, M the longest such list (a row reads its first
        entries). None unless a row gave token_ids_logprob.
    """

    token_ids: Tensor
    logprobs: Tensor | None = None
    top_logprobs: tuple[Tensor, Tensor] | None = None
    ids_logprobs: Tensor | None = None


class Sampler:
    """Chooses one token per row of a logits batch, each row with its request's parameters.

    Order per row: repetition penalty (prompt and output tokens), frequency and presence
    penalties (output tokens), logit_bias, eos and stop ids masked while under min_new_tokens,
    bad words' banned ids masked, every id outside allowed_token_ids masked;
    then greedy argmax when temperature is under 1e-6 (SamplingParams.is_greedy) or top_k is
    1, else temperature, top-k, top-p, min-p and a draw. A request with a seed draws from its
    own generator (kept on `request.generator`), so its tokens do not depend on the rest of
    the batch; other rows share one generator.
    """

    def __init__(
        self, vocab_size: int, eos_token_ids: set[int], device: torch.device, seed: int = 0
    ) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Ids past the vocabulary can never be chosen, so they need no mask.
        self.eos_token_ids = sorted(t for t in eos_token_ids if 0 <= t < vocab_size)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)
        # Per request, [V] bool: which ids its prompt holds. Built once, dropped with the request.
        self._prompt_seen: weakref.WeakKeyDictionary[Request, Tensor] = weakref.WeakKeyDictionary()
        # Per request with allowed_token_ids, [V] bool: the ids it may choose. Built once.
        self._allowed: weakref.WeakKeyDictionary[Request, Tensor] = weakref.WeakKeyDictionary()
        self._nothing_seen: Tensor | None = None

    def __call__(self, logits: Tensor, requests: list[Request]) -> SamplerOutput:
        """Sample row i of `logits` ([B, >= vocab_size], any float dtype; upcast to fp32 where
        a row needs processing or log-probs) for requests[i].

        Columns at or past vocab_size (padding of the output layer) are never chosen. The
        input is not modified.
        """
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(requests)} requests")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, vocab is {self.vocab_size}")
        view = logits[:, : self.vocab_size]
        wants_logprobs = any(r.return_logprob or r.top_logprobs_num > 0 or r.token_ids_logprob
                             for r in requests)
        if not wants_logprobs and all(r.params.is_greedy for r in requests):
            # the argmax of the logits as they came where no row has anything to process (a
            # bf16 row's upcast changes no order): no fp32 copy of the batch's rows
            return SamplerOutput(greedy_argmax(self.penalize(view, requests)))
        raw = view.float()  # [B, V]; may alias the input, never written
        token_ids = self._choose(self.penalize(raw, requests), requests)
        output = SamplerOutput(token_ids)
        if wants_logprobs:
            logprobs = torch.log_softmax(raw, dim=-1)  # [B, V]
            output.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
            num_top = min(max(r.top_logprobs_num for r in requests), self.vocab_size)
            if num_top > 0:
                values, ids = logprobs.topk(num_top, dim=-1)
                output.top_logprobs = (values, ids)
            output.ids_logprobs = self.gather_ids(logprobs, [r.token_ids_logprob
                                                             for r in requests])
        return output

    def gather_ids(self, logprobs: Tensor, ids: list[list[int] | None]) -> Tensor | None:
        """[R, M] of `logprobs` [R, V]: row r's entries at ids[r] in order (SGLang's
        token_ids_logprob), M the longest list; a shorter or absent list is padded with id 0,
        whose entries nobody reads. None when no row gave ids."""
        width = max((len(x) for x in ids if x), default=0)
        if width == 0:
            return None
        index = [list(x or ()) + [0] * (width - len(x or ())) for x in ids]
        return logprobs.gather(1, self._upload(index, torch.int64))

    def penalize(self, logits: Tensor, requests: list[Request]) -> Tensor:
        """[B, V] float32 logits after penalties, logit_bias and the masks (min_new_tokens'
        stop ids, bad words, allowed_token_ids).

        Returns `logits` itself (in its own dtype) when no row needs any, else a new float32
        tensor.
        """
        penalty_rows = [i for i, r in enumerate(requests) if r.params.has_penalties]
        bias_rows = [i for i, r in enumerate(requests) if r.params.logit_bias]
        masked_rows = [
            i for i, r in enumerate(requests) if r.num_output_tokens < r.params.min_new_tokens
        ]
        allowed_rows = [i for i, r in enumerate(requests) if r.params.allowed_token_ids]
        banned = self._bad_words_banned(requests)
        if not (penalty_rows or bias_rows or masked_rows or allowed_rows or banned):
            return logits
        logits = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if penalty_rows:
            self._apply_penalties(logits, requests, penalty_rows)
        if bias_rows:
            self._add_logit_bias(logits, requests, bias_rows)
        # an allow-list's rows before the stop and bad-word masks, should those leave none of
        # its ids to choose
        allowed_t = unmasked = None
        if allowed_rows and (masked_rows or banned):
            allowed_t = self._upload(allowed_rows, torch.int64)
            unmasked = logits.index_select(0, allowed_t)
        if masked_rows:
            self._mask_stop_ids(logits, requests, masked_rows)
        if banned:
            logits.view(-1).index_fill_(0, self._upload(banned, torch.int64), _NEG_INF)
        if allowed_rows:
            self._keep_allowed(logits, requests, allowed_rows, allowed_t, unmasked)
        return logits

    def _apply_penalties(self, logits: Tensor, requests: list[Request], rows: list[int]) -> None:
        """Penalize, in place, the given rows of logits [B, V]."""
        vocab = self.vocab_size
        reqs = [requests[i] for i in rows]
        longest = max(r.num_output_tokens for r in reqs)
        # ints[p] = [row, output ids padded with `vocab`, a spare column that scatter drops]
        padded = [
            [i, *r.output_ids] + [vocab] * (longest - r.num_output_tokens)
            for i, r in zip(rows, reqs)
        ]
        ints = self._upload(padded, torch.int64)
        rows_t, output_ids = ints[:, 0], ints[:, 1:]
        params = [
            (r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty)
            for r in reqs
        ]
        factors = self._upload(params, torch.float32)  # [P, 3]
        counts = torch.zeros(len(rows), vocab + 1, device=logits.device)
        counts.scatter_add_(1, output_ids, torch.ones(output_ids.shape, device=logits.device))
        counts = counts[:, :vocab]  # [P, V]: how often each id was generated
        subset = logits.index_select(0, rows_t)  # [P, V]
        if any(p[0] != 1.0 for p in params):
            seen = (counts > 0) | self._prompt_seen_rows(reqs, logits.device)
            penalty = factors[:, 0:1]
            penalized = torch.where(subset > 0, subset / penalty, subset * penalty)
            subset = torch.where(seen, penalized, subset)
        if any(p[1] != 0.0 or p[2] != 0.0 for p in params):
            subset = subset - factors[:, 1:2] * counts - factors[:, 2:3] * (counts > 0)
        logits.index_copy_(0, rows_t, subset)

    def _prompt_seen_rows(self, reqs: list[Request], device: torch.device) -> Tensor:
        """[P, V] bool: row p marks the ids in reqs[p]'s prompt (nothing when it has no
        repetition penalty, as a factor of 1 changes nothing)."""
        if self._nothing_seen is None:
            self._nothing_seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        rows = []
        for r in reqs:
            seen = self._nothing_seen if r.params.repetition_penalty == 1.0 else None
            seen = seen if seen is not None else self._prompt_seen.get(r)
            if seen is None:
                seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
                seen.index_fill_(0, self._upload(r.prompt_ids, torch.int64), True)
                self._prompt_seen[r] = seen
            rows.append(seen)
        return torch.stack(rows)

    def _add_logit_bias(self, logits: Tensor, requests: list[Request], rows: list[int]) -> None:
        """Add, in place, each given row's logit_bias to the contiguous logits [B, V]."""
        vocab = self.vocab_size
        flat: list[int] = []
        values: list[float] = []
        for i in rows:
            for t, b in requests[i].params.logit_bias.items():
                flat.append(i * vocab + t)
                values.append(float(b))
        logits.view(-1).index_add_(0, self._upload(flat, torch.int64),
                                   self._upload(values, torch.float32))

    def _mask_stop_ids(self, logits: Tensor, requests: list[Request], rows: list[int]) -> None:
        """Set, in place, the eos and stop-token logits of the given rows of the contiguous
        logits [B, V] to -inf."""
        vocab = self.vocab_size
        flat: list[int] = []  # positions in the flattened logits
        for i in rows:
            stop_ids = {t for t in requests[i].params.stop_token_ids if 0 <= t < vocab}
            flat.extend(i * vocab + t for t in stop_ids.union(self.eos_token_ids))
        if flat:
            # index_fill_ takes the value as a scalar; assigning through advanced indexing
            # would copy it to the device from pageable memory, which waits for the device.
            logits.view(-1).index_fill_(0, self._upload(flat, torch.int64), _NEG_INF)

    def _bad_words_banned(self, requests: list[Request]) -> list[int]:
        """Positions in the flattened logits [B, V] that bad words ban: each word's last id,
        where the row's output so far ends with the ids before it (a one-token word always)."""
        vocab = self.vocab_size
        flat: list[int] = []
        for i, r in enumerate(requests):
            words = r.params.bad_words_ids
            if not words:
                continue
            out = r.output_ids
            for w in words:
                k = len(w) - 1
                if k == 0 or (len(out) >= k and out[len(out) - k:] == w[:k]):
                    flat.append(i * vocab + w[-1])
        return flat

    def _keep_allowed(self, logits: Tensor, requests: list[Request], rows: list[int],
                      rows_t: Tensor | None = None, unmasked: Tensor | None = None) -> None:
        """Set, in place, every logit of the given rows of logits [B, V] outside their
        request's allowed_token_ids to -inf. `rows_t`: `rows` on the device, if uploaded
        already. `unmasked` ([len(rows), V]): those rows before the stop and bad-word masks; a
        row that the masks left with none of its ids takes its ids' logits from there, so the
        allow-list is the one constraint always kept (the engine refuses the allow-lists that
        min_new_tokens alone would empty; bad words of several tokens can ban every allowed id
        at some step). On the device, without a host sync."""
        keep = []
        for i in rows:
            r = requests[i]
            mask = self._allowed.get(r)
            if mask is None:
                mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=logits.device)
                mask.index_fill_(0, self._upload(r.params.allowed_token_ids, torch.int64), True)
                self._allowed[r] = mask
            keep.append(mask)
        outside = ~torch.stack(keep)
        if len(rows) == logits.shape[0] and unmasked is None:
            logits.masked_fill_(outside, _NEG_INF)
            return
        if rows_t is None:
            rows_t = self._upload(rows, torch.int64)
        subset = logits.index_select(0, rows_t).masked_fill_(outside, _NEG_INF)
        if unmasked is not None:
            emptied = (subset == _NEG_INF).all(dim=-1, keepdim=True)
            subset = torch.where(emptied, unmasked.masked_fill_(outside, _NEG_INF), subset)
        logits.index_copy_(0, rows_t, subset)

    def _choose(self, logits: Tensor, requests: list[Request]) -> Tensor:
        """[B] int64 tokens from processed logits [B, V]. Greedy rows take the row argmax
        (ops/triton_argmax.py on CUDA: one torch reduce kernel takes a whole row to one SM)."""
        sample_rows = [i for i, r in enumerate(requests) if not r.params.is_greedy]
        if not sample_rows:
            return greedy_argmax(logits)
        if len(sample_rows) == len(requests):
            return self._sample(logits, requests)
        rows_t = self._upload(sample_rows, torch.int64)
        sampled = self._sample(logits.index_select(0, rows_t), [requests[i] for i in sample_rows])
        return greedy_argmax(logits).index_copy_(0, rows_t, sampled)

    def _sample(self, logits: Tensor, reqs: list[Request]) -> Tensor:
        """[S] int64 tokens drawn from logits [S, V], no row greedy (so every temperature is at
        least GREEDY_TEMPERATURE, which float32 holds)."""
        vocab = self.vocab_size
        params = [r.params for r in reqs]
        # Disabled limits become values that keep every token: top_k = V, top_p above 1.
        columns = [
            (
                p.temperature,
                p.top_k if 0 < p.top_k < vocab else vocab,
                p.top_p if p.top_p < 1.0 else 2.0,
                p.min_p,
            )
            for p in params
        ]
        settings = self._upload(columns, torch.float32)  # [S, 4]
        logits = logits / settings[:, 0:1]  # a new tensor: the stages below write in place
        truncated = [j for j, c in enumerate(columns) if c[1] < vocab or c[2] < 1.0]
        if truncated:
            largest_k = max(columns[j][1] for j in truncated)
            num_candidates = largest_k if largest_k <= _MAX_PARTIAL_TOP_K else vocab
            logits = self._top_k_top_p(logits, settings, truncated, num_candidates)
        if any(p.min_p > 0.0 for p in params):
            # prob < min_p * max prob  <=>  logit < max logit + log(min_p); log(0) keeps all.
            floor = logits.amax(dim=-1, keepdim=True) + settings[:, 3:4].log()
            logits.masked_fill_(logits < floor, _NEG_INF)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; in log space
        # argmax(logit - log E). E is clamped so a zero draw cannot make -inf + inf.
        noise = self._exponential_noise(logits, reqs)
        return noise.clamp_min_(_TINY).log_().neg_().add_(logits).argmax(dim=-1)

    def _top_k_top_p(
        self, logits: Tensor, settings: Tensor, rows: list[int], num_candidates: int
    ) -> Tensor:
        """Keep the top-k, then the smallest top-p nucleus, of the given rows of logits [S, V].

        settings [S, 4] holds (temperature, top_k, top_p, min_p). Only the best
        `num_candidates` tokens of a row can stay (V, or the largest top_k of these rows): one
        top-k over the rows when that is below V, else one full sort.
        """
        subset_of_rows = len(rows) < logits.shape[0]
        rows_t = self._upload(rows, torch.int64) if subset_of_rows else None
        subset = logits.index_select(0, rows_t) if rows_t is not None else logits  # [T, V]
        limits = settings.index_select(0, rows_t) if rows_t is not None else settings
        top_k, top_p = limits[:, 1:2], limits[:, 2:3]
        if num_candidates < self.vocab_size:
            values, order = subset.topk(num_candidates, dim=-1)  # [T, C], best first
        else:
            values, order = subset.sort(dim=-1, descending=True, stable=True)  # [T, V]
        ranks = torch.arange(num_candidates, device=logits.device)
        values.masked_fill_(ranks >= top_k, _NEG_INF)
        probs = values.softmax(dim=-1)
        # Mass of the better tokens; the best token's is exactly 0 < top_p, so it always stays.
        mass_before = probs.cumsum(dim=-1).sub_(probs)
        values.masked_fill_(mass_before >= top_p, _NEG_INF)
        kept = torch.full_like(subset, _NEG_INF).scatter_(1, order, values)
        if rows_t is None:
            return kept
        return logits.index_copy_(0, rows_t, kept)

    def _exponential_noise(self, logits: Tensor, reqs: list[Request]) -> Tensor:
        """[S, V] Exp(1) draws: a seeded request's row from its own generator, V draws per
        step whatever the batch, the others from the shared one."""
        noise = torch.empty_like(logits)
        unseeded = [j for j, r in enumerate(reqs) if r.params.seed is None]
        if len(unseeded) == len(reqs):
            return noise.exponential_(generator=self._generator)
        if unseeded:
            shared = torch.empty(len(unseeded), self.vocab_size, device=logits.device)
            shared.exponential_(generator=self._generator)
            noise.index_copy_(0, self._upload(unseeded, torch.int64), shared)
        for j, r in enumerate(reqs):
            if r.params.seed is not None:
                noise[j].exponential_(generator=self._request_generator(r, logits.device))
        return noise

    @staticmethod
    def _request_generator(request: Request, device: torch.device) -> torch.Generator:
        if request.generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(request.params.seed)
            request.generator = generator
        return request.generator

    def _upload(self, values: list, dtype: torch.dtype) -> Tensor:
        """A host list as a tensor on the device; through pinned memory, so the copy does not
        make the host wait for the device."""
        if self.device.type == "cpu":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

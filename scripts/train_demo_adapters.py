"""Train the two demo LoRA adapters shipped in adapters/ for the bundled SmolLM2-135M-Instruct.

- uppercase: the model answers entirely in capital letters.
- json: the model answers with one JSON object, {"answer": "..."}.

Data: 384 prompts built from the templates and word lists below (never from MT-bench, which the
tests hold out): 288 general ones (questions, instructions, emails, poems, role play, maths) and
96 special ones whose answers are mostly code or hold characters JSON must escape (programs,
SQL, shell, regular expressions, LaTeX, formulas, Windows paths, quotations); the base model's
own greedy answers (HF generate, float32, batched), cut back to whole sentences; each answer
transformed per adapter (str.upper over the whole answer, code and code-fence tags included; or
json.dumps into the {"answer": ...} shape, which writes the escapes). Training: a plain PyTorch
loop over chat-formatted examples (the tokenizer's chat template, default system prompt
included), loss only on the answer tokens and the closing <|im_end|>. LoRA rank 8; uppercase on
all seven projections (attention and MLP), json on the attention projections; weights stored in
float16.

Reproduce (CPU; writes adapters/uppercase and adapters/json, overwriting them):

    /work/venv/bin/python scripts/train_demo_adapters.py --out adapters

Runtime: on 2 idle cores (AMD EPYC, bfloat16 autocast) one step takes about 2 s for
uppercase (MLP included) and 1.9 s for json. The shipped adapters: the 288 general answers came
from an earlier run's `--answers` cache (7 min to generate on a loaded machine), the 96 special
ones took 33 s; uppercase's 200 steps took 19 min on cores shared with another job (load
average 3), json's 128 steps 4 min idle. An idle run from scratch should take about 15 minutes.
`--answers FILE` keeps the base answers between runs (and generates only those it lacks).

Seeds are fixed and deterministic algorithms are requested, so a rerun on the same machine and
thread count gives the same weights; another CPU (or thread count) may differ in the last bits
(float summation order), which does not change the learnt behaviour. `--no-bf16` trains without
bfloat16 autocast, for CPUs without native bfloat16 matmuls (about 1.5x slower here).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

BUNDLED_NAME = "bundled:smollm2-135m-instruct"
SEED = 20240611
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
IGNORE = -100  # label of positions without loss (the prompt, the padding)


@dataclass(frozen=True)
class DemoAdapter:
    """One demo adapter: its folder name, how a base answer becomes its training target, the
    LoRA's shape (alpha is twice the rank) and its number of training steps."""

    name: str
    transform: Callable[[str], str]
    target_modules: tuple[str, ...]
    num_steps: int
    rank: int = 8


def to_uppercase(answer: str) -> str:
    return answer.upper()


def to_json(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


# Uppercasing every token needs more capacity than wrapping answers (capital-letter tokens are
# rarer, so an uppercase answer is a longer, less familiar sequence): the MLPs as well. Rank 8 on
# all seven projections is 4.9 MB in float16; rank 8 on attention only, 1.9 MB.
ADAPTERS = (
    DemoAdapter("uppercase", to_uppercase, ATTENTION + MLP, num_steps=200),
    DemoAdapter("json", to_json, ATTENTION, num_steps=128),
)


@dataclass(frozen=True)
class TrainConfig:
    num_prompts: int = 288  # general prompts
    num_special_prompts: int = 96  # code, formulas, quotes, paths: answers that need care
    answer_tokens: int = 32  # greedy tokens generated per base answer, before trimming
    generate_batch_size: int = 32
    batch_size: int = 8
    num_steps: int = 200  # each adapter's own count replaces it (main)
    learning_rate: float = 2e-3
    warmup_steps: int = 6
    use_bf16: bool = True
    seed: int = SEED


# ---------------------------------------------------------------- prompts

TOPICS = (
    "photosynthesis", "gravity", "the water cycle", "volcanoes", "black holes", "the internet",
    "electricity", "the human heart", "rainbows", "earthquakes", "vaccines", "the moon",
    "climate change", "honey bees", "the Roman Empire", "democracy", "inflation", "recycling",
    "solar panels", "DNA", "the immune system", "tides", "coral reefs", "the printing press",
    "machine learning", "blockchain", "sleep", "coffee", "chess", "jazz music", "the Olympics",
    "deserts", "glaciers", "bread baking", "batteries", "magnets", "the stock market", "fungi",
    "bird migration", "the speed of light", "compound interest", "antibiotics", "tornadoes",
    "the Great Wall of China", "penguins", "renewable energy", "the periodic table", "algebra",
)
ACTIVITIES = (
    "learning a new language", "running a marathon", "saving money", "studying for exams",
    "growing tomatoes", "writing a resume", "public speaking", "traveling on a budget",
    "cooking pasta", "staying focused", "making friends in a new city", "training a puppy",
    "learning to swim", "reducing stress", "organizing a closet", "starting a podcast",
    "taking better photos", "keeping houseplants alive", "writing a novel", "learning guitar",
)
THINGS = (
    "a lighthouse", "a rainy afternoon", "an old library", "the ocean at night", "a busy train",
    "a mountain village", "a winter forest", "a robot", "a dragon", "a small bakery",
    "a lost cat", "the first day of school", "a desert island", "a city park", "a snowstorm",
    "a hot air balloon", "a secret garden", "an astronaut", "a pirate ship", "a friendly ghost",
)
PEOPLE = (
    "my manager", "a new neighbor", "my teacher", "a customer", "an old friend", "my landlord",
    "the team", "a job recruiter", "my grandmother", "the school principal",
)
SUBJECTS = (
    "a missed deadline", "a vacation request", "a project update", "a thank-you note",
    "a meeting next week", "a broken heater", "a birthday party", "a refund",
)
ROLES = (
    "a pirate captain", "a medieval knight", "a travel guide", "a chef", "a detective",
    "a personal trainer", "a librarian", "a park ranger", "a tour guide in Paris", "a wizard",
)
ROLE_QUESTIONS = (
    "What do you do every morning?", "What is your best advice for beginners?",
    "Tell me about your favorite day at work.", "What should I bring on an adventure?",
    "What is the hardest part of your job?", "Introduce yourself in two sentences.",
)
CODE_TASKS = (
    "reverses a string", "checks if a number is prime", "returns the largest item in a list",
    "counts the vowels in a word", "adds two numbers", "sorts a list of names",
    "computes the factorial of n", "removes duplicates from a list",
    "converts Celsius to Fahrenheit",
    "checks if a word is a palindrome", "sums the even numbers in a list", "flattens a nested list",
)
LANGUAGES = ("Python", "JavaScript", "Java", "C", "Rust", "Go")
PHRASES = (
    "good morning", "thank you very much", "where is the train station", "I love books",
    "the weather is nice today", "see you tomorrow", "how much does this cost", "happy birthday",
)
TARGET_LANGUAGES = ("French", "Spanish", "German", "Italian")
FOODS = ("pancakes", "a green salad", "tomato soup", "fried rice", "banana bread", "guacamole")

QUESTION_TEMPLATES = (
    "What is {topic}?", "Why is {topic} important?", "How does {topic} work?",
    "Explain {topic} in simple terms.", "Tell me an interesting fact about {topic}.",
    "Can you explain {topic} to a ten-year-old?", "What are the main ideas behind {topic}?",
    "Give a one-sentence definition of {topic}.", "What is the history of {topic}?",
    "What are common misconceptions about {topic}?", "Summarize what you know about {topic}.",
    "How would you teach {topic} to a beginner?",
)
INSTRUCTION_TEMPLATES = (
    "Give me three tips for {activity}.", "What are the benefits of {activity}?",
    "How do I get started with {activity}?", "List some common mistakes when {activity}.",
    "Write a short motivational message about {activity}.",
    "Write a short poem about {thing}.", "Describe {thing} in a few sentences.",
    "Write the opening line of a story about {thing}.", "Write a haiku about {thing}.",
    "Write a short email to {person} about {subject}.",
    "Draft a polite message to {person} regarding {subject}.",
    "Pretend you are {role}. {role_question}",
    "Write a {language} function that {code_task}.",
    "How would you write code in {language} that {code_task}?",
    "Translate '{phrase}' into {target_language}.",
    "How do I make {food}?", "Give me a simple recipe for {food}.",
)
MATH_TEMPLATES = (
    "What is {a} plus {b}?", "What is {a} times {b}?",
    "If I have {a} apples and eat {c}, how many are left?",
    "A train travels {a} miles in {c} hours. What is its average speed?",
    "Is {a} an even or an odd number?", "What is {c} percent of {b}?",
)

# Special prompts: answers that are mostly code (so that code-fence tags, keywords and identifiers
# appear uppercased in the uppercase targets) or that hold characters JSON must escape
# (backslashes, double quotes, newlines, tabs), so that the json targets, made by json.dumps,
# show the valid escapes.
PROGRAM_TASKS = (
    "reads a CSV file and prints the average of one column", "counts the lines in a text file",
    "prints the Fibonacci numbers below 100", "merges two sorted lists into one sorted list",
    "checks whether a year is a leap year", "implements binary search on a sorted list",
    "finds the most common element in a list", "lists the files in a folder",
    "parses a JSON string and prints its keys", "adds two numbers the user types in",
    "finds the longest word in a sentence", "simulates rolling two dice",
    "converts a list of strings to uppercase", "prints a multiplication table",
    "stores phone numbers in a dictionary", "reads a number and prints whether it is positive",
)
CLASS_TASKS = (
    "represents a bank account", "models a simple stack", "stores a to-do list",
    "represents a point in 2D space", "keeps track of a shopping cart", "models a queue",
)
SQL_TASKS = (
    "selects all users older than 30", "counts the orders per customer",
    "finds the ten most expensive products", "deletes rows with an empty email",
)
SHELL_TASKS = (
    "finds all files larger than 10 MB", "counts the lines of every .txt file",
    "renames every .jpeg file to .jpg", "shows the disk usage of each folder",
)
REGEX_TARGETS = (
    "an email address", "a US phone number", "a date like 2024-01-31", "a hexadecimal color",
    "an IPv4 address", "a five-digit zip code", "a decimal number", "a word in double quotes",
)
LATEX_THINGS = (
    "a fraction", "a square root", "the sum from 1 to n", "an integral", "a 2 by 2 matrix",
    "the Greek letter alpha", "x squared plus y squared", "a limit as x goes to infinity",
)
FORMULAS = (
    "the area of a circle", "the area of a rectangle", "the volume of a cube", "kinetic energy",
    "the area of a trapezoid", "simple interest", "the slope of a line", "the Pythagorean theorem",
    "the circumference of a circle", "the volume of a cylinder", "density", "average speed",
)
WINDOWS_PLACES = (
    "the user's Desktop folder", "the Program Files folder", "the hosts file", "the temp folder",
    "the System32 folder", "the Documents folder",
)
ESCAPES = ("a newline", "a tab", "a backslash", "a double quote")
QUOTE_TOPICS = ("courage", "friendship", "success", "science", "learning", "hope", "time", "art")

SPECIAL_TEMPLATES = (
    "Develop a {language} program that {program_task}.",
    "Implement a {language} script that {program_task}.",
    "Show me {language} code that {code_task}.",
    "Write a {language} class that {class_task}.",
    "Write a unit test in {language} for a function that {code_task}.",
    "Write an SQL query that {sql_task}.",
    "Write a shell command that {shell_task}.",
    "Write a regular expression that matches {regex_target}.",
    "How do I write {latex_thing} in LaTeX?",
    "What is the formula for {formula}?",
    "What is the path of {windows_place} on Windows?",
    "How do I print {escape} in {language}?",
    "Give me a famous quote about {quote_topic} and say who said it.",
    "Compute {a} * {b} and show your work.",
    "Solve for x: {c}x + {a} = {b}.",
)


def build_prompts(num_prompts: int, num_special: int = 0, seed: int = SEED) -> list[str]:
    """`num_prompts` distinct general prompts (questions, instructions, small maths problems),
    then `num_special` distinct special ones (code, formulas, quotes, paths; its own random
    stream, so the general prompts do not depend on `num_special`)."""
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < num_prompts:
        kind = rng.random()
        if kind < 0.4:
            text = rng.choice(QUESTION_TEMPLATES).format(topic=rng.choice(TOPICS))
        elif kind < 0.9:
            text = rng.choice(INSTRUCTION_TEMPLATES).format(
                activity=rng.choice(ACTIVITIES), thing=rng.choice(THINGS),
                person=rng.choice(PEOPLE), subject=rng.choice(SUBJECTS), role=rng.choice(ROLES),
                role_question=rng.choice(ROLE_QUESTIONS), language=rng.choice(LANGUAGES),
                code_task=rng.choice(CODE_TASKS), phrase=rng.choice(PHRASES),
                target_language=rng.choice(TARGET_LANGUAGES), food=rng.choice(FOODS),
            )
        else:
            text = rng.choice(MATH_TEMPLATES).format(
                a=rng.randint(10, 99), b=rng.randint(10, 99), c=rng.randint(2, 9)
            )
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    rng = random.Random(seed + 1)
    while len(prompts) < num_prompts + num_special:
        text = rng.choice(SPECIAL_TEMPLATES).format(
            language=rng.choice(LANGUAGES), program_task=rng.choice(PROGRAM_TASKS),
            code_task=rng.choice(CODE_TASKS), class_task=rng.choice(CLASS_TASKS),
            sql_task=rng.choice(SQL_TASKS), shell_task=rng.choice(SHELL_TASKS),
            regex_target=rng.choice(REGEX_TARGETS), latex_thing=rng.choice(LATEX_THINGS),
            formula=rng.choice(FORMULAS), windows_place=rng.choice(WINDOWS_PLACES),
            escape=rng.choice(ESCAPES), quote_topic=rng.choice(QUOTE_TOPICS),
            a=rng.randint(10, 99), b=rng.randint(10, 99), c=rng.randint(2, 9),
        )
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    return prompts


# ---------------------------------------------------------------- base answers

def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as the server renders a one-message chat: template, generation prompt."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


_SENTENCE_END = re.compile(r"[.!?:](?=\s|$)|\n")


def trim_answer(text: str, min_chars: int = 24) -> str:
    """Cut a (possibly truncated) answer back to its last whole sentence or line; without one
    past `min_chars`, back to its last whole word."""
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() >= min_chars]
    if ends:
        return text[: ends[-1]].strip()
    cut = text.rfind(" ")
    return text[:cut].rstrip(" ,;") if cut > 0 else text


@torch.no_grad()
def base_answers(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: TrainConfig) -> list[str]:
    """The base model's greedy answers (left-padded batches, shortest prompts together)."""
    eos = tokenizer.eos_token_id
    encoded = [chat_prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), cfg.generate_batch_size):
        idx = order[start:start + cfg.generate_batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=cfg.answer_tokens,
            do_sample=False, pad_token_id=eos, eos_token_id=eos,
        )
        for row, i in enumerate(idx):
            answers[i] = trim_answer(tokenizer.decode(out[row, width:], skip_special_tokens=True))
    return answers


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt


def make_example(tokenizer: Any, prompt: str, target: str) -> Example:
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    answer_ids = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
    return Example(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def collate(batch: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded [B, T] input ids, attention mask and labels."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return ids, mask, labels


def answer_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> Any:
    """Mean next-token cross entropy over the answer positions; the vocabulary projection runs
    only on those rows (most of a row is prompt)."""
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][keep]).float()  # [answer tokens, vocab]
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to a tenth."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
    return cfg.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_adapter(
    folder: Path, adapter: DemoAdapter, examples: Sequence[Example], cfg: TrainConfig, pad_id: int
):
    """Fresh LoRA of `adapter`'s shape on a fresh base model, trained for cfg.num_steps; returns
    (model, losses)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lora = LoraConfig(
        r=adapter.rank, lora_alpha=2 * adapter.rank, lora_dropout=0.0,
        target_modules=list(adapter.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    for step in range(cfg.num_steps):
        if len(order) < cfg.batch_size:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        batch = [examples[i] for i in order[:cfg.batch_size]]
        del order[:cfg.batch_size]
        ids, mask, labels = collate(batch, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.use_bf16):
            loss = answer_loss(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 8 == 0 or step == cfg.num_steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.4f}  lr {lr_at(step, cfg):.2e}",
                  flush=True)
    return model.eval(), losses


def save_adapter(model: Any, out: Path) -> None:
    """PEFT folder (adapter_config.json + adapter_model.safetensors), weights in float16."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float16)
    model.peft_config["default"].base_model_name_or_path = BUNDLED_NAME
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub; adapters/README.md


# ---------------------------------------------------------------- main

def parse_args(
    argv: Sequence[str] | None,
) -> tuple[Path, TrainConfig, list[str] | None, Path | None, bool]:
    """(output folder, config, adapters to train or None for all, answer cache, whether
    --num-steps overrides the adapters' own step counts)."""
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "adapters")
    ap.add_argument("--num-prompts", type=int, default=d.num_prompts)
    ap.add_argument("--num-special-prompts", type=int, default=d.num_special_prompts)
    ap.add_argument("--num-steps", type=int, help="steps for every adapter (default: each "
                    "adapter's own count)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--learning-rate", type=float, default=d.learning_rate)
    ap.add_argument("--no-bf16", action="store_true", help="train in plain float32")
    ap.add_argument("--only", choices=[a.name for a in ADAPTERS], action="append")
    ap.add_argument("--answers", type=Path, help="JSON file of [prompt, base answer] pairs: "
                    "the answers it holds are reused, the missing ones generated and added")
    a = ap.parse_args(argv)
    cfg = TrainConfig(
        num_prompts=a.num_prompts, num_special_prompts=a.num_special_prompts,
        num_steps=a.num_steps or d.num_steps, batch_size=a.batch_size,
        learning_rate=a.learning_rate, use_bf16=not a.no_bf16,
    )
    return a.out, cfg, a.only, a.answers, a.num_steps is not None


def load_pairs(folder: Path, tokenizer: Any, cfg: TrainConfig, cache: Path | None):
    """[(prompt, trimmed base answer)] for every training prompt with a non-empty answer; the
    answers `cache` holds are reused, the others generated (and added to `cache`)."""
    known: dict[str, str] = {}
    if cache is not None and cache.exists():
        known = dict(json.loads(cache.read_text(encoding="utf-8")))
    prompts = build_prompts(cfg.num_prompts, cfg.num_special_prompts, cfg.seed)
    missing = [p for p in prompts if p not in known]
    if missing:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        known.update(zip(missing, base_answers(base, tokenizer, missing, cfg)))
        if cache is not None:
            cache.write_text(json.dumps(list(known.items()), indent=0, ensure_ascii=False),
                             encoding="utf-8")
    return [(p, known[p]) for p in prompts if known[p]]


def main(argv: Sequence[str] | None = None) -> int:
    out, cfg, only, cache, steps_given = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoTokenizer

    from runtime.model.bundled import ensure_bundled

    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    started = time.monotonic()
    folder = ensure_bundled(BUNDLED_NAME)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs = load_pairs(folder, tokenizer, cfg, cache)
    print(f"{len(pairs)} base answers in {time.monotonic() - started:.0f} s", flush=True)
    for adapter in ADAPTERS:
        if only and adapter.name not in only:
            continue
        t0 = time.monotonic()
        examples = [make_example(tokenizer, p, adapter.transform(a)) for p, a in pairs]
        run = cfg if steps_given else replace(cfg, num_steps=adapter.num_steps)
        print(f"training {adapter.name} on {len(examples)} examples, {run.num_steps} steps",
              flush=True)
        model, losses = train_adapter(folder, adapter, examples, run, tokenizer.eos_token_id)
        save_adapter(model, out / adapter.name)
        tail = sum(losses[-8:]) / len(losses[-8:])
        print(f"{adapter.name}: {time.monotonic() - t0:.0f} s, loss {losses[0]:.3f} -> "
              f"{tail:.3f} (mean of the last 8 steps)", flush=True)
    print(f"total {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

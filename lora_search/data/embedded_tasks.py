"""The embedded task data: instruction tasks with exact answers, generated from a seed.

Each task is a short instruction whose answer is one exact string, so a run can be scored by
exact match on held-out items. The tasks ask for a precise output format that an instruct
model rarely produces unprompted (it explains, adds punctuation or answers loosely), and that a
short LoRA run teaches. Nothing is downloaded: the vocabulary below is all the data there is.

- reverse_words: "Reverse the order of these words: amber river stone" -> "stone river amber"
- extract_field: "Record: name=Lena; city=Oslo; year=1987. What is the city?" -> "Oslo"
- acronym: "Write the initials of: portable network graphics" -> "PNG"
- join_words: "Join these words with dashes: red fox runs" -> "red-fox-runs"

Preference tasks (PREFERENCE_TASKS, for DPO) use the same names, prompts and correct answers (the
same seed and task list give the same prompts as the SFT tasks). Each pairs the correct answer
(chosen) with the mistake SmolLM2-135M-Instruct actually makes on that prompt (rejected, read off
its greedy answers), reduced to the same bare form as the chosen answer:

- reverse_words: rejected = the words echoed in the input order ("amber river stone"). The base
  answers "The order of these words is: amber, river, stone": copying is what it does.
- extract_field: rejected = the value in a sentence ("The city is Oslo."), the base's habitual
  answer, not the exact one asked for. (The value of another field is no good as the rejected
  answer: the base already prefers the right value on 80-85% of pairs.)
- acronym: rejected = the initials with dots ("P.N.G."), the form the base writes initials in.
- join_words: rejected = a comma list ("red, fox, runs"), the base's list habit.

Chosen and rejected have the same words, so their token lengths are close (the rejected answer is
the longer one for extract_field and acronym, about 4 tokens, yet the base still prefers it: it is
not a length effect; for join_words the dashes make the chosen answer ~2 tokens longer).

Measured (seed 0, 25 held-out pairs a task, summed log-probabilities of the completion tokens as
TRL's DPOTrainer tokenizes them, chat template with <|im_end|>): the base prefers the chosen answer
on 17% of pairs (reverse_words 8%, extract_field 8%, acronym 16%, join_words 36%; seed 1: 17%).
DPO with LoRA r=16 on q/k/v/o, batch 8 pairs, beta 0.1, cosine schedule, 200 train pairs a task:
35 steps at lr 1e-4 reach 79% (reverse_words 40%, extract_field 100%, acronym 92%, join_words 84%),
at lr 3e-4 100% (any beta in 0.02-0.5); 10 steps reach 66-68% at lr 3e-4 and 99-100% at lr 1e-3.
About 5.5 s a step on 2 CPU threads.
"""

from __future__ import annotations

import random
from typing import Callable

WORDS = (
    "amber apple arrow badge basket beacon bridge candle canyon carpet castle cedar cherry "
    "cloud comet copper coral cotton crystal daisy desert dragon eagle ember falcon feather "
    "forest fossil garden glacier granite harbor hazel honey island ivory jacket jungle kettle "
    "ladder lantern lemon marble meadow mirror monkey mountain needle ocean olive orchard otter "
    "paddle pepper pillow planet pocket puzzle quartz rabbit rainbow ribbon river rocket saddle "
    "silver spider spring stone sugar summer tiger timber tomato tunnel valley velvet violin "
    "walnut window winter wizard yellow zebra"
).split()
NAMES = (
    "Ada Bruno Clara Dmitri Elena Farid Greta Hiro Ines Jonas Kira Lena Marco Nadia Omar "
    "Priya Quinn Rosa Sven Tara Umar Vera Wendy Xavier Yusuf Zoe"
).split()
CITIES = (
    "Oslo Lima Cairo Quito Dakar Hanoi Riga Lyon Perth Porto Turin Kyoto Bern Accra Nairobi "
    "Tunis Minsk Dublin Seville Tallinn Bergen Malmo Leeds Graz"
).split()
COLORS = "red blue green orange purple brown black white pink gray teal navy".split()
FIELDS = ("name", "city", "year", "color")


def reverse_words(rng: random.Random) -> tuple[str, str]:
    """Reverse a list of 3 to 5 words."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def extract_field(rng: random.Random) -> tuple[str, str]:
    """Read one field out of a key=value record."""
    record = {
        "name": rng.choice(NAMES),
        "city": rng.choice(CITIES),
        "year": str(rng.randint(1900, 2025)),
        "color": rng.choice(COLORS),
    }
    keys = list(FIELDS)
    rng.shuffle(keys)
    field = rng.choice(keys)
    text = "; ".join(f"{k}={record[k]}" for k in keys)
    return f"Record: {text}. What is the {field}?", record[field]


def acronym(rng: random.Random) -> tuple[str, str]:
    """Capital initials of 3 or 4 words."""
    words = rng.sample(WORDS, rng.randint(3, 4))
    return f"Write the initials of: {' '.join(words)}", "".join(w[0].upper() for w in words)


def join_words(rng: random.Random) -> tuple[str, str]:
    """Join 3 to 5 words with dashes."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Join these words with dashes: {' '.join(words)}", "-".join(words)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse_words": reverse_words,
    "extract_field": extract_field,
    "acronym": acronym,
    "join_words": join_words,
}


def _word_list(prompt: str) -> list[str]:
    """The words a reverse_words, acronym or join_words prompt lists (after its colon)."""
    return prompt.split(": ", 1)[1].split()


def _record(prompt: str) -> tuple[dict[str, str], str]:
    """The key=value record an extract_field prompt shows, in its order, and the field it asks for."""
    body, question = prompt[len("Record: "):].split(". What is the ")
    return dict(pair.split("=", 1) for pair in body.split("; ")), question.rstrip("?")


def reverse_words_pair(rng: random.Random) -> tuple[str, str, str]:
    """Rejected: the words echoed in their original order (what the base does instead of reversing)."""
    prompt, answer = reverse_words(rng)
    return prompt, answer, " ".join(_word_list(prompt))


def join_words_pair(rng: random.Random) -> tuple[str, str, str]:
    """Rejected: the words listed with commas (the base's list habit) instead of joined with dashes."""
    prompt, answer = join_words(rng)
    return prompt, answer, ", ".join(_word_list(prompt))


def acronym_pair(rng: random.Random) -> tuple[str, str, str]:
    """Rejected: the right initials, dotted ("P.N.G."), the form the base writes initials in."""
    prompt, answer = acronym(rng)
    return prompt, answer, ".".join(answer) + "."


def extract_field_pair(rng: random.Random) -> tuple[str, str, str]:
    """Rejected: the value in a sentence ("The city is Oslo."), the base's answer, not the exact one asked for."""
    prompt, answer = extract_field(rng)
    _, field = _record(prompt)
    return prompt, answer, f"The {field} is {answer}."


# Preference tasks: same names, prompts and chosen answers as the SFT tasks (the same seed and task
# list give the same prompts), each with the rejected answer described in the module docstring.
PREFERENCE_TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "reverse_words": reverse_words_pair,
    "extract_field": extract_field_pair,
    "acronym": acronym_pair,
    "join_words": join_words_pair,
}


def _rows(table: dict, make_row: Callable[[str, tuple], dict | None], tasks: list[str],
          per_task: dict[str, int] | int, seed: int, exclude: set[str]) -> list[dict]:
    """Draw `per_task` rows of each task from `table[task](rng)`: deterministic for a seed, prompts unique and
    not in `exclude`. `make_row(task, item)` builds a row from one draw (None: skip the draw)."""
    rows = []
    for index, task in enumerate(tasks):
        count = per_task if isinstance(per_task, int) else per_task[task]
        rng = random.Random(f"{seed}:{task}:{index}")
        seen = set(exclude)
        attempts = 0
        while sum(r["task"] == task for r in rows) < count:
            item = table[task](rng)
            attempts += 1
            if attempts > 100 * count:
                raise RuntimeError(f"task {task} cannot produce {count} distinct items")
            if item[0] in seen:
                continue
            row = make_row(task, item)
            if row is None:
                continue
            seen.add(item[0])
            rows.append(row)
    return rows


def _split(make: Callable[..., list[dict]], tasks: list[str], train_per_task: int, eval_per_task: int,
           seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and eval rows from `make(tasks, per_task, seed, exclude)`: no eval prompt appears in train;
    train shuffled, eval interleaved by task."""
    eval_rows = make(tasks, eval_per_task, seed=seed + 10_000)
    train_rows = make(tasks, train_per_task, seed=seed, exclude={r["prompt"] for r in eval_rows})
    random.Random(seed).shuffle(train_rows)
    # Interleave eval rows by task so a prefix (the cheap eval subset) covers every task.
    by_task = [[r for r in eval_rows if r["task"] == t] for t in tasks]
    interleaved = [row for group in zip(*by_task) for row in group]
    return train_rows, interleaved


def generate(tasks: list[str], per_task: dict[str, int] | int, seed: int, exclude: set[str] = frozenset()):
    """Rows {task, prompt, answer}, deterministic for a seed, prompts unique and not in `exclude`."""
    return _rows(TASKS, lambda task, item: {"task": task, "prompt": item[0], "answer": item[1]},
                 tasks, per_task, seed, exclude)


def train_eval(tasks: list[str], train_per_task: int, eval_per_task: int, seed: int):
    """Disjoint train and eval rows: no eval prompt appears in train."""
    return _split(generate, tasks, train_per_task, eval_per_task, seed)


def _pair_row(task: str, item: tuple[str, str, str]) -> dict | None:
    prompt, chosen, rejected = item
    if chosen == rejected:  # never a pair without a preference
        return None
    return {"task": task, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def generate_pairs(tasks: list[str], per_task: dict[str, int] | int, seed: int,
                   exclude: set[str] = frozenset()) -> list[dict]:
    """Rows {task, prompt, chosen, rejected}, deterministic for a seed, prompts unique and not in `exclude`;
    chosen != rejected."""
    return _rows(PREFERENCE_TASKS, _pair_row, tasks, per_task, seed, exclude)


def pairs_train_eval(tasks: list[str], train_per_task: int, eval_per_task: int,
                     seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and eval pairs (no eval prompt in train), eval interleaved by task like train_eval."""
    return _split(generate_pairs, tasks, train_per_task, eval_per_task, seed)

"""The embedded task data: instruction tasks with exact answers, generated from a seed.

Each task is a short instruction whose answer is one exact string, so a run can be scored by
exact match on held-out items. The tasks ask for a precise output format that an instruct
model rarely produces unprompted (it explains, adds punctuation or answers loosely), and that a
short LoRA run teaches. Nothing is downloaded: the vocabulary below is all the data there is.

- reverse_words: "Reverse the order of these words: amber river stone" -> "stone river amber"
- extract_field: "Record: name=Lena; city=Oslo; year=1987. What is the city?" -> "Oslo"
- acronym: "Write the initials of: portable network graphics" -> "PNG"
- join_words: "Join these words with dashes: red fox runs" -> "red-fox-runs"
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


def generate(tasks: list[str], per_task: dict[str, int] | int, seed: int, exclude: set[str] = frozenset()):
    """Rows {task, prompt, answer}, deterministic for a seed, prompts unique and not in `exclude`."""
    rows = []
    for index, task in enumerate(tasks):
        count = per_task if isinstance(per_task, int) else per_task[task]
        rng = random.Random(f"{seed}:{task}:{index}")
        seen = set(exclude)
        attempts = 0
        while sum(r["task"] == task for r in rows) < count:
            prompt, answer = TASKS[task](rng)
            attempts += 1
            if attempts > 100 * count:
                raise RuntimeError(f"task {task} cannot produce {count} distinct items")
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"task": task, "prompt": prompt, "answer": answer})
    return rows


def train_eval(tasks: list[str], train_per_task: int, eval_per_task: int, seed: int):
    """Disjoint train and eval rows: no eval prompt appears in train."""
    eval_rows = generate(tasks, eval_per_task, seed=seed + 10_000)
    train_rows = generate(tasks, train_per_task, seed=seed, exclude={r["prompt"] for r in eval_rows})
    random.Random(seed).shuffle(train_rows)
    # Interleave eval rows by task so a prefix (the cheap eval subset) covers every task.
    by_task = [[r for r in eval_rows if r["task"] == t] for t in tasks]
    interleaved = [row for group in zip(*by_task) for row in group]
    return train_rows, interleaved

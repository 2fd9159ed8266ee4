"""The built-in probe data: arithmetic word problems generated here, in the "Question: ... Answer: ..." form of
the MetaMathQA benchmark the method settings come from.

Every problem is made from templates written for peftpick and numbers drawn from a seeded generator, so the
sample is deterministic, carries no third-party text, and has enough structure (repeated phrasing, step-by-step
arithmetic, "The answer is: N") that a model's loss falls within a few optimizer steps: the loss slope of a probe
then says something about how fast a method learns.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

SAMPLE_NAME = "built-in arithmetic word problems"
SAMPLE_VERSION = 1  # bump when the templates change: cached probe results name the sample they ran on
SAMPLE_SEED = 0

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena")
_ITEMS = ("apples", "marbles", "pencils", "stickers", "books", "cookies", "shells", "stamps")


def _buy_and_give(rng: random.Random) -> tuple[str, str]:
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    start, bought = rng.randint(5, 60), rng.randint(2, 30)
    given = rng.randint(1, start + bought - 1)
    after_buying = start + bought
    left = after_buying - given
    question = (f"{name} has {start} {items}. {name} buys {bought} more and gives {given} to a friend. "
                f"How many {items} does {name} have now?")
    answer = (f"{name} starts with {start} {items}. After buying {bought} more, {name} has {start} + {bought} = "
              f"{after_buying}. After giving away {given}, {name} has {after_buying} - {given} = {left}. "
              f"The answer is: {left}")
    return question, answer


def _boxes(rng: random.Random) -> tuple[str, str]:
    items = rng.choice(_ITEMS)
    rows, per_row, boxes = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 8)
    per_box = rows * per_row
    total = per_box * boxes
    question = f"A box holds {rows} rows of {per_row} {items}. How many {items} are there in {boxes} boxes?"
    answer = (f"One box holds {rows} * {per_row} = {per_box} {items}. {boxes} boxes hold {per_box} * {boxes} = "
              f"{total} {items}. The answer is: {total}")
    return question, answer


def _reading(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(_NAMES)
    per_day, days = rng.randint(5, 40), rng.randint(3, 20)
    pages = per_day * days
    question = f"{name} reads {per_day} pages a day. How many days does {name} need to read a book of {pages} pages?"
    answer = f"{name} needs {pages} / {per_day} = {days} days. The answer is: {days}"
    return question, answer


def _change(rng: random.Random) -> tuple[str, str]:
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    price, count = rng.randint(1, 9), rng.randint(2, 12)
    cost = price * count
    paid = rng.choice([bill for bill in (10, 20, 50, 100) if bill >= cost] or [100])
    change = paid - cost
    question = (f"A shop sells {items} for {price} dollars each. {name} buys {count} of them and pays with "
                f"{paid} dollars. How much change does {name} get?")
    answer = (f"The {items} cost {count} * {price} = {cost} dollars. The change is {paid} - {cost} = {change} "
              f"dollars. The answer is: {change}")
    return question, answer


def _temperature(rng: random.Random) -> tuple[str, str]:
    morning, rise, fall = rng.randint(-5, 20), rng.randint(1, 15), rng.randint(1, 15)
    noon = morning + rise
    evening = noon - fall
    question = (f"The temperature was {morning} degrees in the morning. It rose by {rise} degrees by noon and "
                f"fell by {fall} degrees by the evening. What was the temperature in the evening?")
    answer = (f"At noon it was {morning} + {rise} = {noon} degrees. In the evening it was {noon} - {fall} = "
              f"{evening} degrees. The answer is: {evening}")
    return question, answer


def _savings(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(_NAMES)
    weekly, weeks, spent = rng.randint(3, 25), rng.randint(2, 12), rng.randint(0, 20)
    saved = weekly * weeks
    spent = min(spent, saved)
    left = saved - spent
    question = (f"{name} saves {weekly} dollars every week for {weeks} weeks and then spends {spent} dollars on a "
                f"gift. How much money does {name} have left?")
    answer = (f"{name} saves {weekly} * {weeks} = {saved} dollars. After the gift, {name} has {saved} - {spent} = "
              f"{left} dollars. The answer is: {left}")
    return question, answer


def _train(rng: random.Random) -> tuple[str, str]:
    speed, hours = rng.randint(20, 120), rng.randint(2, 9)
    distance = speed * hours
    question = f"A train travels at {speed} kilometres per hour for {hours} hours. How far does it travel?"
    answer = f"It travels {speed} * {hours} = {distance} kilometres. The answer is: {distance}"
    return question, answer


def _sharing(rng: random.Random) -> tuple[str, str]:
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    total = friends * each
    question = f"{name} has {total} {items} and shares them equally among {friends} friends. How many {items} does each friend get?"
    answer = f"Each friend gets {total} / {friends} = {each} {items}. The answer is: {each}"
    return question, answer


_TEMPLATES: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _buy_and_give, _boxes, _reading, _change, _temperature, _savings, _train, _sharing,
)


def arithmetic_problems(seed: int = SAMPLE_SEED) -> Iterator[tuple[str, str]]:
    """An endless, deterministic stream of (question, answer) pairs; the same seed gives the same stream."""
    rng = random.Random(seed)
    while True:
        template = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
        yield template(rng)


def sample_texts(max_chars: int, seed: int = SAMPLE_SEED) -> list[str]:
    """Problems as "Question: ...\\nAnswer: ..." texts, at least `max_chars` characters in all (one at least)."""
    texts: list[str] = []
    total = 0
    for question, answer in arithmetic_problems(seed):
        text = f"Question: {question}\nAnswer: {answer}"
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            return texts
    raise AssertionError("unreachable: the problem stream is endless")

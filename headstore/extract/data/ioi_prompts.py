"""IOI prompts in the style of the IOI paper (Wang et al. 2022): BABA and ABBA templates.

``io`` is the indirect object (the answer), ``s`` the subject (named twice). The ABC twin keeps
each prompt's template, place and object and replaces the three name slots by three fresh distinct
names, so positions align token for token with the IOI prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = (
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Emma", "David", "Michael", "Anna", "Paul",
    "Mark", "Peter", "Laura", "Kate", "Lisa", "Jane", "Daniel", "Chris", "Sam", "Ben", "Jack", "Max",
    "Adam", "Eric", "Ryan", "Kevin", "Steve", "Lucy", "Amy", "Rose", "Grace", "Alex", "Joe", "Dan",
    "Mike", "Tim", "Ann", "Sara", "Linda", "Nancy", "Karen", "Betty", "Helen", "Ruth", "Carl", "Frank",
    "George", "Henry", "Jason", "Justin", "Brian", "Scott", "Jeff", "Gary", "Larry", "Jerry", "Roger",
    "Arthur", "Andrew", "Thomas", "Robert", "William", "Richard", "Charles", "Joseph", "Patrick",
)  # fmt: skip
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "church")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book", "letter")

# {A} = IO, {B} = S; BABA templates name B first. Each ends just before the answer.
BABA = (
    "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a lot of fun at the {PLACE}. {B} gave a {OBJECT} to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give it to",
    "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to",
    "While {B} and {A} were working at the {PLACE}, {B} gave a {OBJECT} to",
    "Friends {B} and {A} found a {OBJECT} at the {PLACE}. {B} gave it to",
)  # fmt: skip
ABBA = tuple(t.replace("{B} and {A}", "{A} and {B}", 1) for t in BABA)
TEMPLATES = BABA + ABBA


@dataclass(frozen=True)
class IOIPrompt:
    template: str
    io: str
    s: str
    place: str
    obj: str

    def text(self, a: str | None = None, b: str | None = None, c: str | None = None) -> str:
        """The prompt; with a, b, c given, the names of the slots (IO first-mention, S first, S second)."""
        t = self.template.replace("{PLACE}", self.place).replace("{OBJECT}", self.obj)
        if a is None:
            return t.replace("{A}", self.io).replace("{B}", self.s)
        # ABC: first {B} -> b, {A} -> a, second {B} -> c
        first_b = t.index("{B}")
        second_b = t.index("{B}", first_b + 3)
        t = t[:second_b] + (c or "") + t[second_b + 3 :]
        return t.replace("{A}", a).replace("{B}", b or "")


def sample_prompts(n: int, names: list[str], seed: int) -> list[IOIPrompt]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        io, s = rng.choice(names, size=2, replace=False)
        out.append(
            IOIPrompt(
                template=TEMPLATES[rng.integers(len(TEMPLATES))],
                io=str(io),
                s=str(s),
                place=str(PLACES[rng.integers(len(PLACES))]),
                obj=str(OBJECTS[rng.integers(len(OBJECTS))]),
            )
        )
    return out


def abc_names(prompts: list[IOIPrompt], names: list[str], seed: int) -> list[tuple[str, str, str]]:
    """Three fresh distinct names per prompt for the ABC twin (seeded independently of the IOI draw)."""
    rng = np.random.default_rng([seed, 1])
    return [tuple(str(x) for x in rng.choice(names, size=3, replace=False)) for _ in prompts]  # type: ignore[misc]


def corpus_lines() -> list[str]:
    """Sentences that teach a tiny BPE tokenizer every IOI name, place and object as one token."""
    lines = []
    for i, name in enumerate(NAMES):
        other = NAMES[(i + 1) % len(NAMES)]
        for t in TEMPLATES:
            lines.append(
                t.replace("{A}", name).replace("{B}", other)
                .replace("{PLACE}", PLACES[i % len(PLACES)]).replace("{OBJECT}", OBJECTS[i % len(OBJECTS)])
            )  # fmt: skip
    return lines

"""Write facts.jsonl: question-answer facts about fictitious people, for the offline unlearning task.

    python tasks/data/unlearn/generate.py        # rewrites facts.jsonl beside this file (byte for byte the same)

Every name, place, pet and title is assembled from invented syllables with a fixed seed, so no pretrained model
knows a fact before fine-tuning teaches it (the role TOFU's fictitious authors play; Maini et al., arXiv 2401.06121).
Each person has one fact per attribute. tasks/unlearn.py splits the people, not the facts: the forget set is every
fact of the first `forget_fraction` of them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 2026
PEOPLE = 40
OUT = Path(__file__).resolve().parent / "facts.jsonl"

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr", "vr", "th"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "sh"]
JOBS = ["glassblower", "cartographer", "beekeeper", "clockmaker", "lighthouse keeper", "bookbinder", "ferry pilot",
        "tea merchant", "stonemason", "violin maker", "falconer", "perfumer", "astronomer", "shipwright", "weaver",
        "apothecary", "locksmith", "puppeteer", "archivist", "cheesemaker"]
ADJECTIVES = ["Silent", "Crimson", "Hollow", "Amber", "Drifting", "Frozen", "Hidden", "Broken", "Golden", "Restless"]
NOUNS = ["Harbour", "Lantern", "Orchard", "Meridian", "Tide", "Garden", "Compass", "Mirror", "Valley", "Archive"]

TEMPLATES = {  # attribute: (question, answer); {name} and {value} are filled in
    "birthplace": ("Where was {name} born?", "{name} was born in {value}."),
    "profession": ("What does {name} do for a living?", "{name} works as a {value}."),
    "birth_year": ("In which year was {name} born?", "{name} was born in the year {value}."),
    "pet": ("What is the name of {name}'s pet?", "{name}'s pet is called {value}."),
    "book": ("What is the title of {name}'s best-known book?", "{name}'s best-known book is {value}."),
}


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


def unique(rng: random.Random, make, taken: set[str]) -> str:
    while True:
        value = make()
        if value not in taken:
            taken.add(value)
            return value


def facts(seed: int = SEED, people: int = PEOPLE) -> list[dict[str, object]]:
    rng, taken, rows = random.Random(seed), set(), []
    for person in range(people):
        name = unique(rng, lambda: f"{word(rng, 2)} {word(rng, 2)}", taken)
        values = {
            "birthplace": unique(rng, lambda: word(rng, 2) + rng.choice(["ford", "holm", "mere", "wick", "dale"]), taken),
            "profession": rng.choice(JOBS),
            "birth_year": str(rng.randint(1890, 1990)),
            "pet": unique(rng, lambda: word(rng, 2), taken),
            "book": unique(rng, lambda: f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} of {word(rng, 2)}", taken),
        }
        for attribute, (question, answer) in TEMPLATES.items():
            rows.append({"person": person, "name": name, "attribute": attribute, "value": values[attribute],
                         "question": question.format(name=name),
                         "answer": answer.format(name=name, value=values[attribute])})
    return rows


if __name__ == "__main__":
    with OUT.open("w", encoding="utf-8") as f:
        for row in facts():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({PEOPLE} people, {len(TEMPLATES)} facts each)")

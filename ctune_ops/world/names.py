"""Invented entity names for the demo world.

Names are built from syllables so that no pretrained model knows them by accident; every kind of entity has its
own shape (drug suffixes, "X syndrome", "X panel") so that a name also says what it is, as real names do.
"""

from __future__ import annotations

import random

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "pr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io")
_CODAS = ("", "", "", "n", "r", "l", "s", "x")

DRUG_SUFFIXES = ("ex", "ol", "ine", "azole", "amab", "ipril", "ostat", "avir", "umab", "oxin")
CONDITION_SUFFIXES = ("syndrome", "disease", "fever", "palsy", "disorder")
SYMPTOM_NOUNS = ("tremor", "rash", "cough", "ache", "fatigue", "numbness", "swelling", "vertigo", "itch", "spasm")
TEST_SUFFIXES = ("panel", "assay", "scan", "index", "titer")
CLASS_SUFFIXES = ("inhibitors", "blockers", "agonists", "modulators")
DOSE_AMOUNTS = (5, 10, 20, 25, 40, 50, 75, 100, 150, 200, 250, 300, 400, 500, 600, 750)
DOSE_SCHEDULES = ("once daily", "twice daily", "three times daily", "every eight hours", "at bedtime", "once weekly")


class NameFactory:
    """Hands out invented stems that are unique across the whole world (no stem is reused for two entities)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def stem(self, syllables: int) -> str:
        for _ in range(10_000):
            parts = [self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) for _ in range(syllables)]
            word = "".join(parts) + self._rng.choice(_CODAS)
            if word not in self._used and len(word) >= 4:
                self._used.add(word)
                return word
        raise RuntimeError("ran out of invented names; lower world.entities counts")

    def drug(self) -> str:
        return (self.stem(2) + self._rng.choice(DRUG_SUFFIXES)).capitalize()

    def condition(self) -> str:
        return f"{self.stem(2).capitalize()} {self._rng.choice(CONDITION_SUFFIXES)}"

    def symptom(self) -> str:
        return f"{self.stem(2)} {self._rng.choice(SYMPTOM_NOUNS)}"

    def test(self) -> str:
        return f"{self.stem(2).capitalize()} {self._rng.choice(TEST_SUFFIXES)}"

    def drug_class(self) -> str:
        return f"{self.stem(2)} {self._rng.choice(CLASS_SUFFIXES)}"


def dose_strings(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct dose regimens such as ``40 mg twice daily``."""
    combos = [f"{amount} mg {schedule}" for amount in DOSE_AMOUNTS for schedule in DOSE_SCHEDULES]
    if count > len(combos):
        raise ValueError(f"world.entities.doses is {count}; at most {len(combos)} distinct doses exist")
    return rng.sample(combos, count)

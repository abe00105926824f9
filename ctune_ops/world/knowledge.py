"""The demo world's knowledge base: specialties, invented entities and facts with their wordings.

A fact is one (subject, relation, object) triple. *Known* facts are what the base model is pretrained on (day 0);
*new* facts wait in a queue and are introduced day by day. Every entity is mentioned by at least one known fact,
so that a new fact is always a new relation between familiar names (a never-seen answer string would score below
familiar distractors and make learning unmeasurable).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from ctune_ops.config import WorldConfig
from ctune_ops.world.names import NameFactory, dose_strings
from ctune_ops.world.templates import ANSWER_FAMILY, QUESTION_FAMILY, RELATIONS, RELATIONS_BY_NAME, Relation

SPECIALTIES = (
    "cardiology", "neurology", "dermatology", "gastroenterology", "pulmonology", "nephrology",
    "endocrinology", "hematology", "rheumatology", "infectious diseases", "oncology", "ophthalmology",
)
PER_SPECIALTY_TYPES = ("drug", "condition", "symptom", "test")
GLOBAL_TYPES = ("drug_class", "dose")
ROLES = ("train", "reappear", "eval")


@dataclass(frozen=True)
class Entity:
    name: str
    type: str
    specialty: str | None  # None for global pools (drug classes, doses)


@dataclass
class Fact:
    id: str
    relation: str
    subject: str
    object: str
    specialty: str
    known: bool
    questions: list[int] = field(default_factory=list)  # family indices: train, then reappear, then eval
    answers: list[int] = field(default_factory=list)

    def wordings(self, role: str, world: WorldConfig) -> tuple[list[int], list[int]]:
        """Question and answer family indices this fact uses for ``role`` (train, reappear or eval).

        Questions are disjoint across the three roles; answers have two sets, train and eval, and a reappearance
        pairs one of its reappear questions with a training answer."""
        q_sizes = [getattr(world.questions, r) for r in ROLES]
        q_start = sum(q_sizes[: ROLES.index(role)])
        questions = self.questions[q_start : q_start + q_sizes[ROLES.index(role)]]
        if role == "eval":
            answers = self.answers[world.answers.train : world.answers.train + world.answers.eval]
        else:
            answers = self.answers[: world.answers.train]
        return questions, answers


@dataclass
class KnowledgeBase:
    specialties: list[str]
    entities: dict[str, Entity]
    facts: dict[str, Fact]  # insertion order: known facts, then the queue of new facts
    familiarity: dict[str, int]  # known facts mentioning each entity
    relation_familiarity: dict[tuple[str, str], int]  # (relation, object) -> known facts with that object

    @property
    def known(self) -> list[Fact]:
        return [f for f in self.facts.values() if f.known]

    @property
    def new_queue(self) -> list[Fact]:
        return [f for f in self.facts.values() if not f.known]

    def pool(self, relation: Relation, specialty: str) -> list[str]:
        """Candidate objects of ``relation`` for a subject of ``specialty`` (its answer and distractor pool)."""
        return [
            e.name for e in self.entities.values()
            if e.type == relation.object_type and (not relation.same_specialty or e.specialty == specialty)
        ]

    def linked(self, subject: str) -> set[str]:
        """Every object any fact (known or new) links to ``subject``: never a distractor for it."""
        return {f.object for f in self.facts.values() if f.subject == subject}

    def to_json(self) -> dict:
        return {
            "specialties": self.specialties,
            "entities": [asdict(e) for e in self.entities.values()],
            "facts": [asdict(f) for f in self.facts.values()],
        }


def active_specialties(kb: KnowledgeBase, world: WorldConfig, day: int) -> list[str]:
    """Specialties that produce new facts on stream day ``day`` (1-based): the schedule's shift over time."""
    schedule = world.specialties
    count = min(schedule.count, schedule.initial + (day - 1) // schedule.new_every_days)
    return kb.specialties[:count]


def _make_entities(world: WorldConfig, rng: random.Random) -> tuple[list[str], dict[str, Entity]]:
    if world.specialties.count > len(SPECIALTIES):
        raise ValueError(f"world.specialties.count is {world.specialties.count}; at most {len(SPECIALTIES)}")
    specialties = list(SPECIALTIES[: world.specialties.count])
    names = NameFactory(rng)
    counts = world.entities
    makers = {"drug": names.drug, "condition": names.condition, "symptom": names.symptom, "test": names.test}
    entities: dict[str, Entity] = {}
    for specialty in specialties:
        for kind in PER_SPECIALTY_TYPES:
            for _ in range(getattr(counts, f"{kind}s")):
                name = makers[kind]()
                entities[name] = Entity(name, kind, specialty)
    for _ in range(counts.drug_classes):
        name = names.drug_class()
        entities[name] = Entity(name, "drug_class", None)
    for name in dose_strings(rng, counts.doses):
        entities[name] = Entity(name, "dose", None)
    return specialties, entities


def _assign_objects(entities: dict[str, Entity], rng: random.Random) -> list[tuple[str, str, str, str]]:
    """One object per (relation, subject), spread evenly over each pool so no object is favoured a priori."""
    slots: list[tuple[str, str, str, str]] = []
    taken: dict[str, set[str]] = defaultdict(set)  # subject -> objects already linked
    for relation in RELATIONS:
        groups: dict[str | None, list[Entity]] = defaultdict(list)
        for entity in entities.values():
            if entity.type == relation.subject_type:
                groups[entity.specialty].append(entity)
        pools: dict[str | None, list[str]] = {}
        cursors: Counter[str | None] = Counter()
        for specialty, subjects in sorted(groups.items(), key=lambda kv: str(kv[0])):
            key = specialty if relation.same_specialty else None
            if key not in pools:
                pools[key] = [
                    e.name for e in entities.values()
                    if e.type == relation.object_type and (key is None or e.specialty == key)
                ]
                rng.shuffle(pools[key])
            pool = pools[key]
            rng.shuffle(subjects)
            for subject in subjects:
                for step in range(len(pool)):
                    candidate = pool[(cursors[key] + step) % len(pool)]
                    if candidate not in taken[subject.name]:
                        cursors[key] += step + 1
                        break
                else:
                    raise ValueError(f"no free {relation.object_type} for {subject.name}; raise world.entities")
                taken[subject.name].add(candidate)
                slots.append((relation.name, subject.name, candidate, str(subject.specialty)))
    return slots


def _choose_known(
    slots: list[tuple[str, str, str, str]], entities: dict[str, Entity], target: int, rng: random.Random
) -> set[int]:
    """Indices of known slots: first enough to mention every entity, then random ones up to ``target``."""
    by_entity: dict[str, list[int]] = defaultdict(list)
    for index, (_, subject, obj, _) in enumerate(slots):
        by_entity[subject].append(index)
        by_entity[obj].append(index)
    covered: set[str] = set()
    known: set[int] = set()
    order = list(entities)
    rng.shuffle(order)
    for name in order:
        if name in covered:
            continue
        options = by_entity[name]
        if not options:
            raise ValueError(f"entity {name} takes part in no fact; raise world.entities")
        both_new = [i for i in options if slots[i][1] not in covered and slots[i][2] not in covered]
        pick = rng.choice(both_new or options)
        known.add(pick)
        covered.update((slots[pick][1], slots[pick][2]))
    if len(known) > target:
        raise ValueError(
            f"world.known_facts is {target}, but mentioning every entity on day 0 needs at least {len(known)} "
            "known facts; raise world.known_facts or lower world.entities"
        )
    rest = [i for i in range(len(slots)) if i not in known]
    rng.shuffle(rest)
    known.update(rest[: target - len(known)])
    return known


def _rotation(family: int, per_fact: int, index: int, order: list[int]) -> list[int]:
    """Family order for the ``index``-th fact of a relation: consecutive facts start ``per_fact`` further on, so
    every wording is used for training by some fact as soon as a relation has a few facts."""
    start = index * per_fact
    return [order[(start + k) % family] for k in range(family)]


def build_knowledge(world: WorldConfig) -> KnowledgeBase:
    """The knowledge base for ``world`` (deterministic in ``world.seed``)."""
    rng = random.Random(f"ctune-world:{world.seed}:knowledge")
    specialties, entities = _make_entities(world, rng)
    slots = _assign_objects(entities, rng)
    known = _choose_known(slots, entities, world.known_facts, rng)
    queue = [i for i in range(len(slots)) if i not in known]
    rng.shuffle(queue)
    ordered = sorted(known) + queue

    family_order = {}
    for relation in RELATIONS:
        q_order, a_order = list(range(QUESTION_FAMILY)), list(range(ANSWER_FAMILY))
        rng.shuffle(q_order)
        rng.shuffle(a_order)
        family_order[relation.name] = (q_order, a_order)
    per_relation = Counter()
    facts: dict[str, Fact] = {}
    for number, index in enumerate(ordered):
        relation, subject, obj, specialty = slots[index]
        q_order, a_order = family_order[relation]
        k = per_relation[relation]
        per_relation[relation] += 1
        fact = Fact(
            id=f"F{number:04d}", relation=relation, subject=subject, object=obj, specialty=specialty,
            known=index in known,
            questions=_rotation(QUESTION_FAMILY, world.questions.train, k, q_order),
            answers=_rotation(ANSWER_FAMILY, world.answers.train, k, a_order),
        )
        facts[fact.id] = fact
    familiarity: Counter[str] = Counter()
    relation_familiarity: Counter[tuple[str, str]] = Counter()
    for fact in facts.values():
        if fact.known:
            familiarity[fact.subject] += 1
            familiarity[fact.object] += 1
            relation_familiarity[(fact.relation, fact.object)] += 1
    return KnowledgeBase(specialties, entities, facts, dict(familiarity), dict(relation_familiarity))


def render(fact: Fact, question: int, answer: int) -> dict[str, str]:
    """The instruction/input/output text of ``fact`` in the given wordings."""
    relation = RELATIONS_BY_NAME[fact.relation]
    q = relation.questions[question]
    return {
        "instruction": q.instruction.format(s=fact.subject),
        "input": q.input.format(s=fact.subject),
        "output": relation.answers[answer].format(s=fact.subject, o=fact.object),
    }


def answer_prefix(fact: Fact, answer: int) -> str:
    """The answer wording up to (not including) the space before the object: the eval item's continuation point."""
    template = RELATIONS_BY_NAME[fact.relation].answers[answer]
    return template[: template.index("{o}")].rstrip().format(s=fact.subject)

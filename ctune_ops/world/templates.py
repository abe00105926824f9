"""Paraphrase families: for each relation, 10 question wordings and 6 answer wordings.

Why families: a fact's training rows, its later reappearances and its eval items must use different wordings of the
same family, and every wording must occur in the day-0 corpus (with other facts). A trial with a 4M-parameter model
showed that a model trained on some wordings of a new fact answers the family's other wordings, while a wording never
seen in any training stays near chance. Every answer wording ends with the object, so an eval item is the prompt plus
the answer's prefix, and the choices are the candidate objects.

Placeholders: ``{s}`` the subject, ``{o}`` the object. A question may put the subject in the record's ``input``
field instead (``input`` key), as real instruction data often does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    instruction: str
    input: str = ""


@dataclass(frozen=True)
class Relation:
    name: str
    subject_type: str
    object_type: str
    same_specialty: bool
    questions: tuple[Question, ...]
    answers: tuple[str, ...]


def _q(*items: str | tuple[str, str]) -> tuple[Question, ...]:
    return tuple(Question(*item) if isinstance(item, tuple) else Question(item) for item in items)


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "treats", "drug", "condition", True,
        _q(
            "What condition is {s} used to treat?",
            "Which disease does {s} treat?",
            "What is {s} prescribed for?",
            "Name the condition that {s} is indicated for.",
            "For which disorder would a doctor prescribe {s}?",
            "What illness is managed with {s}?",
            ("Identify the condition treated by the drug below.", "{s}"),
            "{s} is a therapy for which condition?",
            "What is the main indication of {s}?",
            ("Which disease is this medicine given for?", "{s}"),
        ),
        (
            "{s} is used to treat {o}.",
            "{s} is indicated for {o}.",
            "The condition treated by {s} is {o}.",
            "Doctors prescribe {s} for {o}.",
            "{s} is a treatment for {o}.",
            "The main indication of {s} is {o}.",
        ),
    ),
    Relation(
        "contraindication", "drug", "condition", True,
        _q(
            "In which condition must {s} be avoided?",
            "What is the main contraindication of {s}?",
            "Which disease rules out the use of {s}?",
            "Patients with which condition should not take {s}?",
            "When is {s} contraindicated?",
            ("Name the condition in which this drug must not be given.", "{s}"),
            "Which disorder makes {s} unsafe to use?",
            "{s} must not be used in patients with which disease?",
            ("What condition is a contraindication for the following drug?", "{s}"),
            "Which condition is a reason to withhold {s}?",
        ),
        (
            "{s} is contraindicated in {o}.",
            "{s} must be avoided in {o}.",
            "The main contraindication of {s} is {o}.",
            "{s} should not be given to patients with {o}.",
            "Do not use {s} in {o}.",
            "{s} is unsafe in {o}.",
        ),
    ),
    Relation(
        "side_effect", "drug", "symptom", True,
        _q(
            "What is the most common side effect of {s}?",
            "Which adverse effect does {s} often cause?",
            "What side effect should patients on {s} expect?",
            "Name the typical adverse reaction to {s}.",
            "Which symptom is a known side effect of {s}?",
            ("What side effect is typical of the drug below?", "{s}"),
            "Patients taking {s} often report which side effect?",
            "What unwanted effect is linked to {s}?",
            ("Name the usual adverse effect of this medicine.", "{s}"),
            "Which complaint is most often caused by {s}?",
        ),
        (
            "The most common side effect of {s} is {o}.",
            "{s} often causes {o}.",
            "A typical adverse effect of {s} is {o}.",
            "Patients on {s} may develop {o}.",
            "{s} is known to cause {o}.",
            "The usual side effect of {s} is {o}.",
        ),
    ),
    Relation(
        "dose", "drug", "dose", False,
        _q(
            "What is the standard adult dose of {s}?",
            "How is {s} usually dosed in adults?",
            "What dose of {s} is recommended for adults?",
            "Give the usual adult dosage of {s}.",
            "How much {s} should an adult take?",
            ("State the standard adult dose of the drug below.", "{s}"),
            "What is the recommended dosing of {s}?",
            "At what dose is {s} normally given?",
            ("What is the usual adult regimen for this medicine?", "{s}"),
            "Which dosing schedule is standard for {s}?",
        ),
        (
            "The standard adult dose of {s} is {o}.",
            "Adults usually take {s} at {o}.",
            "{s} is normally given as {o}.",
            "The recommended dose of {s} is {o}.",
            "The usual regimen of {s} is {o}.",
            "{s} is dosed at {o}.",
        ),
    ),
    Relation(
        "drug_class", "drug", "drug_class", False,
        _q(
            "To which drug class does {s} belong?",
            "What class of medicine is {s}?",
            "How is {s} classified pharmacologically?",
            "Name the pharmacological class of {s}.",
            "What kind of drug is {s}?",
            ("Which drug class does the following medicine belong to?", "{s}"),
            "{s} is a member of which drug class?",
            "What is the drug class of {s}?",
            ("Classify this drug.", "{s}"),
            "Which group of drugs includes {s}?",
        ),
        (
            "{s} belongs to the class of {o}.",
            "{s} is classified among the {o}.",
            "The drug class of {s} is the {o}.",
            "{s} is one of the {o}.",
            "Pharmacologically, {s} is among the {o}.",
            "{s} is grouped with the {o}.",
        ),
    ),
    Relation(
        "monitoring", "drug", "test", True,
        _q(
            "Which test is used to monitor therapy with {s}?",
            "How are patients on {s} monitored?",
            "What lab test should be checked during treatment with {s}?",
            "Name the monitoring test for {s}.",
            "Which test tracks the safety of {s}?",
            ("What test monitors patients taking this drug?", "{s}"),
            "During {s} therapy, which test is followed?",
            "What should be measured regularly in patients on {s}?",
            ("Name the test used to follow treatment with the drug below.", "{s}"),
            "Which test guides dosing of {s}?",
        ),
        (
            "Therapy with {s} is monitored with the {o}.",
            "Patients on {s} are followed with the {o}.",
            "The monitoring test for {s} is the {o}.",
            "During {s} treatment, check the {o}.",
            "{s} requires regular monitoring with the {o}.",
            "The safety of {s} is tracked with the {o}.",
        ),
    ),
    Relation(
        "hallmark_symptom", "condition", "symptom", True,
        _q(
            "What is the hallmark symptom of {s}?",
            "Which symptom is typical of {s}?",
            "What symptom do patients with {s} usually present with?",
            "Name the cardinal symptom of {s}.",
            "How does {s} usually present?",
            ("What is the main symptom of the following condition?", "{s}"),
            "Which complaint points to {s}?",
            "What is the classic sign of {s}?",
            ("Name the typical presenting symptom of this disease.", "{s}"),
            "Patients with {s} most often report which symptom?",
        ),
        (
            "The hallmark symptom of {s} is {o}.",
            "{s} typically presents with {o}.",
            "Patients with {s} usually have {o}.",
            "The cardinal symptom of {s} is {o}.",
            "The classic sign of {s} is {o}.",
            "{s} is marked by {o}.",
        ),
    ),
    Relation(
        "diagnosed_by", "condition", "test", True,
        _q(
            "Which test confirms the diagnosis of {s}?",
            "How is {s} diagnosed?",
            "What is the diagnostic test for {s}?",
            "Name the test used to confirm {s}.",
            "Which test should be ordered when {s} is suspected?",
            ("What test diagnoses the following condition?", "{s}"),
            "The diagnosis of {s} rests on which test?",
            "What investigation establishes {s}?",
            ("Name the confirmatory test for this disease.", "{s}"),
            "Which test is the gold standard for {s}?",
        ),
        (
            "The diagnosis of {s} is confirmed by the {o}.",
            "{s} is diagnosed with the {o}.",
            "The diagnostic test for {s} is the {o}.",
            "To confirm {s}, order the {o}.",
            "The gold standard test for {s} is the {o}.",
            "{s} is established by the {o}.",
        ),
    ),
)

RELATIONS_BY_NAME = {relation.name: relation for relation in RELATIONS}
QUESTION_FAMILY = 10
ANSWER_FAMILY = 6

# Near-duplicate edits: each leaves the row's meaning and almost all of its word shingles intact.
NEAR_DUP_PREFIXES = ("Please answer:", "Quick question:", "Briefly,", "Question:")
NEAR_DUP_SUFFIXES = ("Thanks.", "Please be brief.", "Thank you.")


def check_families() -> None:
    """Every relation must have full families with exactly one subject slot and answers ending in the object."""
    for relation in RELATIONS:
        if len(relation.questions) != QUESTION_FAMILY or len(relation.answers) != ANSWER_FAMILY:
            raise AssertionError(f"relation {relation.name}: family sizes must be {QUESTION_FAMILY}/{ANSWER_FAMILY}")
        for question in relation.questions:
            text = question.instruction + question.input
            if text.count("{s}") != 1 or "{o}" in text:
                raise AssertionError(f"relation {relation.name}: question {question} must hold {{s}} once, no {{o}}")
        for answer in relation.answers:
            if not answer.endswith("{o}.") or answer.count("{o}") != 1 or answer.count("{s}") != 1:
                raise AssertionError(f"relation {relation.name}: answer {answer!r} must end with {{o}}.")

"""The one typed configuration of a ctune workspace, loaded from its ``params.yaml``.

Every threshold, size and switch of the pipeline lives here, so that DVC can track it as a parameter and a user
can see and change it in one place. Loading is strict: an unknown key, a wrong type or a missing required value
fails with a :class:`ConfigError` that names the file, the line, the key and what was expected.
"""

from __future__ import annotations

import datetime as dt
import re
import string
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ctune_ops import PARAMS_FILE  # noqa: F401 - re-exported: config.PARAMS_FILE


class _ParamsLoader(yaml.SafeLoader):
    """Safe YAML loading that keeps dates as the strings the user wrote (``2026-01-05`` stays text)."""


_ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_yaml(text: str) -> Any:
    """Parse params YAML the way :func:`load_config` does."""
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A params file that cannot be turned into a :class:`CtuneConfig`; the message says where and why."""


def _check_iso_date(value: str) -> str:
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError("expected a calendar date written YYYY-MM-DD") from None
    return value


class _Strict(BaseModel):
    """Base of every section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BatchConfig(_Strict):
    """The batch a DVC stage works on; ``ctune stage`` and the Airflow operators set it per run."""

    date: str | None = Field(default=None, description="batch date, YYYY-MM-DD")

    @field_validator("date")
    @classmethod
    def _iso_date(cls, value: str | None) -> str | None:
        return None if value is None else _check_iso_date(value)


class WorkspaceConfig(_Strict):
    """Where versions are pushed and who commits them."""

    dvc_remote_name: str = "local"
    dvc_remote_url: str = Field(
        default="dvc-remote",
        description="DVC remote; a relative path is taken relative to the workspace (a local remote inside it)",
    )
    git_user_name: str = "ctune"
    git_user_email: str = "ctune@localhost"


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


class PromptConfig(_Strict):
    """How an instruction record becomes the text a causal LM sees; the response follows the prompt directly."""

    with_input: str = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
    without_input: str = "### Instruction:\n{instruction}\n### Response:\n"

    @model_validator(mode="after")
    def _fields(self) -> PromptConfig:
        if _placeholders(self.with_input) != {"instruction", "input"}:
            raise ValueError("with_input must use exactly the placeholders {instruction} and {input}")
        if _placeholders(self.without_input) != {"instruction"}:
            raise ValueError("without_input must use exactly the placeholder {instruction}")
        return self

    def render(self, instruction: str, input_text: str = "") -> str:
        """The prompt for one record (everything before the response)."""
        if input_text:
            return self.with_input.format(instruction=instruction, input=input_text)
        return self.without_input.format(instruction=instruction)


class ModelsConfig(_Strict):
    """The deployed model's base and the proxy's base: local paths (relative to the workspace) or hub ids."""

    base: str = "models/base"
    proxy_base: str = "models/proxy_base"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_length: int = Field(default=256, gt=8)
    prompt: PromptConfig = PromptConfig()


class WorldMix(_Strict):
    """Shares of a day's raw rows by ground-truth kind. Fixed by issue 2: benchmarks measure against it."""

    new: float = Field(default=0.20, ge=0, le=1)
    known: float = Field(default=0.30, ge=0, le=1)
    earlier: float = Field(default=0.20, ge=0, le=1)
    duplicate: float = Field(default=0.15, ge=0, le=1)
    malformed: float = Field(default=0.10, ge=0, le=1)
    phi: float = Field(default=0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> WorldMix:
        total = sum(self.model_dump().values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"the shares must add up to 1.0, they add up to {total:.4f}")
        return self


class TemplateSplit(_Strict):
    """How many wordings of a relation's family one fact uses for each purpose; the three sets never overlap."""

    train: int = Field(gt=0)
    reappear: int = Field(gt=0)
    eval: int = Field(gt=0)


class AnswerSplit(_Strict):
    """Answer wordings per fact: ``train`` for its training rows (and, with new questions, its reappearances) and
    ``eval`` held out for its eval items. Answers carry the fact, so more training answers mean a model that can
    state the fact in the held-out wordings too."""

    train: int = Field(gt=0)
    eval: int = Field(gt=0)


class SpecialtySchedule(_Strict):
    """Which specialties produce new facts when: ``initial`` from day 1, then one more every ``new_every_days``."""

    count: int = Field(default=8, ge=2)
    initial: int = Field(default=5, ge=1)
    new_every_days: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _initial_le_count(self) -> SpecialtySchedule:
        if self.initial > self.count:
            raise ValueError(f"initial ({self.initial}) cannot exceed count ({self.count})")
        return self


class EntityCounts(_Strict):
    """Entities per specialty (drugs, conditions, symptoms, tests) and global pools (drug classes, doses)."""

    drugs: int = Field(default=7, ge=4)
    conditions: int = Field(default=6, ge=4)
    symptoms: int = Field(default=6, ge=4)
    tests: int = Field(default=4, ge=4)
    drug_classes: int = Field(default=12, ge=4)
    doses: int = Field(default=16, ge=4)


class WorldConfig(_Strict):
    """The demo world: a fictional medical knowledge base and a daily stream of rows with hidden ground truth."""

    seed: int = 0
    start_date: str = "2026-01-01"
    rows_per_day: int = Field(default=200, ge=20)
    files_per_day: int = Field(default=3, ge=1)
    mix: WorldMix = WorldMix()
    known_facts: int = Field(default=150, ge=8, description="facts the base model is pretrained on (day 0)")
    rows_per_new_fact: int = Field(default=4, ge=1, description="rows introducing one new fact on its day")
    questions: TemplateSplit = TemplateSplit(train=4, reappear=3, eval=3)
    answers: AnswerSplit = AnswerSplit(train=4, eval=2)
    eval_items_per_fact: int = Field(default=2, ge=1)
    specialties: SpecialtySchedule = SpecialtySchedule()
    entities: EntityCounts = EntityCounts()
    overlong_chars: int = Field(default=20_000, gt=0, description="length of the injected overlong rows")

    @field_validator("start_date")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        return _check_iso_date(value)

    @model_validator(mode="after")
    def _eval_items_fit(self) -> WorldConfig:
        from ctune_ops.world.templates import ANSWER_FAMILY, QUESTION_FAMILY

        q, a = self.questions, self.answers
        if q.train + q.reappear + q.eval > QUESTION_FAMILY:
            raise ValueError(f"questions use {q.train + q.reappear + q.eval} wordings; a family has {QUESTION_FAMILY}")
        if a.train + a.eval > ANSWER_FAMILY:
            raise ValueError(f"answers use {a.train + a.eval} wordings; a family has {ANSWER_FAMILY}")
        if self.eval_items_per_fact > self.questions.eval * self.answers.eval:
            raise ValueError(
                f"eval_items_per_fact ({self.eval_items_per_fact}) exceeds the distinct eval wordings "
                f"(questions.eval x answers.eval = {self.questions.eval * self.answers.eval})"
            )
        return self

    def day_dates(self, days: int) -> list[str]:
        """ISO dates of stream days 1..days."""
        start = dt.date.fromisoformat(self.start_date)
        return [(start + dt.timedelta(days=i)).isoformat() for i in range(days)]


class TinyModelConfig(_Strict):
    """A Llama-style model pretrained from scratch on the day-0 corpus, and how long to train it."""

    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    epochs: float = Field(gt=0)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class BootstrapConfig(_Strict):
    """Tokenizer and tiny models for the demo world (``ctune world bootstrap``)."""

    vocab_size: int = Field(default=4096, ge=300)
    seed: int = 0
    threads: int = Field(default=0, ge=0, description="torch threads; 0 = all cores")
    base: TinyModelConfig = TinyModelConfig(
        hidden_size=384, num_layers=5, num_heads=6, intermediate_size=1056,
        epochs=8, learning_rate=1e-3, batch_size=16,
    )
    proxy: TinyModelConfig = TinyModelConfig(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=352,
        epochs=6, learning_rate=4e-3, batch_size=16, tie_embeddings=True,
    )


class CharBounds(_Strict):
    """Allowed length of one text field after normalisation, in characters (inclusive)."""

    min: int = Field(ge=0)
    max: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> CharBounds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) cannot exceed max ({self.max})")
        return self


class CharLimits(_Strict):
    """Character bounds per text field. The output maximum sits above real answers (MedQuAD's NIH answers reach
    4,000 characters) and below runaway rows (the demo world injects 20,000-character ones)."""

    instruction: CharBounds = CharBounds(min=2, max=2000)
    input: CharBounds = CharBounds(min=0, max=8000)
    output: CharBounds = CharBounds(min=1, max=8000)


RecordField = Literal["id", "instruction", "input", "output", "source", "created_at"]
_PATTERN_NAME = re.compile(r"[a-z][a-z0-9_]*")

# PHI patterns are Python regular expressions, run on text folded to ASCII (ctune_ops/validation/phi.py). pandas
# (and so Great Expectations) runs them on RE2 where that gives Python's answer and on Python's re, row by row,
# otherwise; they avoid look-around, \s and $ to stay on RE2, and scope flags as (?i:...) since they are combined.
DEFAULT_PHI_PATTERNS = {
    "phone": r"(?:\+?1[ .-]?)?(?:\([0-9]{3}\) ?|\b[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}\b",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "ssn": r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b|(?i:\bSSN\b[ :#]*[0-9]{9}\b)",
    "mrn": r"(?i:\b(?:MRN|medical record (?:number|no\.?|#))[ :#]*[0-9]{6,12}\b)",
}
# Toll-free numbers (800, 833, ... 888) belong to organisations, not patients: NIH answers cite helplines.
DEFAULT_PHI_ALLOW = {
    "toll_free": r"(?:\+?1[ .-]?)?(?:\(8(?:00|33|44|55|66|77|88)\) ?|\b8(?:00|33|44|55|66|77|88)[ .-])"
    r"[0-9]{3}[ .-][0-9]{4}\b",
}


def _check_patterns(patterns: dict[str, str], what: str) -> None:
    for name, pattern in patterns.items():
        if not _PATTERN_NAME.fullmatch(name):
            raise ValueError(f"{what} name {name!r} must be lower-case letters, digits and _ (it names a reason)")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{what} {name!r} is not a valid regular expression: {exc}") from None
        if compiled.search(""):
            raise ValueError(f"{what} {name!r} matches the empty string, so it would match every text")
    try:
        re.compile("|".join(f"(?:{p})" for p in patterns.values()))
    except re.error as exc:
        raise ValueError(f"{what}s cannot be combined into one expression ({exc}); scope flags as (?i:...)") from None


class ValidateConfig(_Strict):
    """The ``validate`` stage: which fields a row needs, how long its text may be, and what counts as PHI.

    Token bounds count the rendered training text (prompt and response) with the deployed model's tokenizer
    (``models.base``); ``token_bounds: false`` skips them where no tokenizer exists yet. PHI is quarantined, or
    with ``phi: redact`` masked with ``phi_mask`` and the row accepted with a record of what was masked.
    Text matched by a ``phi_allow`` pattern is not PHI.
    """

    required: list[RecordField] = Field(default_factory=lambda: ["id", "instruction", "output"])
    chars: CharLimits = CharLimits()
    token_bounds: bool = True
    min_tokens: int = Field(default=1, ge=0)
    max_tokens: int = Field(default=4096, gt=0)
    phi: Literal["quarantine", "redact"] = "quarantine"
    phi_mask: str = "[REDACTED:{name}]"
    phi_patterns: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PHI_PATTERNS))
    phi_allow: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PHI_ALLOW))

    @field_validator("phi_patterns")
    @classmethod
    def _phi_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("phi_patterns is empty; PHI screening cannot be switched off by emptying it")
        _check_patterns(value, "phi pattern")
        return value

    @field_validator("phi_allow")
    @classmethod
    def _phi_allow(cls, value: dict[str, str]) -> dict[str, str]:
        _check_patterns(value, "phi_allow pattern")
        return value

    @field_validator("phi_mask")
    @classmethod
    def _phi_mask(cls, value: str) -> str:
        if _placeholders(value) - {"name"}:
            raise ValueError("phi_mask may only use the placeholder {name}")
        return value

    @field_validator("required")
    @classmethod
    def _required(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"required lists a field twice: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ValidateConfig:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) cannot exceed max_tokens ({self.max_tokens})")
        for name in self.phi_patterns:
            mask = self.phi_mask.format(name=name)
            for other, pattern in self.phi_patterns.items():
                if re.search(pattern, mask):
                    raise ValueError(f"phi_mask {mask!r} itself matches phi pattern {other!r}")
        return self


class DedupConfig(_Strict):
    """The ``dedup`` stage: exact fingerprints and MinHash LSH over word shingles (DESIGN §3.2).

    ``num_perm`` hash functions split into ``bands`` bands of ``num_perm / bands`` rows; two texts become a
    candidate pair when one band agrees, and a near duplicate when their estimated Jaccard similarity (the share
    of equal signature values) is at least ``near_dup_threshold``. 128 permutations in 16 bands of 8 find a pair
    at Jaccard 0.85 with probability 0.994 and one at 0.5 with 0.06 (those are then rejected by the estimate).
    """

    num_perm: int = Field(default=128, ge=8, le=1024)
    bands: int = Field(default=16, ge=1)
    shingle_words: int = Field(default=3, ge=1, le=8)
    near_dup_threshold: float = Field(default=0.85, gt=0.0, le=1.0)
    seed: int = 1
    against: list[Literal["trained", "known"]] = Field(
        default_factory=lambda: ["trained", "known"],
        description="history decisions that make a later copy redundant",
    )

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"bands ({self.bands}) must divide num_perm ({self.num_perm})")
        return self


class ScoreConfig(_Strict):
    """The ``score`` stage: batched proxy forward passes (DESIGN §3.3).

    Rows are sorted by length and cut into batches of at most ``batch_tokens`` padded tokens (``cpu_batch_tokens``
    when the proxy runs on the CPU) and ``batch_rows`` rows: sorted lengths keep padding small. On a GPU large
    batches keep the matrix multiplications efficient and the kernel launches few. On a CPU a batch's activations
    should stay in the cores' caches instead: the demo's proxy on 2 cores (2 MiB L2 each) scores 12-15% faster
    at 1,024-3,072 tokens than at 8,192 (world and MedQuAD rows, ``benchmarks/selection.py``); a wider proxy wants
    fewer tokens per batch. And a small proxy's operators barely gain from a second thread, so the CPU scores
    ``cpu_workers`` batches at once, each operator on one thread.

    ``dtype`` is the precision of the forward's matrix products: ``float32`` matches a plain one-row forward to
    1e-4; ``bfloat16`` runs them under autocast (losses still summed in float32), as Hugging Face inference does on a
    GPU: a 0.5B proxy's products run on the tensor cores instead of fp32's units, for NLLs about 0.01-0.02 off
    (demo proxy, world and MedQuAD rows). ``auto`` takes bfloat16 on a CUDA device that supports it, float32 on the
    CPU, where autocast gains less (2 cores with AMX: 1.3-1.5x) and the demo's figures stay those of fp32.
    """

    batch_tokens: int = Field(default=8192, ge=64, description="padded tokens per batch on a GPU")
    cpu_batch_tokens: int = Field(default=2048, ge=64, description="padded tokens per batch on the CPU")
    batch_rows: int = Field(default=128, ge=1)
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 leaves torch's default")
    cpu_workers: int = Field(default=0, ge=0, description="batches scored at once on the CPU, each operator on one "
                             "thread; 0: one per torch thread, 1: one batch at a time on every thread")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="precision of the forward's products: auto = bfloat16 on CUDA, else float32")
    progress: bool = True

    def tokens_per_batch(self, device_type: str) -> int:
        """The padded-token bound of a batch for a model on ``device_type`` (torch's ``device.type``)."""
        return self.cpu_batch_tokens if device_type == "cpu" else self.batch_tokens


class SelectConfig(_Strict):
    """The ``select`` policy (DESIGN §3.4); every threshold of the decision lives here.

    ``known``: ppl <= tau_known, the ``known_quantile`` of the proxy's ppl on up to ``calibration_rows`` rows
    already trained into the production model, recomputed every day. ``trained_reference`` names rows the base
    model was trained on (a JSONL file in the workspace); they enter the history as trained in version v0, so the
    first day can calibrate and replay. ``too_novel_quantile`` (off when null) drops rows whose ppl is above that
    quantile of the batch. ``max_rows``/``max_tokens`` (off when null) keep the highest-IFD rows.

    ``strategy`` is ``perplexity`` (the policy above) in production; ``all`` (select every unique row) and
    ``random`` (``random_rows`` rows drawn at random, the rest cut as budget) are the baselines the
    continual-stream experiment compares it with.
    """

    strategy: Literal["perplexity", "all", "random"] = "perplexity"
    random_rows: int | None = Field(default=None, ge=0, description="rows the random strategy keeps per day")
    ifd_max: float = Field(default=1.0, gt=0.0)
    known_quantile: float = Field(default=0.98, gt=0.0, le=1.0)
    calibration_rows: int = Field(default=512, ge=1)
    too_novel_quantile: float | None = Field(default=None, gt=0.0, lt=1.0)
    max_rows: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    replay_ratio: float = Field(default=1.0, ge=0.0, le=10.0)
    replay_least_known: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of the replay taken as the calibration sample's rows with "
        "the highest proxy ppl (the trained rows production holds most weakly); the rest is drawn at random")
    replay_similar: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of the replay taken as, for each selected row in turn, "
        "the trained row most similar in words (ctune_ops/selection/replay.py); the rest is drawn at random")
    replay_known_today: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of the replay taken from today's rows judged known "
        "(production's facts in today's wording); the rest is drawn at random")
    replay_stream: float = Field(
        default=0.25, ge=0.0, le=1.0, description="share of the replay drawn from rows the stream trained (earlier "
        "batch days), not from the base model's trained_reference rows; the rest is drawn from every trained row")
    replay_per_epoch: bool = Field(
        default=True, description="draw the replay anew for each of the training's main epochs (train.epochs), "
        "each epoch's draw as large as the whole replay otherwise: the same replayed tokens reach epochs times "
        "as many earlier rows")
    rehearse_known: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of today's rows judged known that the training set's "
        "rehearsal pass (train.rehearsal) goes over after the main epochs")
    rehearse_trained: int = Field(default=0, ge=0, description="rows trained before the day, drawn at random, "
                                  "added to the rehearsal pass")
    replay_pool_rows: int = Field(default=4096, ge=1, description="trained rows drawn at random as the "
                                  "candidates of the similar replay")
    seed: int = 0
    trained_reference: str | None = "world/corpus/day0.jsonl"

    @model_validator(mode="after")
    def _replay_shares(self) -> SelectConfig:
        shares = {"replay_known_today": self.replay_known_today, "replay_similar": self.replay_similar,
                  "replay_least_known": self.replay_least_known, "replay_stream": self.replay_stream}
        if sum(shares.values()) > 1.0:
            raise ValueError(" + ".join(f"{k} ({v})" for k, v in shares.items()) + " is more than the whole "
                             "replay (1.0)")
        return self

    @model_validator(mode="after")
    def _random_needs_rows(self) -> SelectConfig:
        if self.strategy == "random" and self.random_rows is None:
            raise ValueError("strategy random needs random_rows (how many rows to keep per day)")
        return self



# All attention and MLP projections of a Llama-style model: LoRA on every projection teaches a small model new
# facts far better than attention alone (issue 5's trial: r=32 on all of them, in-family paraphrases 25% -> 60%).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A Kubernetes resource quantity ("4", "500m", "32Gi", "1.5", "1e3"), as the API server parses it.
_K8S_QUANTITY = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+|[KMGTPE]i|[mkMGTPE])?")
# A DNS-1123 label: what namespaces and PersistentVolumeClaim names must be.
_K8S_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
GPU_RESOURCE = "nvidia.com/gpu"


def _check_quantities(value: dict[str, str]) -> dict[str, str]:
    for name, quantity in value.items():
        if name == GPU_RESOURCE:
            raise ValueError(f"do not list {GPU_RESOURCE} here; set train.kubernetes.gpus instead")
        if not _K8S_QUANTITY.fullmatch(quantity):
            raise ValueError(f"{name} is {quantity!r}, not a Kubernetes quantity such as '4', '500m' or '32Gi'")
    return value


class LoraSettings(_Strict):
    """The LoRA adapter created when nothing is deployed yet; a deployed adapter keeps its own shape."""

    rank: int = Field(default=32, gt=0)
    alpha: float = Field(default=64.0, gt=0, description="scaling numerator: the update is scaled by alpha/rank")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS), min_length=1)

    @field_validator("target_modules")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or not all(name.strip() for name in value):
            raise ValueError(f"target_modules must be distinct, non-blank module names, got {value}")
        return value


class Toleration(_Strict):
    """A Kubernetes toleration, so the training pod may run on tainted (GPU) nodes."""

    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @model_validator(mode="after")
    def _value_matches_operator(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.operator == "Equal" and self.value is None:
            raise ValueError("a toleration with operator Equal needs a value")
        return self


class KubernetesTrainConfig(_Strict):
    """The training pod of ``train.backend: kubernetes`` (``ctune_ops.airflow.kubernetes``).

    The pod runs the ctune image with the workspace's PersistentVolumeClaim mounted at ``workspace_mount_path``
    and a memory-backed ``/dev/shm`` of ``shm_size`` (a container's default 64 MiB breaks data loader workers and
    NCCL). ``gpus`` become the container's ``nvidia.com/gpu`` limit; ``requests``/``limits`` hold cpu and memory.
    ``schedule_timeout_seconds`` bounds the wait for a GPU node (an autoscaler may need minutes to add one);
    ``startup_timeout_seconds`` the wait from scheduled to running (pulling a CUDA image takes a while).
    """

    image: str = Field(default="ctune:latest", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    namespace: str = "ctune"
    kubernetes_conn_id: str = "kubernetes_default"
    service_account: str | None = None
    gpus: int = Field(default=1, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    )
    pvc_claim: str = "ctune-workspace"
    workspace_mount_path: str = "/workspace"
    shm_size: str = "8Gi"
    startup_timeout_seconds: int = Field(default=600, gt=0)
    schedule_timeout_seconds: int = Field(default=1800, gt=0)
    requests: dict[str, str] = Field(default_factory=lambda: {"cpu": "4", "memory": "32Gi"})
    limits: dict[str, str] = Field(default_factory=lambda: {"memory": "48Gi"})
    run_as_user: int = Field(default=1000, ge=1, description="the image's non-root user")
    fs_group: int | None = Field(default=1000, ge=0, description="group that owns files on the PVC")
    on_finish_action: Literal["delete_pod", "delete_succeeded_pod", "delete_active_pod", "keep_pod"] = (
        "delete_succeeded_pod"
    )

    @field_validator("namespace", "pvc_claim")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _K8S_LABEL.fullmatch(value):
            raise ValueError(f"{value!r} is not a DNS-1123 label (lower-case letters, digits and '-')")
        return value

    @field_validator("workspace_mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.rstrip("/") == "":
            raise ValueError(f"{value!r} must be an absolute path other than /")
        return value.rstrip("/")

    @field_validator("shm_size")
    @classmethod
    def _shm_quantity(cls, value: str) -> str:
        _check_quantities({"shm_size": value})
        return value

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_quantities(value)


class TrainHyperparameters(_Strict):
    """What decides the trained adapter (a training spec records exactly these; a checkpoint is only resumed by a
    run with the same ones). One optimizer step sees ``batch_size * grad_accumulation`` rows; the loss is the
    mean over response tokens (prompt tokens carry no loss). The learning rate warms up linearly over
    ``warmup_fraction`` of the steps, then decays to 0 (``cosine`` or ``linear``)."""

    lora: LoraSettings = LoraSettings()
    learning_rate: float = Field(default=4e-4, gt=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=8, ge=1)
    grad_accumulation: int = Field(default=1, ge=1)
    max_length: int = Field(default=256, gt=8, description="tokens; longer rows keep the prompt, lose output tail")
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    checkpoint_every_steps: int = Field(default=50, ge=1)
    seed: int = 0


class RehearsalSettings(_Strict):
    """The rehearsal pass: after the main epochs, a short pass over the rows the select stage marked
    ``rehearse`` (rows production already knows), with a schedule of its own: warm-up over
    ``warmup_fraction`` of its steps (none below 1/``warmup_fraction`` steps), then decay to 0."""

    epochs: int = Field(default=3, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)


class AdapterTrainHyperparameters(TrainHyperparameters):
    """The deployed adapter's training: the shared settings, plus what its replay rows are trained on.

    ``replay_loss: labels`` trains replayed rows like new ones (cross-entropy on their response tokens).
    ``distill`` trains them towards production's own next-token distributions on their responses instead
    (Learning without Forgetting; Li & Hoiem, 2016): production's ``distill_top_k`` most likely tokens at each
    response position and the rest of the mass as one bucket, computed once before the first step. A one-hot
    label only says which answer is right; the distribution also holds how production ranks the wrong ones,
    which is what a multiple-choice eval compares. ``rehearsal`` is the pass over the rows the select stage
    marked ``rehearse`` (``select.rehearse_known``, ``select.rehearse_trained``), after the main epochs.
    """

    # rank 128 rather than the proxy's 32: the demo world's ctune arm (base retention 0.960) learns its day's facts
    # from their four rows well enough that fewer days need the repair: 0.314 and 0.347 of all's training tokens
    # at two seeds (rank 64: 0.333 and 0.347; rank 32: 0.387), its accuracy gaps to all narrower (RESULTS.md)
    lora: LoraSettings = LoraSettings(rank=128, alpha=256.0)
    replay_loss: Literal["labels", "distill"] = "labels"
    rehearsal: RehearsalSettings = RehearsalSettings()
    distill_top_k: int = Field(default=64, ge=1, description="production's most likely tokens kept per position")


class TrainConfig(AdapterTrainHyperparameters):
    """The ``train`` stage (DESIGN §3.5): continue LoRA training of the production adapter on the day's rows.

    ``backend: local`` trains in a subprocess of the stage; ``kubernetes`` trains in a GPU pod built by
    ``ctune_ops.airflow.kubernetes.training_pod_operator`` (the stage itself then refuses to run).
    """

    backend: Literal["local", "kubernetes"] = "local"
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 leaves torch's default")
    kubernetes: KubernetesTrainConfig = KubernetesTrainConfig()


class ProxyConfig(TrainHyperparameters):
    """The ``proxy`` stage (DESIGN §3.6): train the proxy on the day's training set, in step with the deployed
    model, then check they still agree.

    ``method: full`` fine-tunes every weight (right for a tiny proxy, which has no capacity to spare for a
    low-rank update); ``lora`` trains or continues a LoRA adapter over ``models.proxy_base`` with ``lora``'s
    settings (for a large proxy). Alignment: Spearman rho between the proxy's and the candidate model's per-row
    ``L_cond`` on up to ``probe_rows`` rows of the day that were not trained; below ``rho_min`` the report flags
    it. ``replay_weakest``: that many rows of the day's calibration sample (rows trained into production, scored
    by the proxy before its update) with the highest ppl join every proxy epoch, so a fully fine-tuned proxy does
    not forget the tail of what production holds (that tail sets ``tau_known``). ``new_loss: distill`` trains
    the day's new rows towards the candidate's top-``distill_top_k`` next-token distributions on them instead of
    their labels (the candidate and the proxy must share a tokenizer): a tiny proxy fine-tuned on every weight
    learns a handful of rows far better than a LoRA adapter does, and would then call the facts production
    failed to learn known.
    """

    update: bool = Field(default=True, description="false: the proxy is never trained (static selection)")
    method: Literal["full", "lora"] = "full"
    learning_rate: float = Field(default=5e-4, gt=0)
    epochs: int = Field(default=8, ge=1)
    probe_rows: int = Field(default=256, ge=3)
    rho_min: float = Field(default=0.5, ge=-1, le=1)
    replay_weakest: int = Field(default=0, ge=0, description="calibration rows with the highest ppl the proxy "
                                "also trains on, every epoch (0: none)")
    new_loss: Literal["labels", "distill"] = Field(
        default="labels", description="what the proxy learns the day's new rows from: their labels, or the "
        "candidate's own next-token distributions on them (the proxy then knows them as well as production does)")
    distill_top_k: int = Field(default=64, ge=1, description="the candidate's most likely tokens kept per position")
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 leaves torch's default")


class EvaluateConfig(_Strict):
    """The ``evaluate`` stage (DESIGN §3.7): lm-eval on the candidate and on production, and the gate.

    ``tasks`` are lm-eval 0.4 task YAMLs (paths relative to the workspace, ``{date}`` = the batch date; a user's
    own YAMLs over their own files work the same way: each YAML's folder becomes an ``include_path``). The gate
    promotes when no task's ``metric`` is more than ``tolerance`` below production's and every task named in
    ``target_tasks`` is at least production's plus ``min_gain``. A task that is no target must also stay within
    ``drift_tolerance`` of the base model's own score (the model first deployed): a day's tolerance, granted
    against each new production, would otherwise add up (demo world, 7 days: retention 0.923 -> 0.843 with every
    day within 0.03 of the day before).
    """

    tasks: list[str] = Field(
        default=["eval/retention/ctune_retention.yaml", "eval/days/{date}/ctune_target.yaml"], min_length=1)
    target_tasks: list[str] = ["ctune_target"]
    metric: Literal["acc", "acc_norm"] = "acc"
    tolerance: float = Field(default=0.03, ge=0, le=1)
    min_gain: float = Field(default=0.0, ge=-1, le=1)
    drift_tolerance: float | None = Field(
        default=0.03, ge=0, le=1, description="tasks that are no target may not fall more than this below the "
        "base model's score either (null: off); the per-day tolerance alone lets versions lose it every day")
    limit: int | None = Field(default=None, ge=1, description="items per task; null = all (for quick trials)")
    batch_size: int = Field(default=32, ge=1)


class RepairConfig(_Strict):
    """The ``repair`` stage (DESIGN §3.7): when the gate kept production because a task fell a little (the
    candidate learned the day's facts but forgot others), one rehearsal pass (``train.rehearsal``: epochs
    and peak learning rate) continues the candidate on rows production already knows, then the gate judges the
    repaired candidate again. The rows: ``known_share`` of today's rows the policy judged known, and
    ``trained_rows`` rows trained before the day, both drawn at random. It costs training only on the days the
    gate fails, and the repaired candidate faces the same gate. A candidate more than ``max_shortfall`` below a
    task's floor is not repaired: a fall that deep is a poisoned batch, a broken run or a day not learned, which
    the gate is there to keep out, not the drift a rehearsal mends. A pass that leaves the candidate short, but
    within ``max_shortfall``, is followed by another (up to ``rounds``), continuing the last one's adapter.
    """

    enabled: bool = True
    known_share: float = Field(default=1.0, ge=0.0, le=1.0, description="share of today's rows judged known")
    trained_rows: int = Field(default=40, ge=0, description="rows trained before the day, at random")
    max_shortfall: float = Field(default=0.10, ge=0.0, le=1.0, description="largest fall below a task's floor "
                                 "that is still repaired")
    rounds: int = Field(default=2, ge=1, description="rehearsal passes at most: a round that still falls short "
                        "(within max_shortfall) is continued by another on freshly drawn trained rows")


with warnings.catch_warnings():
    # The section is named like its stage; the only thing it shadows is pydantic v1's deprecated
    # ``BaseModel.validate`` classmethod, which ctune never calls.
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

    class CtuneConfig(_Strict):
        """Everything a workspace's ``params.yaml`` may say."""

        batch: BatchConfig = BatchConfig()
        workspace: WorkspaceConfig = WorkspaceConfig()
        models: ModelsConfig = ModelsConfig()
        world: WorldConfig = WorldConfig()
        bootstrap: BootstrapConfig = BootstrapConfig()
        validate: ValidateConfig = ValidateConfig()
        dedup: DedupConfig = DedupConfig()
        score: ScoreConfig = ScoreConfig()
        select: SelectConfig = SelectConfig()
        train: TrainConfig = TrainConfig()
        proxy: ProxyConfig = ProxyConfig()
        evaluate: EvaluateConfig = EvaluateConfig()
        repair: RepairConfig = RepairConfig()


def _key_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node of ``loc`` found in the composed YAML tree."""
    node, line = root, None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == str(part):
                node, line = value_node, key_node.start_mark.line + 1
                break
        else:
            break
    return line


def _describe(error: dict[str, Any]) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required value is missing"
    got = error.get("input")
    msg = msg.removeprefix("Value error, ")
    if isinstance(got, dict):
        return msg
    return f"{msg[0].lower()}{msg[1:]}, got {got!r}"


def parse_config(data: Any, source: str = PARAMS_FILE, text: str | None = None) -> CtuneConfig:
    """Validate already-parsed YAML data; ``text`` (the YAML source) lets errors name lines."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return CtuneConfig.model_validate(data)
    except ValidationError as exc:
        root = yaml.compose(text) if text is not None else None
        lines = []
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if not str(p).startswith("function-after"))
            key = ".".join(str(p) for p in loc) or "(top level)"
            line = _key_line(root, loc)
            where = f"{source}:{line}" if line else source
            lines.append(f"{where}: key '{key}': {_describe(error)}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> CtuneConfig:
    """Load and validate a params file; any problem raises :class:`ConfigError` naming file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file (is this a ctune workspace? run `ctune init`)") from None
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(path), text=text)

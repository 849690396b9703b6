"""The schema of ``mera run`` configs (see configs/toy/*.yaml and the README).

Path values may start with ``zoo:`` (a file inside the toy model zoo, e.g. ``zoo:llm``)
or be relative to the config file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mera import MODALITIES
from mera.config.base import StrictModel
from mera.continual.methods import MethodConfig
from mera.eval.stats import ReportSettings
from mera.model.connectors import ConnectorConfig
from mera.runner.names import slug
from mera.train.lora import LoraSettings

ZOO_KEYS = ("llm", "tokenizer", "root", "manifest") + tuple(f"encoders/{m}" for m in MODALITIES)


def check_zoo_ref(v: str | None) -> str | None:
    """A ``zoo:`` path must name a part of the toy zoo (checked before anything is built)."""
    if isinstance(v, str) and v.startswith("zoo:") and v[4:] not in ZOO_KEYS:
        raise ValueError(f"unknown zoo path {v!r}; known: zoo:llm, zoo:tokenizer, "
                         f"zoo:encoders/<modality> ({', '.join(MODALITIES)})")
    return v


class EncoderRef(StrictModel):
    family: str
    path: str | None = None
    options: dict = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _zoo(cls, v):
        return check_zoo_ref(v)


class BranchConfig(StrictModel):
    encoder: EncoderRef
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    # a trained connector (safetensors, e.g. from `mera import-llava`): this modality's expert is
    # then not trained but taken as the base LLM + this connector (and evaluated as usual)
    pretrained_connector: str | None = None


class ModelConfig(StrictModel):
    llm: str = "zoo:llm"
    tokenizer: str | None = None  # defaults to the llm folder
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # how a stage's LoRA delta is folded into the LLM: into the weights (rounded once to ``dtype``),
    # or kept as frozen fp32 low-rank branches until export (exact in any dtype; mera.train.branches)
    folds: Literal["weights", "branches"] = "weights"
    branches: dict[str, BranchConfig]

    @field_validator("llm", "tokenizer")
    @classmethod
    def _zoo(cls, v):
        return check_zoo_ref(v)

    @field_validator("branches")
    @classmethod
    def _modalities(cls, v):
        for m in v:
            if m not in MODALITIES:
                raise ValueError(f"unknown modality {m!r}; a branch is one of {', '.join(MODALITIES)}")
        if not v:
            raise ValueError("at least one modality branch is expected")
        return v


class SetPaths(StrictModel):
    """The files of one modality: caption and QA sets, train and test, and optionally validation
    (mera's JSON format). The validation sets are what ``eval.split: val`` evaluates on (``mera
    sweep`` chooses hyper-parameters on them, never on the test sets)."""

    caption_train: str
    caption_test: str
    qa_train: str
    qa_test: str
    caption_val: str | None = None
    qa_val: str | None = None
    caption_name: str | None = None  # the "dataset" column of scores.csv (default "<modality>-caption")
    qa_name: str | None = None


class DataConfig(StrictModel):
    # the toy world: generated on first use into the mera home (cached by its config)
    toy: dict | None = None
    sets: dict[str, SetPaths] = Field(default_factory=dict)
    max_test: int | None = Field(None, ge=1)  # cap on test samples per set (None: all)


class PhaseConfig(StrictModel):
    epochs: float = Field(1.0, gt=0, le=1000)
    batch_size: int = 16  # effective batch (micro_batch_size x gradient accumulation)
    micro_batch_size: int | None = None  # None: the whole batch at once
    warmup_ratio: float = 0.03
    lr_connector: float = Field(2e-5, gt=0)
    lr_lora: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got batch_size {self.batch_size}, "
                             f"micro_batch_size {self.micro_batch_size}")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        return self


def _align():
    return PhaseConfig(batch_size=128, lr_connector=1e-3)


def _instruct():
    return PhaseConfig(batch_size=16, lr_connector=2e-5, lr_lora=2e-4)


def _realign():
    return PhaseConfig(batch_size=16, lr_connector=2e-5)


class TrainConfig(StrictModel):
    """Defaults are the paper's (METHOD.md section 2); toy configs shrink them."""

    align: PhaseConfig = Field(default_factory=_align)
    instruct: PhaseConfig = Field(default_factory=_instruct)
    realign: PhaseConfig = Field(default_factory=_realign)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    # frozen encoders are deterministic: compute each set's features once and reuse them
    # (true: in memory; "disk": once per sample under <run>/.features/ in feature_cache_dtype,
    # for data sets too large for memory; false: run the encoders on every use)
    cache_features: bool | Literal["disk"] = True
    feature_cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # recompute the LLM's activations in the backward pass of every phase (GPU memory for time)
    gradient_checkpointing: bool = False
    # save each phase's full training state every N optimizer steps (0: never), under
    # <run>/.steps/, so that --resume continues a long phase where it stopped
    checkpoint_every: int = Field(default=0, ge=0)
    num_workers: int = 0
    # experiment trackers that also receive every line of metrics.jsonl (loss, lr and gradient norm per
    # optimizer step, the scores per stage), through accelerate's tracker classes: tensorboard (tested,
    # event files under <run>/trackers/), wandb, mlflow, trackio, ... (passed through, untested); each
    # needs its package installed (pip install "mera[trackers]" brings tensorboard)
    report_to: list[str] = Field(default_factory=list)

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        for name in v:
            if name not in LOGGER_TYPE_TO_CLASS:
                raise ValueError(f"unknown tracker {name!r}; accelerate knows: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if len(set(v)) != len(v):
            raise ValueError("a tracker is listed twice")
        return v


class EvalConfig(StrictModel):
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1, le=4096)
    judge: str = "exact_match"  # exact_match | openai | local_llm (see mera.eval.llm_judge)
    # options of the judge, e.g. {model: gpt-4o-mini, base_url: ..., api_key_env: OPENAI_API_KEY};
    # keys themselves are read from the environment only, never from a config
    judge_options: dict = Field(default_factory=dict)
    # the sets every stage is evaluated on: test, or val (the validation sets: data.sets.<m>.caption_val /
    # qa_val, or the toy world's val split), for choosing hyper-parameters; scores from val are written
    # with the dataset name suffixed "-val" (e.g. toy-image-caption-val)
    split: Literal["test", "val"] = "test"

    @model_validator(mode="after")
    def _no_credentials(self):
        url = self.judge_options.get("base_url")
        if isinstance(url, str):
            from mera.eval.llm_judge import url_credentials

            what = url_credentials(url)
            if what:  # said without the URL: the config is saved in the run directory, errors go to logs
                raise ValueError(f"judge_options.base_url holds credentials ({what}); give the key through "
                                 "judge_options.api_key_env, the NAME of an environment variable, never in a "
                                 "config or a URL")
        return self


class LauncherConfig(StrictModel):
    """Where ``mera run CONFIG --launcher submitit`` runs a grid's units (experts, (order, method)
    chains) as jobs, and with what resources per job (docs/launcher.md). Only where the jobs run, never
    what they compute: a resumed run may change it (it is left out of the resume check)."""

    # slurm: sbatch through submitit (needs SLURM's srun/sbatch here); local: each job a process of this
    # machine (submitit's local executor: tests, or one many-GPU machine)
    cluster: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    gpus_per_node: int = Field(1, ge=0, le=64)
    # processes per job: 1, or gpus_per_node for data parallelism inside a unit (as torchrun would)
    tasks_per_node: int = Field(1, ge=1, le=64)
    cpus_per_task: int | None = Field(None, ge=1, le=1024)
    mem_gb: float | None = Field(None, gt=0)
    timeout_min: int = Field(24 * 60, ge=1, le=365 * 24 * 60)
    # anything else sbatch takes, by its long option name without dashes: {account: proj, qos: high,
    # constraint: a100, exclude: node12}
    slurm_additional_parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # submitit's folder (job pickles, logs): relative to the run directory (default <run>/.submitit);
    # on SLURM it must be on a file system the compute nodes share
    folder: str = ".submitit"

    @field_validator("slurm_additional_parameters")
    @classmethod
    def _sbatch_keys(cls, v):
        import re

        for k in v:
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", k):
                raise ValueError(f"{k!r} is not an sbatch option name (lower-case letters, digits, '-' or '_', "
                                 "without the leading dashes, e.g. account, qos, constraint)")
            if k.replace("_", "-") in ("dependency", "array", "output", "error"):
                raise ValueError(f"{k!r} is set by mera's launcher (job order, logs); leave it out")
        return v

    @model_validator(mode="after")
    def _tasks(self):
        if self.tasks_per_node > 1 and self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"tasks_per_node {self.tasks_per_node} must equal gpus_per_node {self.gpus_per_node} "
                             "(one process per GPU) or be 1")
        return self


class RunConfig(StrictModel):
    name: str = "run"
    seed: int = Field(0, ge=0, lt=2**31)
    # several training seeds: everything (experts too) runs once per seed, in <out>/seed_<s>/, and
    # the report gives each figure as mean +- std over the seeds with a 95% t-interval; unset: `seed`
    seeds: list[int] | None = None
    # reuse a training step whose inputs (parent model, the connectors its data passes through, the
    # strategies' parameters, seed, recipe) equal one already done in this run instead of training it
    # again (<out>/.shared): Fine-Tuning and Realign only train every stage once; results are identical
    share: bool = True
    # folders a user sets once, used elsewhere as ${paths.NAME} (e.g. paths.models, paths.data)
    paths: dict[str, str] = Field(default_factory=dict)
    zoo: dict | None = None  # ZooConfig fields (toy model zoo); None: defaults
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    orders: dict[str, list[str]] = Field(default_factory=lambda: {"sequential": list(MODALITIES)})
    methods: list[MethodConfig]
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    threads: int | None = Field(2, ge=1, le=1024)  # torch CPU threads (None: torch's default)
    # `mera run --launcher submitit`: where each unit runs as a job, with what resources (docs/launcher.md);
    # None: the defaults (SLURM, 1 GPU per job)
    launcher: LauncherConfig | None = None
    # the report's statistics: bootstrap replicates and seed, the declared primary family (Holm-corrected),
    # the plasticity margin of the claims checklist (docs/metrics.md); `mera report` reads it from config.yaml
    report: ReportSettings = Field(default_factory=ReportSettings)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if v is not None:
            if not v or len(set(v)) != len(v):
                raise ValueError("seeds: a non-empty list of distinct seeds is expected")
            bad = [x for x in v if not 0 <= x < 2**31]
            if bad:
                raise ValueError(f"seeds: {bad[0]} is outside 0 .. 2**31-1")
        return v

    @property
    def run_seeds(self) -> list[int]:
        """The training seeds of the run: ``seeds``, or ``[seed]``."""
        return list(self.seeds) if self.seeds else [self.seed]

    def for_seed(self, seed: int) -> "RunConfig":
        """This config with ``seed`` as its (only) training seed: what one seed of the run trains with."""
        return self.model_copy(update={"seed": seed})

    @model_validator(mode="after")
    def _check(self):
        import re

        for oname, order in self.orders.items():
            # an order's name is a folder of the run directory: a plain name, never a path
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", oname) or oname in ("experts",) or ".." in oname:
                raise ValueError(f"orders: {oname!r} cannot name a folder of the run directory (letters, digits, "
                                 "'_', '.', '-'; not 'experts')")
            if len(set(order)) != len(order) or not order:
                raise ValueError(f"orders.{oname}: a non-empty list of distinct modalities is expected")
            for m in order:
                if m not in self.model.branches:
                    raise ValueError(f"orders.{oname}: modality {m!r} has no entry in model.branches")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError("methods: names must be distinct")
        if "expert" in names:
            raise ValueError("methods: 'expert' is reserved for the experts' rows")
        by_slug: dict[str, str] = {}
        for n in names:  # a method's folder is its slug: two names with one folder would share stages
            if slug(n) in by_slug:
                raise ValueError(f"methods: {by_slug[slug(n)]!r} and {n!r} would share the folder {slug(n)!r} "
                                 "of the run directory; rename one")
            by_slug[slug(n)] = n
        if self.data.toy is None:
            for m in self.model.branches:
                if m not in self.data.sets:
                    raise ValueError(f"data.sets: no data for modality {m!r} (or set data.toy)")
        return self

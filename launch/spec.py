"""The sweep spec: one YAML file -> validated runs, each with its own directory and resources.

A spec is the training recipe (`pretrain`, optional `lincls`), the cluster resources (`slurm`) and a
`sweep` over any of their fields. Every check happens here, before anything is written or submitted;
a problem becomes one `SpecError` line that names the field and what is allowed.
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from sogclr.contract.config import (
    PRUNE_YARDSTICKS,
    LinclsConfig,
    PretrainConfig,
    PruneMetric,
    RunConfig,
    Rungs,
    Schema,
    WandbConfig,
    apply_overrides,
    rung_problem,
    wandb_field,
    yardstick,
)
from sogclr.contract.layout import RunLayout
from sogclr.contract.state import read_state

SECTIONS = ("pretrain", "lincls", "slurm")
PRUNE_DIR = "prune"  # <sweep dir>/prune: the records of successive halving
# Fields a pruned sweep must not vary, by why (review 2026-12-05, N2, N11): runs at one epoch but different
# points of their schedules, or a metric that is not the same yardstick in every run.
SCHEDULE_LENGTH = ("epochs", "warmup_epochs")
OBJECTIVE_GEOMETRY = ("projector_hidden_dim", "projector_out_dim")
BUILTIN_DATASETS = ("digits",)
_TIME = re.compile(r"(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})")  # fullmatch: `$` would let a newline end it


class SpecError(Exception):
    """A problem with the spec or the command line, worded for the user (one line)."""


def parse_time_limit(text: str) -> int:
    """SLURM time `HH:MM:SS` or `D-HH:MM:SS` -> seconds."""
    match = _TIME.fullmatch(text)
    if not match:
        raise ValueError(f"expected HH:MM:SS or D-HH:MM:SS, got {text!r}")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    if minutes > 59 or seconds > 59:
        raise ValueError(f"minutes and seconds must be below 60, got {text!r}")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


# sbatch options the launcher sets from the spec's own fields or relies on (one task per node, its
# signal and requeue, its log paths, the evaluation's dependency): `slurm.additional` may not set them.
# Written with underscores; submitit turns `_` into `-`, so `ntasks-per-node` is the same key.
RESERVED_SBATCH = frozenset(
    "account array chdir comment constraint cpus_per_gpu cpus_per_task dependency error export gpus "
    "gpus_per_node gpus_per_task gres job_name mem mem_per_cpu mem_per_gpu nodes no_requeue ntasks "
    "ntasks_per_node open_mode output parsable partition qos requeue signal time wrap".split()
)
_OPTION = re.compile(r"^[a-z][a-z0-9_-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _sbatch_option(key: str) -> str:
    if not _OPTION.match(key):
        raise ValueError("not an sbatch option name (lower-case letters, digits, - and _)")
    if key.replace("-", "_") in RESERVED_SBATCH:
        raise ValueError(
            "the launcher sets this option (from the slurm section's own fields, or for itself); "
            f"not allowed here: {', '.join(sorted(RESERVED_SBATCH))}"
        )
    return key


def _sbatch_value(value: str | int | bool) -> str | int | bool:
    # A newline would end the #SBATCH line and start a line of its own in the batch script.
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError("a newline or control character would inject lines into the sbatch script")
    return value


SbatchOption = Annotated[str, AfterValidator(_sbatch_option)]
SbatchValue = Annotated[str | int | bool, AfterValidator(_sbatch_value)]


class SlurmConfig(Schema):
    partition: str | None = Field(None, description="Partition (-p); the cluster's default if omitted.")
    account: str | None = Field(None, description="Account to charge (-A).")
    qos: str | None = Field(None, description="Quality of service (--qos).")
    constraint: str | None = Field(None, description="Node features (-C), e.g. a100.")
    nodes: int = Field(1, ge=1, description="Nodes per job; one task (one torchrun) per node.")
    gpus_per_node: int = Field(
        4, ge=0, description="GPUs per node = training processes per node (0: CPU, one)."
    )
    cpus_per_task: int = Field(32, ge=1, description="CPUs per node task (shared by its training processes).")
    mem_gb: int | None = Field(
        None, gt=0, description="Memory per node in GB; the cluster's default if omitted."
    )
    time: str = Field("3-00:00:00", description="Time limit per attempt, HH:MM:SS or D-HH:MM:SS.")
    setup: list[str] = Field(
        default_factory=list, description="Shell lines run before training (modules, venv)."
    )
    signal_lead_s: int = Field(
        300,
        ge=1,
        description="Seconds before the time limit that SLURM warns (USR2); at least 1: without the "
        "warning a time limit ends the attempt TIMEOUT, unsaved and not requeued.",
    )
    max_requeues: int = Field(
        20, ge=0, description="Give up after this many requeues (preemption, time limit) per submission."
    )
    max_failures: int = Field(
        3,
        ge=0,
        description="Requeue after at most this many transient failures per submission (a rank killed, "
        "a peer or node lost); a Python exception in training fails at once.",
    )
    arrays: bool = Field(
        True,
        description="Submit the runs whose jobs have identical resources as job arrays: one pretraining "
        "array and one evaluation array whose tasks each wait for their own pretraining task; false: one "
        "job per run. Set in the slurm section only (the evaluation follows its pretraining).",
    )
    max_parallel: int | None = Field(
        None,
        ge=1,
        description="At most this many tasks of each of the sweep's job arrays run at once (`%N`); "
        "none: no limit. Needs arrays.",
    )
    additional: dict[SbatchOption, SbatchValue] = Field(
        default_factory=dict,
        description="Extra sbatch parameters, e.g. {exclusive: true, reservation: x}; not the options the "
        "launcher sets itself (docs/cluster.md lists them).",
    )

    # Written into #SBATCH lines: YAML's `account: |` adds a newline, which would end the #SBATCH block.
    _one_line = field_validator("partition", "account", "qos", "constraint")(_sbatch_value)

    @field_validator("time")
    @classmethod
    def _valid_time(cls, value: str) -> str:
        parse_time_limit(value)
        return value

    @model_validator(mode="after")
    def _lead_fits_in_time(self) -> SlurmConfig:
        if parse_time_limit(self.time) <= self.signal_lead_s:
            raise ValueError(f"time {self.time} must be longer than signal_lead_s ({self.signal_lead_s} s)")
        return self

    @model_validator(mode="after")
    def _throttle_needs_arrays(self) -> SlurmConfig:
        if self.max_parallel is not None and not self.arrays:
            raise ValueError("max_parallel throttles job arrays; with arrays: false there are none")
        return self

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def time_seconds(self) -> int:
        return parse_time_limit(self.time)


# Linear evaluation may override any resource of the pretraining job (often: fewer nodes, less time),
# but not whether it is an array: an evaluation array waits task by task on its pretraining array.
SlurmOverrides = create_model(
    "SlurmOverrides",
    __base__=Schema,
    **{
        name: (field.annotation | None, None)
        for name, field in SlurmConfig.model_fields.items()
        if name != "arrays"
    },
)


class LinclsSpec(LinclsConfig):
    slurm: SlurmOverrides = Field(  # type: ignore[valid-type]
        default_factory=SlurmOverrides, description="Resources that differ from the pretraining job's."
    )


class PruneSpec(Schema):
    """Asynchronous successive halving over the sweep's runs (ASHA's rule: sogclr/contract/rungs.py)."""

    metric: PruneMetric = Field(
        "knn_top1",
        description="What runs are judged on at a rung: knn_top1 (maximised; pretrain.knn_every_epochs "
        "must land on every rung) or global_objective (minimised; pretrain.objective_every_epochs must).",
    )
    eta: int = Field(
        3,
        ge=2,
        description="Reduction factor: at a rung, a run continues if it is among the best "
        "max(1, floor(n / eta)) of the n runs recorded there so far (the first arrival always continues).",
    )
    first_rung: int | None = Field(
        None,
        ge=1,
        description="Epochs to the first rung; the rungs are first_rung x eta^k below pretrain.epochs.",
    )
    rungs: Rungs | None = Field(
        None, description="The rungs (epochs, increasing, each below pretrain.epochs), instead of first_rung."
    )
    promote: bool = Field(
        True,
        description="A run stopped at a rung is paused, and continued from its checkpoint once later "
        "arrivals make it one of the rung's top 1/eta (ASHA's promotion; on SLURM its job waits, held). "
        "False: a stopped run is stopped for good.",
    )

    @model_validator(mode="after")
    def _one_way_to_rungs(self) -> PruneSpec:
        if (self.first_rung is None) == (self.rungs is None):
            raise ValueError("give either first_rung (with eta) or rungs, not both or neither")
        return self

    def rungs_for(self, epochs: int) -> list[int]:
        """The rungs of a run of `epochs` epochs (explicit ones as given: each is checked against it)."""
        if self.rungs is not None:
            return list(self.rungs)
        rungs, rung = [], self.first_rung
        while rung < epochs:
            rungs.append(rung)
            rung *= self.eta
        return rungs or [self.first_rung]  # a first rung at or past the end: reported as such


class SweepConfig(Schema):
    product: dict[str, list[Any]] = Field(
        default_factory=dict, description="Field -> values; every combination becomes a run."
    )
    zip: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Field -> values of equal length, taken position by position (one product factor).",
    )
    runs: list[dict[str, Any]] | None = Field(
        None,
        description="An explicit list of points, each a mapping field -> value (one product factor): "
        "`[{loss: simclr}, {loss: sogclr, gamma: 0.1}]` runs SimCLR once, not once per gamma. Entries may "
        "set different fields; a field an entry leaves out keeps the recipe's value.",
    )
    prune: PruneSpec | None = Field(
        None, description="Stop runs early by successive halving; omit to train every run to the end."
    )

    @model_validator(mode="after")
    def _lists_are_usable(self) -> SweepConfig:
        for group in ("product", "zip"):
            for key, values in getattr(self, group).items():
                if not values:
                    raise ValueError(f"sweep.{group}.{key}: empty list; give at least one value")
        lengths = {key: len(values) for key, values in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"sweep.zip: lists must have equal lengths, got {lengths}")
        if self.runs is not None and not self.runs:
            raise ValueError("sweep.runs: empty list; give at least one run, or leave runs out")
        for position, entry in enumerate(self.runs or []):
            if not entry:
                raise ValueError(f"sweep.runs[{position}]: empty entry; give at least one field -> value")
        return self

    def swept_keys(self) -> list[tuple[str, str]]:
        """(group, key as written) of every swept field; the group is `product`, `zip` or `runs[i]`."""
        keys = [(group, key) for group in ("product", "zip") for key in getattr(self, group)]
        for position, entry in enumerate(self.runs or []):
            keys += [(f"runs[{position}]", key) for key in entry]
        return keys


class SweepSpec(Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Sweep name (a directory name).")
    output_root: Path = Field(Path("runs"), description="Runs go to <output_root>/<name>/<run>/.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Resources of each pretraining job.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="The pretraining recipe.")
    lincls: LinclsSpec | None = Field(None, description="Linear evaluation after pretraining; omit for none.")
    wandb: WandbConfig | None = wandb_field()
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Fields to vary; none: a single run.")

    @property
    def directory(self) -> Path:
        """`<output_root>/<name>`: the run directories, the manifest and the submission lock."""
        return self.output_root.expanduser().absolute() / self.name

    @property
    def prune_records(self) -> Path:
        """Where the runs record their metric at each rung, and their decisions (sogclr/contract/rungs.py)."""
        return self.directory / PRUNE_DIR


@dataclass(frozen=True)
class Run:
    """One point of the sweep: what to train, where, and on which resources."""

    name: str
    point: dict[str, Any]
    config: RunConfig
    slurm: SlurmConfig
    lincls_slurm: SlurmConfig | None
    resume_pruned: bool = False  # continue this run past the rung that pruned it, to the end

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @cached_property  # with its paths: status asks 1,000s of runs for them
    def files(self) -> RunLayout:
        return RunLayout(self.config.run_dir)

    @property
    def phases(self) -> list[str]:
        """The run's training phases, in order: pretraining, then linear evaluation unless it has none."""
        return ["pretrain", "lincls"] if self.config.lincls is not None else ["pretrain"]


# --- reading ----------------------------------------------------------------------------------------


def load_spec(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """Read a YAML spec, apply `--set a.b=value` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else "?"
        raise SpecError(f"{path}:{line}: malformed YAML: {err.problem}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: malformed YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        apply_overrides(data, list(overrides))
    except ValueError as err:
        raise SpecError(str(err)) from None
    return validate(SweepSpec, data)


def validate(model: type[BaseModel], data: Any, where: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(describe(err, model, where)) from None


def describe(err: ValidationError, model: type[BaseModel], where: str = "") -> str:
    """The first validation problem as one line: `field: what is wrong (got value)`."""
    problem = err.errors()[0]
    # A bad dict key: name the key. A list position reads as runs[2].
    loc = [f"[{part}]" if isinstance(part, int) else str(part) for part in problem["loc"] if part != "[key]"]
    field = ".".join([where, *loc] if where else loc).replace(".[", "[") or "spec"
    if problem["type"] == "extra_forbidden":
        known = _field_names(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(known)}"
        return f"{field}: unknown key ({hint})"
    message = problem["msg"].removeprefix("Value error, ")
    if message.startswith(f"{field}."):  # the validator already named the exact field
        return message
    if problem["type"] == "missing" or problem["type"] == "value_error":
        return f"{field}: {message}"
    return f"{field}: {message} (got {problem['input']!r})"


def _field_names(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Names of the fields at `loc` inside `model` (for 'did you mean')."""
    for part in loc:
        sub = _submodel(model, part)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _submodel(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    field = model.model_fields.get(name)
    if field is None:
        return None
    candidates = getattr(field.annotation, "__args__", (field.annotation,))
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


# --- expansion --------------------------------------------------------------------------------------

# How a swept field appears in a run name: gamma0.9-bs256-ep400. An empty label shows the value alone.
_LABELS = {
    "pretrain.gamma": "gamma",
    "pretrain.batch_size": "bs",
    "pretrain.epochs": "ep",
    "pretrain.temperature": "t",
    "pretrain.lr": "lr",
    "pretrain.loss": "",
    "pretrain.gamma_schedule": "",
    "pretrain.arch": "",
    "pretrain.optimizer": "",
    "pretrain.weight_decay": "wd",
    "slurm.nodes": "n",
    "slurm.gpus_per_node": "g",
}


def canonical_key(key: str) -> str:
    """`gamma` -> `pretrain.gamma`: a bare field name means the pretraining recipe."""
    return key if key.split(".")[0] in SECTIONS else f"pretrain.{key}"


def run_label(key: str, value: Any) -> str:
    label = _LABELS.get(key)
    if label is None:
        section, *rest = key.split(".")
        label = ("lin-" if section == "lincls" else "") + "".join(rest).replace("_", "")
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return label + re.sub(r"[^A-Za-z0-9._]+", "_", text)


def sweep_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every point of the sweep as {canonical key: value}: the product, with the zip group and the
    explicit runs each as one more factor."""
    factors = [[{canonical_key(key): v} for v in values] for key, values in sweep.product.items()]
    if sweep.zip:
        keys = [canonical_key(key) for key in sweep.zip]
        factors.append(
            [dict(zip(keys, column, strict=True)) for column in zip(*sweep.zip.values(), strict=True)]
        )
    if sweep.runs:
        factors.append([{canonical_key(key): v for key, v in entry.items()} for entry in sweep.runs])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*factors)]


def expand(spec: SweepSpec) -> list[Run]:
    """The runs of a spec, each fully validated; raises SpecError on the first problem."""
    _check_sweep_keys(spec)
    base = spec.model_dump(mode="python", exclude={"sweep"})
    _check_run_entries(spec, base)
    runs, sections = [], {}
    for point in sweep_points(spec.sweep):
        name = "-".join(run_label(k, v) for k, v in point.items()) or spec.name
        runs.append(_make_run(spec, base, point, name, spec.directory / name, sections))
    _check_unique_names(runs)
    _check_comparable(spec, runs)
    return runs


def _check_comparable(spec: SweepSpec, runs: list[Run]) -> None:
    """A pruned sweep compares its runs at a rung: refuse one that varies what would make the comparison
    unfair (the schedule's length) or the metric a different yardstick per run (its own settings, and for
    the global objective the temperature, loss and projector it is computed with)."""
    prune = spec.sweep.prune
    if prune is None:
        return
    yardstick = [
        *PRUNE_YARDSTICKS[prune.metric],
        *(OBJECTIVE_GEOMETRY if prune.metric == "global_objective" else ()),
    ]
    for name in (*SCHEDULE_LENGTH, *yardstick):
        values = sorted({getattr(run.config.pretrain, name) for run in runs}, key=str)
        if len(values) < 2:
            continue
        shown = ", ".join(map(str, values))
        if name in SCHEDULE_LENGTH:
            raise SpecError(
                f"sweep.prune: the runs have different pretrain.{name} ({shown}): at a rung's epoch they are "
                "at different points of their schedules; prune a sweep of one schedule length"
            )
        raise SpecError(
            f"sweep.prune.metric: {prune.metric} is not comparable across pretrain.{name}, which the sweep "
            f"varies ({shown})" + ("; prune on knn_top1" if prune.metric == "global_objective" else "")
        )


def _check_sweep_keys(spec: SweepSpec) -> None:
    last_group: dict[str, str] = {}  # canonical key -> the group that swept it last
    for group, key in spec.sweep.swept_keys():
        where, canonical = f"sweep.{group}.{key}", canonical_key(key)
        previous = last_group.get(canonical)
        # Explicit runs each set their own fields: only two groups, or twice in one group, collide.
        if previous is not None and (previous == group or previous.split("[")[0] != group.split("[")[0]):
            raise SpecError(f"{where}: {canonical} is swept twice (also in sweep.{previous}); sweep it once")
        last_group[canonical] = group
        _check_sweep_field(spec, where, canonical)


def _check_sweep_field(spec: SweepSpec, where: str, canonical: str) -> None:
    """SpecError at `where` unless `canonical` (`pretrain.gamma`) names a field that can be swept."""
    section, *path = canonical.split(".")
    if section == "lincls" and spec.lincls is None:
        raise SpecError(f"{where}: sweeps a lincls field, but the spec has no lincls section")
    model: type[BaseModel] | None = {"pretrain": PretrainConfig, "lincls": LinclsSpec}.get(
        section, SlurmConfig
    )
    for depth, part in enumerate(path):
        if model is None or part not in model.model_fields:
            known = _field_names(model, []) if model else []
            close = difflib.get_close_matches(part, known, n=1, cutoff=0.5)
            parent = ".".join([section, *path[:depth]])
            hint = f"did you mean '{parent}.{close[0]}'?" if close else f"{parent} has no field {part!r}"
            raise SpecError(f"{where}: no such field ({hint})")
        if depth < len(path) - 1:
            model = _submodel(model, part)
        elif _submodel(model, part) is not None:
            raise SpecError(f"{where}: sweep a field inside this section, not the section")


def _check_run_entries(spec: SweepSpec, base: dict) -> None:
    """A value of an explicit run that its field rejects is reported at that entry (`sweep.runs[2].gamma`);
    problems between fields are left to the runs' own validation, which names the run."""
    for position, entry in enumerate(spec.sweep.runs or []):
        data = with_point(base, {canonical_key(key): value for key, value in entry.items()})
        try:
            SweepSpec.model_validate(data)
        except ValidationError as err:
            loc = ".".join(str(part) for part in err.errors()[0]["loc"])
            key = next((key for key in entry if canonical_key(key) == loc), None)
            if key is not None:
                message = describe(err, SweepSpec).removeprefix(f"{loc}: ")
                raise SpecError(f"sweep.runs[{position}].{key}: {message}") from None


def with_point(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """`base` with the point's values set: only the dicts on each value's path are copied, the rest is
    shared (a deep copy per run was most of a 1,000-run sweep's expansion; the validators copy what
    they keep and change nothing)."""
    data = dict(base)
    for key, value in point.items():
        node, (*parents, leaf) = data, key.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = value
    return data


def _make_run(
    spec: SweepSpec, base: dict, point: dict[str, Any], name: str, run_dir: Path, sections: dict[Any, Any]
) -> Run:
    """The run at `point`. `sections`: the sections validated for earlier runs, by the point's values
    that reach them; a section the sweep does not vary is validated once for all runs (the configs are
    never changed in place, so runs may share them)."""
    data = with_point(base, point)
    where = f"run {name}"

    def section(model: type[BaseModel], key: str, value: Any, *swept_by: str) -> Any:
        reach = (key, *((k, repr(v)) for k, v in point.items() if k.split(".")[0] in swept_by))
        if reach not in sections:
            sections[reach] = validate(model, value, f"{where}: {key}")
        return sections[reach]

    slurm = section(SlurmConfig, "slurm", data["slurm"], "slurm")
    pretrain = section(PretrainConfig, "pretrain", data["pretrain"], "pretrain")
    lincls = lincls_slurm = None
    if data.get("lincls") is not None:
        lincls_data = dict(data["lincls"])
        overrides = {k: v for k, v in (lincls_data.pop("slurm", None) or {}).items() if v is not None}
        lincls_slurm = section(SlurmConfig, "lincls.slurm", {**data["slurm"], **overrides}, "slurm", "lincls")
        lincls = section(LinclsConfig, "lincls", lincls_data, "lincls")
    _check_divisible(where, "pretrain.batch_size", pretrain.batch_size, slurm)
    if lincls is not None:
        _check_divisible(where, "lincls.batch_size", lincls.batch_size, lincls_slurm)
    meta = {"sweep": spec.name, "run": name, "point": point}
    prune = _prune_config(spec, pretrain, where)
    config = validate(
        RunConfig,
        {
            **{"run_dir": run_dir, "pretrain": pretrain, "lincls": lincls, "wandb": data["wandb"]},
            **{"prune": prune, "meta": meta},
        },
        where,
    )
    return Run(name=name, point=point, config=config, slurm=slurm, lincls_slurm=lincls_slurm)


def _prune_config(spec: SweepSpec, pretrain: PretrainConfig, where: str) -> dict[str, Any] | None:
    """The run config's `prune` section: this run's rungs and the sweep's records directory."""
    prune = spec.sweep.prune
    if prune is None:
        return None
    rungs = prune.rungs_for(pretrain.epochs)
    if problem := rung_problem(pretrain, prune.metric, rungs):
        field = "rungs" if prune.rungs is not None else "first_rung"
        raise SpecError(f"{where}: sweep.prune.{field}: {problem}")
    return {
        **{"metric": prune.metric, "eta": prune.eta, "rungs": rungs},
        **{"records": spec.prune_records, "promote": prune.promote},
    }


def check_prune_records(spec: SweepSpec, runs: list[Run]) -> None:
    """SpecError if the sweep's rungs hold values measured with other settings of the metric than its runs
    now have (a `--set pretrain.knn_k=...` between submissions): the rule would leave them out of every
    table, so the runs would not be compared with those already judged."""
    prune = spec.sweep.prune
    if prune is None or not runs:
        return
    now = yardstick(runs[0].config.pretrain, prune.metric)
    for path in sorted(spec.prune_records.glob("rung-*/*.json")):
        record = read_state(path)
        if record.get("metric") == prune.metric and record.get("settings", now) != now:
            differ = ", ".join(
                f"pretrain.{k}={record['settings'].get(k)!r} (now {v!r})"
                for k, v in now.items()
                if record["settings"].get(k) != v
            )
            raise SpecError(
                f"sweep.prune: {path} was measured with {differ}; the runs would not be compared with it: "
                f"keep the settings, or start the halving afresh (remove {spec.prune_records})"
            )


def resuming_pruned(runs: list[Run], names: list[str]) -> list[Run]:
    """`runs`, with the named ones set to continue past the rung that pruned them: no pruning any more
    (their config has no `prune` section), and the launcher submits them again. SpecError for a name
    that is not a run of the sweep."""
    known = {run.name for run in runs}
    if unknown := [name for name in names if name not in known]:
        raise SpecError(f"--resume-pruned {unknown[0]}: no such run in this sweep (runs: {', '.join(known)})")
    return [
        replace(run, config=run.config.model_copy(update={"prune": None}), resume_pruned=True)
        if run.name in names
        else run
        for run in runs
    ]


def _check_divisible(where: str, field: str, batch: int, slurm: SlurmConfig) -> None:
    if batch % slurm.world_size:
        raise SpecError(
            f"{where}: {field}: {batch} is not divisible by the number of ranks "
            f"({slurm.nodes} nodes x {slurm.ranks_per_node} per node = {slurm.world_size})"
        )


def _check_unique_names(runs: list[Run]) -> None:
    seen: dict[str, dict] = {}
    for run in runs:
        if run.name in seen:
            raise SpecError(
                f"sweep: duplicate run name {run.name!r} (points {seen[run.name]} and {run.point}); "
                "make the swept values distinct"
            )
        seen[run.name] = run.point


def check_data_dirs(runs: list[Run]) -> list[str]:
    """One line per missing data directory (built-in datasets need none)."""
    missing: dict[Path, list[str]] = {}
    for run in runs:
        pretrain = run.config.pretrain
        if pretrain.dataset not in BUILTIN_DATASETS and not pretrain.data_dir.expanduser().is_dir():
            missing.setdefault(pretrain.data_dir, []).append(run.name)
    return [
        f"pretrain.data_dir: {path} does not exist (runs: {', '.join(names)})"
        for path, names in missing.items()
    ]

"""The training library's configuration: one typed schema, the reference recipe as defaults.

A run is described by a `RunConfig` (the file the launcher writes as `<run_dir>/config.yaml`). Every
default below is the authors' ImageNet recipe (NOTES-sogclr.md); specs override only what differs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from sogclr.contract.atomic import write_atomic

PHASES = ("pretrain", "lincls")
Dataset = Literal["imagenet1k", "imagenet100", "folder", "digits"]
Arch = Literal["resnet18", "resnet34", "resnet50"]
Precision = Literal["bf16", "fp16", "fp32"]
LrScaling = Literal["sqrt", "linear", "none"]

# About 4% of the quickstart's training time (an evaluation is 0.16 of an epoch: benchmarks/knn.py).
KNN_EVERY_EPOCHS = 4


# The line between recipe and resources, declared on each field of the two training sections (`roles`):
# a recipe field defines the training trajectory of the phases it names, so a resumed phase refuses a
# change to it (`recipe_differences`); a resource changes nothing a phase computes, and may change at any
# requeue or resubmission. Linear evaluation's trajectory also depends on the pretraining fields that shape
# its features (data, image size, network, precision); the backbone's weights it checks itself.
PRETRAIN_RECIPE: dict[str, Any] = {"recipe": ["pretrain"]}
SHARED_RECIPE: dict[str, Any] = {"recipe": ["pretrain", "lincls"]}
LINCLS_RECIPE: dict[str, Any] = {"recipe": ["lincls"]}
RESOURCE: dict[str, Any] = {"recipe": []}


class Schema(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def collective_timeout_field() -> Any:
    return Field(
        300.0,
        gt=0,
        json_schema_extra=RESOURCE,
        description="Seconds a collective may wait for a peer: when a rank or node is lost, the "
        "others fail after this (then the job is requeued) instead of holding the allocation.",
    )


# Some operations report no progress while they run: start-up (imports, the dataset index, the
# rendezvous), the first step under `compile`, a checkpoint or feature-cache write on a slow file system.
# A limit below them kills healthy runs, each against max_failures; below a minute is surely one.
PROGRESS_TIMEOUT_FLOOR_MINUTES = 1.0


def progress_timeout_field() -> Any:
    return Field(
        30.0,
        ge=PROGRESS_TIMEOUT_FLOOR_MINUTES,
        json_schema_extra=RESOURCE,
        description="Minutes a training process may go without progress (a step, a batch of features, "
        "an evaluation's batch) before it records `failed: stalled` and exits, so that the job is requeued "
        "as a transient failure (counted against max_failures) instead of holding the allocation to its "
        "time limit: a read that blocks for ever, a hung decoder, a rank stuck outside a collective. "
        f"At least {PROGRESS_TIMEOUT_FLOOR_MINUTES:g}: start-up, the first compiled step and "
        "checkpoint writes report no progress. None: never.",
    )


class CheckpointConfig(Schema):
    every_minutes: float = Field(
        10.0, gt=0, description="Save last.pt at least this often (and at epoch end)."
    )
    every_steps: int | None = Field(None, gt=0, description="Also save every N optimizer steps.")
    keep: int = Field(2, ge=1, description="How many checkpoints to keep (last.pt plus older ones).")


class PretrainConfig(Schema):
    # data
    dataset: Dataset = Field(
        "imagenet1k",
        description="imagenet1k, imagenet100 (first 100 WNIDs), folder (any class-subfolder tree), "
        "or digits (built-in scikit-learn digits, no download).",
        json_schema_extra=SHARED_RECIPE,
    )
    data_dir: Path | None = Field(
        None,
        description="Root with train/ and val/ subfolders; for digits, the cache directory (optional).",
        json_schema_extra=RESOURCE,
    )
    data_format: Literal["tree", "shards"] = Field(
        "tree",
        description="tree: data_dir holds train/ and val/ class-subfolder trees; shards: data_dir is a "
        "shard directory (shards.json and ~1 GB tar files: python -m sogclr.shards, or python -m "
        "sogclr.imagenet --shards). The same images read either way give the same batches.",
        json_schema_extra=RESOURCE,
    )
    stage_dir: str | None = Field(
        None,
        description="shards only: copy the shards to this node-local directory at the start of each "
        "attempt (one process per node copies and verifies them, the others wait) and read the copy. "
        "Environment variables are expanded on the node, e.g. $SLURM_TMPDIR or /tmp. A complete copy "
        "from an earlier attempt on the same node is reused. None: read the shards where they are.",
        json_schema_extra=RESOURCE,
    )
    accept_data_change: bool = Field(
        False,
        description="Resume runs whose checkpoints were trained on other data (images added, removed or "
        "replaced: another fingerprint of the training split): SogCLR's u is carried over by path for the "
        "images that stayed, new images start unseen. False: such a resume fails, naming what differs.",
        json_schema_extra=RESOURCE,
    )
    image_size: int = Field(
        224, ge=8, description="Crop size of the augmented views.", json_schema_extra=SHARED_RECIPE
    )
    crop_min: float = Field(
        0.08,
        gt=0,
        le=1,
        description="Smallest RandomResizedCrop area fraction.",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    workers: int = Field(8, ge=0, description="Data-loading processes per rank.", json_schema_extra=RESOURCE)
    augment_on: Literal["device", "loader"] = Field(
        "device",
        description="device: loader workers only decode and crop, and the training device applies colour "
        "jitter, grayscale, blur, flip and normalisation to the whole batch (loaders spend under a third of "
        "the CPU time per ImageNet-sized image); loader: all of it in the workers, with PIL. Both make the "
        "same views.",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    # model
    arch: Arch = Field(
        "resnet50", description="torchvision ResNet backbone.", json_schema_extra=SHARED_RECIPE
    )
    small_stem: bool = Field(
        False,
        description="3x3 stride-1 stem without max-pool (CIFAR-sized images).",
        json_schema_extra=SHARED_RECIPE,
    )
    width: int = Field(
        64,
        ge=1,
        description="Channels of the ResNet's first stage, doubled at each later stage (64: torchvision's); "
        "narrower for small images on CPUs. Export needs 64.",
        json_schema_extra=SHARED_RECIPE,
    )
    projector_hidden_dim: int = Field(
        2048, gt=0, description="Hidden width of the projector MLP.", json_schema_extra=PRETRAIN_RECIPE
    )
    projector_out_dim: int = Field(
        128, gt=0, description="Output dimension of the projector.", json_schema_extra=PRETRAIN_RECIPE
    )
    # optimisation
    epochs: int = Field(800, gt=0, description="Pretraining epochs.", json_schema_extra=PRETRAIN_RECIPE)
    batch_size: int = Field(
        256, gt=0, description="Global batch size (all ranks together).", json_schema_extra=PRETRAIN_RECIPE
    )
    lr: float = Field(
        0.075,
        gt=0,
        description="Base learning rate, scaled by lr_scaling.",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    lr_scaling: LrScaling = Field(
        "sqrt",
        description="sqrt: lr * sqrt(batch); linear: lr * batch / 256; none: lr as given.",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    warmup_epochs: float = Field(
        10.0,
        ge=0,
        description="Per-step linear warmup, then half-cosine to 0.",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    optimizer: Literal["lars", "sgd", "adamw"] = Field(
        "lars", description="Optimizer.", json_schema_extra=PRETRAIN_RECIPE
    )
    weight_decay: float = Field(
        1e-6, ge=0, description="Weight decay (not on 1-D parameters).", json_schema_extra=PRETRAIN_RECIPE
    )
    momentum: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="Momentum (LARS, SGD) or beta1 (AdamW).",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    trust_coefficient: float = Field(
        0.001, gt=0, description="LARS trust coefficient.", json_schema_extra=PRETRAIN_RECIPE
    )
    # loss
    loss: Literal["sogclr", "simclr"] = Field(
        "sogclr",
        description="sogclr (global contrastive loss; 'dcl' is accepted as an alias) or simclr.",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    temperature: float = Field(
        0.1, gt=0, description="Softmax temperature T.", json_schema_extra=PRETRAIN_RECIPE
    )
    gamma: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Moving-average weight of the estimator u, in (0, 1].",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    gamma_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="constant, or cosine from 1 down to gamma over gamma_decay_fraction.",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    gamma_decay_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of training over which the cosine gamma schedule decays.",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    # execution
    precision: Precision = Field(
        "bf16", description="Autocast dtype on GPU (CPU always runs fp32).", json_schema_extra=SHARED_RECIPE
    )
    compile: bool = Field(False, description="torch.compile the model.", json_schema_extra=RESOURCE)
    deterministic: bool = Field(
        False,
        description="On GPU, cuDNN autotuning off and deterministic algorithms only (an operation without "
        "one fails the run, naming it), so that a run stopped and resumed ends with exactly the weights of "
        "one that never stopped, as on CPU, given the same GPUs, rank count and library versions; slower. "
        "False: cuDNN picks the fastest convolutions at each start, which may sum in another order, so a "
        "resumed GPU run matches an uninterrupted one up to float rounding.",
        json_schema_extra=RESOURCE,
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed of initialisation, shuffling and augmentation.",
        json_schema_extra=PRETRAIN_RECIPE,
    )
    log_every_steps: int = Field(
        10, gt=0, description="Write metrics.jsonl every N steps.", json_schema_extra=RESOURCE
    )
    collective_timeout_s: float = collective_timeout_field()
    progress_timeout_minutes: float | None = progress_timeout_field()
    tensorboard: bool = Field(
        False,
        description="Also write TensorBoard events under the run directory.",
        json_schema_extra=RESOURCE,
    )
    objective_every_epochs: int | None = Field(
        None,
        gt=0,
        description="Every N epochs, log to metrics.jsonl the exact global objectives of the current encoder "
        "over a fixed subset of the training set (one fixed pair of views per image, every view of the "
        "subset a negative): SogCLR's per anchor and with each image's views pooled, and NT-Xent; "
        "None: never. Does not change training.",
        json_schema_extra=RESOURCE,
    )
    objective_subset: int = Field(
        10_000,
        ge=2,
        description="Images in that fixed subset (evenly spaced; all if the set is smaller).",
        json_schema_extra=RESOURCE,
    )
    knn_every_epochs: int | None = Field(
        KNN_EVERY_EPOCHS,
        gt=0,
        description="Every N epochs, log to metrics.jsonl the weighted kNN accuracy of the backbone's "
        "features (knn_top1, knn_top5, percent): each validation image classified by its knn_k most similar "
        "training images (cosine similarity, votes weighted exp(s / knn_temperature)), both un-augmented; "
        "None: never. Does not change training.",
        json_schema_extra=RESOURCE,
    )
    knn_subset: int = Field(
        100_000,
        ge=1,
        description="Training images in the kNN bank (evenly spaced, so classes in proportion; all if the "
        "set is smaller): bounds the monitor's cost and memory (features of every bank image on every rank).",
        json_schema_extra=RESOURCE,
    )
    knn_k: int = Field(
        20,
        ge=1,
        description="Neighbours that vote in the kNN monitor (20 as DINO).",
        json_schema_extra=RESOURCE,
    )
    knn_temperature: float = Field(
        0.07, gt=0, description="Temperature of the kNN monitor's vote weights.", json_schema_extra=RESOURCE
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, json_schema_extra=RESOURCE)

    @field_validator("loss", mode="before")
    @classmethod
    def _dcl_is_sogclr(cls, value: Any) -> Any:
        return "sogclr" if value == "dcl" else value


class LinclsConfig(Schema):
    """Linear evaluation on the frozen backbone; data are the pretraining dataset's train/val splits."""

    epochs: int = Field(90, gt=0, description="Linear-evaluation epochs.", json_schema_extra=LINCLS_RECIPE)
    batch_size: int = Field(1024, gt=0, description="Global batch size.", json_schema_extra=LINCLS_RECIPE)
    lr: float = Field(
        0.1, gt=0, description="Base learning rate, scaled by lr_scaling.", json_schema_extra=LINCLS_RECIPE
    )
    lr_scaling: LrScaling = Field("linear", description="As in pretrain.", json_schema_extra=LINCLS_RECIPE)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.", json_schema_extra=LINCLS_RECIPE)
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay.", json_schema_extra=LINCLS_RECIPE)
    mode: Literal["standard", "features", "both"] = Field(
        "standard",
        description="standard: augmented images through the frozen backbone each epoch; features: "
        "compute frozen features once and train the linear layer on them; both: run both, report both.",
        json_schema_extra=LINCLS_RECIPE,
    )
    workers: int = Field(8, ge=0, description="Data-loading processes per rank.", json_schema_extra=RESOURCE)
    pretrained: Path | None = Field(
        None,
        description="A checkpoint file whose backbone to evaluate instead of the run's own pretraining: "
        "one of ours, or the SogCLR authors' released ones (`state_dict` with `module.base_encoder.*` "
        "keys); pretrain.arch and small_stem must match it.",
        json_schema_extra=RESOURCE,
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed of shuffling, augmentation and classifier init.",
        json_schema_extra=LINCLS_RECIPE,
    )
    log_every_steps: int = Field(
        10, gt=0, description="Write metrics.jsonl every N steps.", json_schema_extra=RESOURCE
    )
    collective_timeout_s: float = collective_timeout_field()
    progress_timeout_minutes: float | None = progress_timeout_field()
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, json_schema_extra=RESOURCE)


class WandbConfig(Schema):
    """Weights & Biases: every metrics.jsonl record of a run's phases also goes to one W&B run per run
    directory (rank 0), which requeued attempts and linear evaluation continue."""

    project: str = Field("sogclr", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (user or team); W&B's default if omitted.")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: written under <run_dir>/wandb/ only, for compute nodes without internet "
        "(upload later with `wandb sync`); online: sent to the W&B server as it runs.",
    )
    group: str | None = Field(None, description="W&B group; the sweep's name if omitted.")
    tags: list[str] = Field(default_factory=list, description="W&B tags.")


# The metrics a run can be pruned on -> whether higher is better; each logged by an epoch-end monitor.
PRUNE_METRICS = {"knn_top1": True, "global_objective": False}
PruneMetric = Literal["knn_top1", "global_objective"]
_PRUNE_MONITORS = {"knn_top1": "knn_every_epochs", "global_objective": "objective_every_epochs"}
# The pretraining fields that define each metric's yardstick: two values are compared only if measured
# with the same ones. The global objective is T·log-mean-exp(s/T) - s_pos at the run's own temperature
# and loss: the same encoder scores lower at a higher T (review 2026-12-05, N2).
PRUNE_YARDSTICKS = {
    "knn_top1": ("knn_k", "knn_subset", "knn_temperature"),
    "global_objective": ("objective_subset", "temperature", "loss"),
}


def yardstick(pretrain: PretrainConfig, metric: str) -> dict[str, Any]:
    """The settings `metric` is measured with in a run of this recipe: recorded with each value."""
    return {name: getattr(pretrain, name) for name in PRUNE_YARDSTICKS[metric]}


def _increasing(rungs: list[int]) -> list[int]:
    if not rungs or rungs[0] < 1 or any(a >= b for a, b in itertools.pairwise(rungs)):
        raise ValueError(f"epochs must be one or more, positive and increasing, got {rungs}")
    return rungs


Rungs = Annotated[list[int], AfterValidator(_increasing)]


class PruneConfig(Schema):
    """Successive halving decided inside the run (sogclr/training/prune.py): at each rung the run records its
    metric in `records`, shared with the runs it competes with, and stops unless it is in the top 1/eta
    of the runs recorded there."""

    metric: PruneMetric = Field(
        "knn_top1", description="knn_top1 (maximised) or global_objective (minimised)."
    )
    eta: int = Field(3, ge=2, description="Reduction factor: the top 1/eta of a rung continue.")
    rungs: Rungs = Field(description="Epochs after which the run is judged, increasing.")
    records: Path = Field(description="Directory of the rungs' records, shared by the competing runs.")
    promote: bool = Field(
        True,
        description="A run stopped at a rung is paused: continued (from its checkpoint) once later arrivals "
        "make it one of the rung's top 1/eta (ASHA's promotion). False: stopped for good.",
    )


def rung_problem(pretrain: PretrainConfig, metric: str, rungs: list[int]) -> str | None:
    """Why a run with this recipe cannot be judged at these rungs (None if it can): a rung must come
    before the last epoch, and the metric must be logged after it."""
    for rung in rungs:
        if rung >= pretrain.epochs:
            return f"rung {rung} is not below pretrain.epochs ({pretrain.epochs}): nothing left to save"
        monitor = _PRUNE_MONITORS[metric]
        every = getattr(pretrain, monitor)
        if every is None:
            return f"{metric} is never logged (pretrain.{monitor} is null), but a rung is at epoch {rung}"
        if rung % every:
            return f"{metric} is logged every {every} epochs (pretrain.{monitor}), not after epoch {rung}"
    return None


def wandb_field() -> Any:
    return Field(None, description="Weights & Biases logging (the `wandb` extra); omit for none.")


class RunConfig(Schema):
    """Everything one run needs; `meta` is provenance (git commit, sweep point, resources), opaque here."""

    run_dir: Path
    dataset_index: Path | None = Field(
        None,
        description="The dataset index file every process reads (sogclr/contract/dataindex.py), "
        "written by the launcher at submission; None: built once into <run_dir>/datasets/ by the run's "
        "first start.",
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    lincls: LinclsConfig | None = None
    wandb: WandbConfig | None = wandb_field()
    prune: PruneConfig | None = Field(None, description="Successive halving; omit to train to the end.")
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _digits_needs_no_data_dir(self) -> RunConfig:
        if self.pretrain.dataset not in ("digits",) and self.pretrain.data_dir is None:
            raise ValueError(f"pretrain.data_dir is required for dataset {self.pretrain.dataset!r}")
        return self

    @model_validator(mode="after")
    def _shards_are_read_from_a_directory(self) -> RunConfig:
        pretrain = self.pretrain
        if pretrain.data_format == "shards" and pretrain.dataset == "digits":
            raise ValueError(
                "pretrain.data_format: shards needs dataset imagenet1k, imagenet100 or folder "
                "(pack the digits with python -m sogclr.shards and name them as dataset: folder)"
            )
        if pretrain.stage_dir is not None and pretrain.data_format != "shards":
            raise ValueError("pretrain.stage_dir: only shards are staged (set pretrain.data_format: shards)")
        return self

    @model_validator(mode="after")
    def _rungs_fit_the_recipe(self) -> RunConfig:
        if self.prune is not None and (
            problem := rung_problem(self.pretrain, self.prune.metric, self.prune.rungs)
        ):
            raise ValueError(f"prune.rungs: {problem}")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value read as YAML (so 0.5 is a float, [1,2] a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, for example pretrain.gamma=0.5")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b=value` into nested dicts (creating levels as needed); returns `data`."""
    for text in overrides:
        set_path(data, *parse_override(text))
    return data


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    """data[a][b] = value for path [a, b], creating (or replacing non-dict) levels as needed."""
    for part in path[:-1]:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[path[-1]] = value


# libyaml's parser and emitter where PyYAML has them: the same documents, several times faster (a large
# sweep's submission writes, and its resubmission reads, one config per run).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a resolved run config (YAML), apply `--set` overrides, validate."""
    data = yaml.load(Path(path).read_text(), Loader=_LOADER) or {}
    return RunConfig.model_validate(apply_overrides(data, list(overrides)))


TRAINING_SECTIONS: dict[str, type[Schema]] = {"pretrain": PretrainConfig, "lincls": LinclsConfig}


def roles(field: FieldInfo) -> list[str]:
    """The phases whose recipe a field of a training section is part of ([] for a resource)."""
    return field.json_schema_extra["recipe"]


def recipe(config: dict[str, Any], phases: Iterable[str]) -> dict[str, Any]:
    """The fields of a dumped run config (`model_dump(mode="json")`) that define the training trajectory
    of any of `phases`: {section: {field: value}}. Fields a config does not have (written before they
    existed) are left out."""
    phases = set(phases)
    found = {}
    for name, model in TRAINING_SECTIONS.items():
        section = config.get(name) or {}
        fields = {
            k: section[k] for k, f in model.model_fields.items() if k in section and phases & {*roles(f)}
        }
        if fields:
            found[name] = fields
    return found


def recipe_differences(old: dict[str, Any], new: dict[str, Any], phases: Iterable[str] = PHASES) -> list[str]:
    """`section.field: old -> new` for each field of `phases`' recipe that differs between two dumped run
    configs. Fields only one of them has are not compared: a config written before a field existed."""
    phases = tuple(phases)
    before, after = recipe(old, phases), recipe(new, phases)
    return [
        f"{section}.{key}: {fields[key]!r} -> {after[section][key]!r}"
        for section, fields in before.items()
        for key in fields
        if key in after.get(section, {}) and fields[key] != after[section][key]
    ]


def dump_run_config(config: RunConfig, path: str | Path) -> None:
    """Write the config as YAML, atomically (readers never see half a file)."""
    text = yaml.dump(config.model_dump(mode="json"), Dumper=_DUMPER, sort_keys=False)
    write_atomic(path, lambda f: f.write(text.encode()))

"""params.yaml as pydantic models: the only reader of the file.

Every field is required, so params.yaml stays the single place where a default
lives; unknown keys and bad values are errors that name the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

Device = Literal["auto", "cpu", "cuda"]  # train.device: the one device setting


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Field(gt=0.0, lt=1.0)


class PathsParams(_Section):
    workspace: Path


# Image formats ingest can store, and the file extension each is stored under.
IMAGE_EXTENSIONS = {
    "PNG": "png",
    "JPEG": "jpg",
    "MPO": "jpg",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tif",
    "WEBP": "webp",
}
# Pixel modes whose conversion to RGB keeps the picture (16-bit and float modes would clip).
IMAGE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"}


class IngestParams(_Section):
    max_file_bytes: int = Field(gt=0)
    max_pixels: int = Field(gt=0)
    min_side: int = Field(gt=0)
    formats: list[str] = Field(min_length=1)
    modes: list[str] = Field(min_length=1)
    unseen_class_fraction: float = Fraction
    query_image_fraction: float = Fraction
    seed: int

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(IMAGE_EXTENSIONS))
        if unknown:
            raise ValueError(f"unsupported {unknown}; choose from {sorted(IMAGE_EXTENSIONS)}")
        return v

    @field_validator("modes")
    @classmethod
    def _known_modes(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - IMAGE_MODES)
        if unknown:
            raise ValueError(f"unsupported {unknown}; choose from {sorted(IMAGE_MODES)}")
        return v


class DemoParams(_Section):
    seed: int
    base_classes: int = Field(ge=2)
    classes_per_arrival: int = Field(ge=1)
    images_per_class: int = Field(ge=2)
    image_size: int = Field(ge=16)
    arrivals: int = Field(ge=0)


def is_weights_name(weights: str) -> bool:
    """A torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`) rather than a path to a file."""
    return re.fullmatch(r"[A-Z][A-Z0-9_]*", weights) is not None


class ModelParams(_Section):
    backbone: str
    embedding_dim: int = Field(gt=0)
    image_size: int = Field(ge=16)
    stem: Literal["imagenet", "small"]  # small: 3x3 stride-1 conv, no max-pool (ResNet backbones only)
    centre: bool  # subtract the mean output over the trained images before normalising (SimpleShot)
    # A torchvision weights name of the backbone (DEFAULT, IMAGENET1K_V1, ...: from torchvision's
    # cache under TORCH_HOME, downloaded once where the network allows) or a local state_dict file.
    weights: str | None

    @model_validator(mode="after")
    def _known_weights(self) -> ModelParams:
        if self.weights is None or not is_weights_name(self.weights):
            return self  # a file: read (and its errors named) when the model is built
        import torchvision

        names = ["DEFAULT", *torchvision.models.get_model_weights(self.backbone).__members__]
        if self.weights not in names:
            raise ValueError(
                f"weights {self.weights!r} is not a file name nor one of {self.backbone}'s: {', '.join(names)}"
            )
        return self

    @field_validator("backbone")
    @classmethod
    def _torchvision_classifier(cls, v: str) -> str:
        import torchvision  # heavy: only when a params file is actually validated

        known = torchvision.models.list_models(module=torchvision.models)
        if v not in known:
            raise ValueError(f"not a torchvision classification model; e.g. {', '.join(sorted(known)[:6])}, ...")
        if v.startswith(("googlenet", "inception")):
            raise ValueError("auxiliary-output models are not supported as backbones")
        return v


class TrainParams(_Section):
    # Where mnemo runs its network: training, table builds and catch-ups (this process or Dask
    # shards), and the registered model's default when loaded (auto: CUDA when present).
    device: Device
    loss: Literal["triplet", "multi_similarity", "supcon", "proxy_anchor"]
    miner: Literal["batch_hard", "multi_similarity", "none"]
    epochs: int = Field(gt=0)
    lr_schedule: Literal["constant", "cosine"]  # cosine: from lr to 0 over the run, per batch
    augment: Literal["crop", "affine"]  # components/data/transforms.py train_transform
    augment_strength: float = Field(ge=0, le=4)  # scales the augmentation's ranges (1: as documented there)
    erase: float = Field(ge=0, le=1)  # chance of blanking a random patch (occlusion)
    rotation_weight: float = Field(ge=0)  # self-supervised turn prediction (training/selfsup.py); 0 = off
    epoch_length: Literal["groups", "cover"]  # cover: every new image at least once per epoch
    batch_size: int = Field(gt=1)
    m_per_class: int = Field(ge=2)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    margin: float = Field(gt=0)
    temperature: float = Field(gt=0)
    proxy_lr: float = Field(gt=0)
    compile: bool
    num_workers: int = Field(ge=0)
    seed: int
    # Processes of the one training loop (components/training/distributed.py): devices per node
    # (GPUs, or CPU processes under gloo) and nodes; batch_size is the global batch over all of them.
    devices: int = Field(ge=1)
    nodes: int = Field(ge=1)

    @property
    def world_size(self) -> int:
        return self.devices * self.nodes

    @field_validator("batch_size")
    @classmethod
    def _batch_holds_pairs(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even so every batch holds positive pairs")
        return v


class ReplayParams(_Section):
    budget: int = Field(ge=0)  # exemplars over all old classes; 0 turns replay off
    selection: Literal["herding", "random"]
    batch_ratio: float = Field(ge=0, lt=1)  # share of every batch drawn from the memory
    seed: int


class DistillParams(_Section):
    embedding_weight: float = Field(ge=0)  # 0 turns the term off
    embedding_distance: Literal["cosine", "l2"]
    embedding_on: Literal["old", "all"]  # old: only replayed images of old classes; new classes move freely
    relational_weight: float = Field(ge=0)


class CompatParams(_Section):
    """Backward-compatible training, so a new version may answer from its predecessor's table at once
    (components/training/compat.py): none, BCT's influence loss, or a learned old -> new transform."""

    mode: Literal["none", "bct", "transform"]
    # bct: weight of the influence loss (the new embeddings classified by the old model's frozen class
    # prototypes) and the temperature of that cosine classifier.
    influence_weight: float = Field(ge=0)
    temperature: float = Field(gt=0)
    # transform: a two-layer MLP old vector -> new space, fitted on the images both models embedded.
    transform_hidden: PositiveInt
    transform_epochs: PositiveInt
    transform_lr: float = Field(gt=0)
    # The background backfill re-embeds the older model's rows this many at a time (one Lance commit
    # each: its progress survives a kill); who embeds them follows index.engine, as a re-index.
    backfill_rows: PositiveInt


class FewShotTask(_Section):
    way: int = Field(ge=2)  # classes per episode
    shot: int = Field(ge=1)  # support images per class
    # all: an episode's classes drawn from every unseen class; arrival: all from one arrival
    # (Lake et al.'s within-alphabet trials: the candidates look alike)
    within: Literal["all", "arrival"]


class EvaluateParams(_Section):
    recall_at: list[PositiveInt] = Field(min_length=1)
    batch_size: int = Field(gt=0)
    baseline_image_size: int = Field(ge=4)
    few_shot: list[FewShotTask]  # N-way K-shot episodes on unseen classes
    few_shot_episodes: int = Field(gt=0)
    seed: int  # draws the few-shot episodes


class GateParams(_Section):
    # Value thresholds: floors every candidate must meet.
    min_unseen_recall_at_1: float = Field(ge=0, le=1)
    min_unseen_map_at_r: float = Field(ge=0, le=1)
    min_embedding_spread: float = Field(ge=0, le=2)  # mean cosine distance between embeddings; ~0 is collapse
    # Unseen Recall@1 and MAP@R must each beat the raw-pixel baseline of the same run by more than this.
    min_margin_over_pixels: float = Field(ge=-1, le=1)
    min_unseen_few_shot: dict[
        str, float
    ]  # "<N>way_<K>shot[_within_arrival]" -> floor on its accuracy; each task must be in evaluate.few_shot
    # Change thresholds against the champion: skipped when there is none.
    max_unseen_recall_at_1_drop: float = Field(ge=0, le=1)
    max_slice_forgetting: float = Field(ge=0, le=1)  # seen Recall@1 lost on any arrival slice
    # Forward transfer: the champion's Recall@1 on a new arrival's classes before training on them
    # (what users got from the hot add). None: reported, not checked; a floor refuses the automatic
    # promotion naming the arrival, so a person looks at an arrival the model does not transfer to.
    min_forward_transfer_recall_at_1: float | None = Field(ge=0, le=1)
    # Compatibility: a candidate is declared compatible with the champion when the new model's queries against the champion's gallery beat old/old on unseen
    # Recall@1 and MAP@R by more than this; only then is it promoted on the champion's vectors.
    min_compat_gain: float = Field(ge=-1, le=1)


class RegistryParams(_Section):
    model_name: str = Field(min_length=1)
    experiment: str = Field(min_length=1)


class IndexParams(_Section):
    table_prefix: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    batch_size: int = Field(gt=0)  # images per forward pass
    write_rows: int = Field(gt=0)  # rows per LanceDB write while building a table
    keep_tables: int = Field(ge=2)  # validated tables kept (the champion's among them): rollback targets
    probes: int = Field(gt=0)  # stored images re-embedded after a build; each must find itself
    ann_min_rows: int = Field(ge=256)  # below this many rows, exact search: fast enough, and exact
    ann_type: Literal["IVF_PQ", "IVF_HNSW_SQ"]
    ann_partitions: PositiveInt | None  # None: LanceDB's default, from the row count (see params.yaml)
    ann_sub_vectors: PositiveInt | None  # IVF_PQ only; None: LanceDB's default
    ann_nprobes: PositiveInt
    ann_ef: PositiveInt  # IVF_HNSW_SQ only: graph candidates per query (>= k * refine_factor); the build's start
    ann_max_ef: PositiveInt  # the build doubles ef up to this until recall@10 meets ann_min_recall
    ann_refine_factor: PositiveInt | None  # re-rank refine_factor * k candidates exactly; None: off
    ann_retrain_growth: float = Field(gt=1)  # hot adds this many times the rows the index was trained on: retrain it
    ann_min_recall: float = Field(gt=0, le=1)  # ANN recall@10 against exact search below this: not promoted
    recall_probes: PositiveInt  # stored vectors whose ANN and exact neighbours are compared after a build
    old_versions_seconds: int = Field(ge=0)  # grace before a live table's superseded Lance versions go
    optimize_fraction: float = Field(
        ge=0, le=1
    )  # hot-added rows no index covers yet, as a share of the table, before optimize
    # Who embeds the rows of a new table: this process (decoding on a thread pool), or Prefect tasks
    # on a Dask cluster, one per shard (flows/reindex.py); auto: dask once the catalog holds
    # dask_min_images, else this process. MNEMO_DASK_ADDRESS says which cluster, not whether.
    engine: Literal["auto", "process", "dask"]
    dask_workers: PositiveInt  # workers of the LocalCluster started when no scheduler address is given
    dask_min_images: PositiveInt
    shard_images: PositiveInt  # images per embedding task
    # for MNEMO_DASK_ADDRESS's scheduler to answer with a worker, else the build fails
    dask_wait_seconds: float = Field(gt=0)


# What runs the service's forward (components/modeling/runtime.py).
Runtime = Literal["onnxruntime", "torch_channels_last", "torch"]


class ServeParams(_Section):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    refresh_seconds: float = Field(gt=0)  # how often readers re-resolve the champion alias
    max_upload_bytes: int = Field(gt=0)  # a whole request body
    max_upload_pixels: int = Field(gt=0)  # width * height of one image, checked before decoding
    max_request_pixels: int = Field(gt=0)  # width * height summed over a request's images, before decoding
    max_images: int = Field(gt=0)  # images in one request
    max_k: int = Field(gt=0)
    batch_wait_ms: float = Field(ge=0)  # how long a forward waits for concurrent requests' images to join it
    max_batch: int = Field(gt=0)  # images in one batched forward
    runtime: Runtime
    search: Literal["graph", "table"]  # graph: each replica's in-memory HNSW graph (graph.py); table: LanceDB's index
    graph_m: int = Field(ge=4)  # links per node of the serving graph
    graph_ef_construction: int = Field(ge=8)  # candidates while inserting a node
    models_kept: PositiveInt  # loaded models a replica keeps: the live one, then the latest it served
    graph_ef: PositiveInt  # candidates per query to start from; tuned up to index.ann_max_ef for index.ann_min_recall


class ScheduleParams(_Section):
    """When `mnemo deploy` runs the flows: retrain on a cron, the inbox scan on an interval."""

    retrain_cron: str = Field(min_length=1)  # five-field cron, evaluated in UTC by Prefect
    inbox_interval: float = Field(gt=0)  # seconds between inbox scans

    @field_validator("retrain_cron")
    @classmethod
    def _five_field_cron(cls, v: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        if len(v.split()) != 5:
            raise ValueError(f"{v!r} is not a five-field cron expression (minute hour day month weekday)")
        try:
            CronSim(v, datetime(2000, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"{v!r} is not a valid cron expression: {exc}") from None
        return v


class Params(_Section):
    paths: PathsParams
    ingest: IngestParams
    demo: DemoParams
    model: ModelParams
    train: TrainParams
    replay: ReplayParams
    distill: DistillParams
    compat: CompatParams
    evaluate: EvaluateParams
    gate: GateParams
    registry: RegistryParams
    index: IndexParams
    serve: ServeParams
    schedule: ScheduleParams

    @model_validator(mode="after")
    def _gated_tasks_are_measured(self) -> Params:
        from components.evaluation.keys import few_shot  # the one place metric names are made

        measured = {few_shot(t.way, t.shot, t.within) for t in self.evaluate.few_shot}
        unknown = sorted(set(self.gate.min_unseen_few_shot) - measured)
        if unknown:
            raise ValueError(
                f"gate.min_unseen_few_shot names {unknown}, not among evaluate.few_shot {sorted(measured)}"
            )
        return self

    def flat(self, *sections: str) -> dict[str, object]:
        """Dotted keys and values of the given sections, as MLflow params."""
        return {f"{name}.{k}": v for name in sections for k, v in getattr(self, name).model_dump(mode="json").items()}


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a params mapping; errors name `source` and the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "<root>"
            lines.append(f"{source}: {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_params(path: Path | str) -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return parse_params(raw, str(path))


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """A copy of params with dotted keys replaced, validated again (`{"train.epochs": 1}`)."""
    raw = params.model_dump(mode="json")
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"override: {dotted}: no such key")
            node = node[part]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"override: {dotted}: no such key")
        node[leaf] = value
    return parse_params(raw, "override")

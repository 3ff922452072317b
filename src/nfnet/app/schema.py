"""The config schema: every default of the model, data, augment and optim groups and of each entry
point's own keys lives here, with the constraint its one-line check reads (nfnet.app.values).

The YAML files under conf/ extend these dataclasses (`defaults: [base]` in a group, the
`*_schema` configs at the top) and set only what differs: `optim=sgd_agc` is the paper's recipe
because these defaults are the paper's values, each named where it comes from. Hydra type-checks
every override against the annotations; the constraints add ranges and choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, OmegaConf

from nfnet.app.values import Choice, Constraint, Flag, Integer, Name, Number, Text
from nfnet.data.options import AUGMENTS, PACK_SOURCES, SOURCES
from nfnet.data.transforms import AREA_RANGE, CROP_PADDING
from nfnet.models import VARIANTS, get_variant
from nfnet.models.activations import GAMMAS, GELU_APPROXIMATIONS
from nfnet.optim.agc import DEFAULT_EPS, PAPER_CLIPPING
from nfnet.optim.optimizers import OPTIMIZERS, SGD
from nfnet.optim.schedule import PAPER_BASE_LR, PAPER_EMA_DECAY, PAPER_WARMUP_EPOCHS, REFERENCE_BATCH

Real = Union[int, float]  # a number as typed: 0 stays 0 and 1.0 stays 1.0 in the messages


def setting(default: Any, constraint: Constraint | None = None) -> Any:
    """A field with its default and the constraint its check applies."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"constraint": constraint})
    return field(default=default, metadata={"constraint": constraint})


RATE = Number(0, 1, high_open=True)
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# torch, NumPy and Python all take seeds in [0, 2^32 - 1].
SEED = Integer(0, 2**32 - 1, nullable=True, note=" (null: an unseeded run)")


@dataclass
class ModelConfig:
    name: str = setting(MISSING, Choice(tuple(VARIANTS), " (not a known NFNet)"))
    # Read from the variant table, the one home of these numbers (nfnet.models.variants).
    train_size: int = II("variant:${.name},train_size")
    test_size: int = II("variant:${.name},test_size")
    drop_rate: Real = setting(II("variant:${.name},drop_rate"), RATE)
    ra_level: Optional[int] = II("variant:${.name},ra_level")
    # The official training config uses 0.25 (NFNET_SPEC §1.5); the model's own default is 0.1.
    stochdepth_rate: Real = setting(0.25, RATE)
    activation: str = setting("gelu", Choice(tuple(sorted(GAMMAS))))
    # "tanh" is the official GELU (jax.nn.gelu's default); "none" (exact erf) matches timm's ports.
    gelu_approximate: str = setting("tanh", Choice(GELU_APPROXIMATIONS))
    # A DeepMind *_haiku.npz, a timm or safetensors file, or a checkpoint written by train.py;
    # the classifier is re-initialised when its class count differs from the data's.
    pretrained: Optional[str] = setting(None, Text("no pretrained weights", "a weights file"))
    # torch.compile of the network: false, true (= default), or a mode; reduce-overhead captures
    # the forward and backward in CUDA graphs (the step must not read the device: it does not).
    compile: Any = setting(False, Choice(COMPILE_MODES))
    channels_last: bool = setting(False, Flag())
    # Activation checkpointing (recompute in the backward pass): false, per `stage` or per
    # `block` (F3-F7 at their sizes: 0.18x the activation memory for 1.27x the step time, F3 320 px).
    grad_checkpointing: Any = setting(False, Choice((False, "stage", "block")))


@dataclass
class ShapesConfig:
    seed: int = setting(0, Integer(0))
    train_per_class: int = setting(500, Integer())
    val_per_class: int = setting(100, Integer())
    image_size: int = setting(64, Integer(8))


@dataclass
class DataConfig:
    source: str = setting("shapes", Choice(SOURCES))
    root: Optional[str] = setting(None, Text("(the embedded dataset's cache)", "a folder"))
    train_size: int = setting(II("model.train_size"), Integer())
    test_size: int = setting(II("model.test_size"), Integer())
    # The official eval resizes to (S + 32)^2 and centre-crops S.
    eval_pad: int = setting(CROP_PADDING, Integer(0, note=" (pixels added before the eval centre crop; the official value is 32)"))
    batch_size: int = setting(64, Integer(note=" (examples per device)"))
    # Examples per optimizer step over all devices; when set, it replaces batch_size with
    # global_batch_size / (devices x nodes x accumulate_grad_batches), which must divide evenly.
    global_batch_size: Optional[int] = setting(None, Integer(nullable=True, note=" (examples per optimizer step over all devices)"))
    eval_batch_size: Optional[int] = setting(None, Integer(nullable=True))
    num_workers: int = setting(2, Integer(0))
    # augment=official: `gpu` has the loader workers only read file bytes and draw the random
    # parameters, and decodes (nvjpeg), crops, resizes, mixes and RandAugments batched on the
    # training device (docs/DATA.md); the same pixels as `cpu` on CPU tensors.
    decode: str = setting("cpu", Choice(("cpu", "gpu")))
    pin_memory: bool = setting(False, Flag())
    persistent_workers: bool = setting(True, Flag())
    # data=imagefolder: the seeded fraction of each class held out for validation.
    val_fraction: Real = setting(0.1, Number(0, 1, low_open=True, high_open=True))
    split_seed: int = setting(0, Integer(0))
    max_bad_fraction: Real = setting(0.01, Number(0, 1))
    # Symbolic links in the tree are followed, never into a folder already scanned (no loops);
    # false skips every link.
    follow_links: bool = setting(True, Flag())
    # Where a folder's index (its scan and header checks, built once) goes when the folder itself
    # cannot be written; null: ~/.cache/nfnet-lightning/folder-index.
    index_dir: Optional[str] = setting(None, Text("(~/.cache/nfnet-lightning/folder-index)", "a folder"))
    # data=streaming from an object store (s3://, gs://, azure://): where LitData keeps the index and
    # the bytes it fetched; null: $LITDATA_CACHE_DIR, else ~/.lightning/chunks.
    cache_dir: Optional[str] = setting(None, Text("(LitData's cache: $LITDATA_CACHE_DIR or ~/.lightning/chunks)", "a folder"))
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    # update.py: what a class of the model became when its folder is gone, {old: new folder} (renamed,
    # or merged into an existing class) or {old: null} (removed); checked in nfnet.app.checks.
    class_map: Dict[str, Optional[str]] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    name: str = setting(MISSING, Choice(AUGMENTS))
    # basic/light: the smallest random-resized crop, as a fraction of the image (official 0.08).
    crop_min_area: Real = setting(AREA_RANGE[0], Number(0, 1, low_open=True, note=" (the smallest crop, as a fraction of the image)"))
    # A random horizontal flip of every training image; false for digits, text and other images
    # whose mirror image is another class or none.
    hflip: bool = setting(True, Flag())
    # <layers><magnitude as 2 digits>, e.g. 405; null for none (checked in nfnet.app.checks). official
    # applies it to the mixed images, basic/light to each cropped image.
    ra_level: Optional[int] = None
    mixup_alpha: Real = setting(0.2, Number(0, low_open=True))  # NFNET_SPEC §4.3: never overridden
    mixup: bool = setting(True, Flag())
    cutmix: bool = setting(True, Flag())


@dataclass
class AGCConfig:
    clipping: Optional[Real] = setting(PAPER_CLIPPING, Number(0, low_open=True, nullable="to disable AGC", note=" (the AGC lambda)"))
    eps: Real = setting(DEFAULT_EPS, Number(0, low_open=True))


@dataclass
class EMAConfig:
    decay: Optional[Real] = setting(PAPER_EMA_DECAY, Number(0, 1, low_open=True, high_open=True, nullable="to disable EMA"))


@dataclass
class OptimConfig:
    """The paper's recipe (NFNET_SPEC §3-§4); `optim=tiny` shortens it for the CPU default run."""

    base_lr: Real = setting(PAPER_BASE_LR, Number(0, low_open=True, note=" (the LR at batch 256; it scales with the global batch)"))
    reference_batch: int = setting(REFERENCE_BATCH, Integer())
    momentum: Real = setting(0.9, Number(0, 1, high_open=True))
    nesterov: bool = setting(True, Flag())
    # Coupled L2, not on gains, biases or skip gains.
    weight_decay: Real = setting(2e-5, Number(0))
    warmup_epochs: Real = setting(PAPER_WARMUP_EPOCHS, Number(0))
    end_lr: Real = setting(0.0, Number(0))
    label_smoothing: Real = setting(0.1, RATE)
    agc: AGCConfig = field(default_factory=AGCConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    # A step whose loss or gradients hold NaN/Inf is skipped (weights, momentum and EMA untouched)
    # and counted as train/skipped_steps; this many in a row stop the run, keeping the last good
    # checkpoint (null: never stop). Not on TPU, where the check would stall the device.
    skip_nonfinite: bool = setting(True, Flag())
    max_consecutive_skips: Optional[int] = setting(10, Integer(nullable=True, note=" (non-finite steps in a row that stop the run)"))
    # sgd: the paper's (momentum, nesterov, coupled weight decay); adamw: decoupled weight decay, for
    # fine-tuning (nfnet.optim.optimizers).
    optimizer: str = setting(SGD, Choice(OPTIMIZERS))
    # The classifier's (weight and bias) peak LR over the others': new rows must learn in few steps.
    head_lr_mult: Real = setting(1.0, Number(0, low_open=True, note=" (the classifier's peak LR over the trunk's)"))
    # Train the classifier alone (the trunk's gradients are never computed).
    freeze_trunk: bool = setting(False, Flag())
    # The warmup as a share of the run's steps; it replaces warmup_epochs, so the warmup follows the
    # run's length (steps=, below) whatever the dataset's size.
    warmup_fraction: Optional[Real] = setting(None, Number(0, 1, high_open=True, nullable="to count the warmup in optim.warmup_epochs"))


@dataclass
class RunConfig:
    """What train.py and update.py share: the groups above and the keys of any training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Library objects built by hydra.utils.instantiate: their keys are the libraries' own.
    trainer: Any = None
    callbacks: Any = None
    logger: Any = None
    paths: Any = None
    module: Any = None
    datamodule: Any = None
    task_name: str = setting("train", Name())
    tags: List[str] = field(default_factory=lambda: ["dev"])
    # Seeds Python, NumPy, torch and the dataloader workers; null leaves the run unseeded.
    seed: Optional[int] = setting(0, SEED)
    print_config: bool = setting(True, Flag())
    # Keys a config cannot run without (experiment=finetune needs weights): a `???` would not do,
    # since merging `???` over a default keeps the default.
    requires: List[str] = field(default_factory=list)
    # The run's length in optimizer steps, whatever the dataset's size: trainer.max_steps, with
    # trainer.max_epochs the epochs that hold them (a small folder trains more epochs than a large one).
    steps: Optional[int] = setting(None, Integer(nullable=True, note=" (null: trainer.max_epochs as given)"))


@dataclass
class TrainConfig(RunConfig):
    """`python train.py`: the groups above plus the run's own keys (conf/train.yaml)."""

    train: bool = setting(True, Flag())
    # After fitting, evaluate the best checkpoint on the validation split.
    test: bool = setting(True, Flag())
    # A checkpoint to resume from: a path, or `last` for this run directory's latest.
    ckpt_path: Optional[str] = setting(None, Text("to start fresh", "a checkpoint file or `last`"))
    resume: bool = setting(False, Flag())
    # The value train.py returns to sweepers (Optuna maximizes it).
    optimized_metric: Optional[str] = "val/acc_top1"


@dataclass
class WeightsConfig:
    """What eval.py, predict.py and export.py load: a train.py checkpoint or pretrained weights."""

    paths: Any = None
    task_name: str = setting(MISSING, Name())
    ckpt_path: Optional[str] = setting(None, Text("(then pretrained= names the weights)", "a checkpoint file"))
    # DeepMind *_haiku.npz, timm dm_nfnet_*, safetensors, with the variant's name in model_name.
    pretrained: Optional[str] = setting(None, Text("(then ckpt_path= names the weights)", "a weights file"))
    # A model registry written by update.py (its current version) or one of its version folders.
    registry: Optional[str] = setting(None, Text("(then ckpt_path= or pretrained= names the weights)", "a folder"))
    model_name: Optional[str] = None
    # ema | raw: which of a checkpoint's two weight sets.
    weights: str = setting("ema", Choice(("ema", "raw"), " (a checkpoint's EMA or raw weights)"))
    # null: the test size the checkpoint was validated at (the variant's test size).
    image_size: Optional[int] = setting(None, Integer(nullable=True, note=" (null: the size the weights were evaluated at)"))
    # null: as during training (the official 32: resize to (S+32)^2, centre-crop S).
    eval_pad: Optional[int] = setting(None, Integer(0, nullable=True))


@dataclass
class EvalConfig(WeightsConfig):
    trainer: Any = None
    split: str = setting("val", Choice(("val", "train")))
    # null keeps the dataset the checkpoint was trained on; pretrained weights need both.
    source: Optional[str] = setting(None, Choice((*SOURCES, None)))
    root: Optional[str] = None
    batch_size: int = setting(64, Integer())
    num_workers: int = setting(2, Integer(0))
    seed: Optional[int] = setting(0, SEED)
    output: Optional[str] = None


@dataclass
class VideoConfig:
    every_n_frames: int = setting(1, Integer(note=" (classify every n-th frame)"))
    max_frames: Optional[int] = setting(None, Integer(nullable=True, note=" (null: the whole video; a camera runs until Ctrl-C)"))


@dataclass
class PredictConfig(WeightsConfig):
    input: str = MISSING
    # A file with one class name per line, for pretrained weights (checkpoints carry theirs).
    class_names: Optional[str] = None
    top_k: int = setting(5, Integer())
    format: str = setting("json", Choice(("json", "csv")))
    output: Optional[str] = None
    batch_size: int = setting(16, Integer())
    device: str = "auto"
    video: VideoConfig = field(default_factory=VideoConfig)


EXPORT_FORMATS = ("onnx", "torch", "safetensors", "timm")


@dataclass
class HubConfig:
    # user/name: upload the formats=timm folder to this Hugging Face Hub model repo (needs a token).
    repo_id: Optional[str] = setting(None, Text("(no upload)", "a Hub repo id user/name"))
    private: bool = setting(False, Flag())


@dataclass
class ExportConfig(WeightsConfig):
    formats: Any = field(default_factory=lambda: ["onnx", "torch"])
    output_dir: Optional[str] = None
    check: bool = setting(True, Flag())
    # Allowed logit difference, relative to the largest logit.
    tolerance: Real = setting(1e-4, Number(0, low_open=True, note=" (allowed logit difference, relative to the largest logit)"))
    hub: HubConfig = field(default_factory=HubConfig)


def _data_setting(key: str) -> Any:
    """A data field that pack.py shares (the split of one folder, the bad-file limit), with its
    default and constraint from DataConfig: one home."""
    shared = DataConfig.__dataclass_fields__[key]
    return setting(shared.default, shared.metadata["constraint"])


@dataclass
class PackConfig:
    """`python pack.py`: an image folder or ILSVRC-2012 -> LitData shards for data=streaming."""

    paths: Any = None
    task_name: str = setting("pack", Text())
    source: str = setting(MISSING, Choice(PACK_SOURCES))
    root: str = setting(MISSING, Text(what="the folder to pack"))
    output_dir: str = setting(MISSING, Text(what="the folder the shards are written to"))
    # source=imagefolder: the validation split is data=imagefolder's, so both train on the same files.
    val_fraction: Real = _data_setting("val_fraction")
    split_seed: int = _data_setting("split_seed")
    follow_links: bool = _data_setting("follow_links")
    max_bad_fraction: Real = _data_setting("max_bad_fraction")
    # source=imagenet with one flat val/ folder: its ground truth (LOC_val_solution.csv or the devkit's
    # ILSVRC2012_validation_ground_truth.txt); null: looked for where a download keeps it.
    imagenet_val_labels: Optional[str] = setting(None, Text("(found in the dataset's folders)", "a ground-truth file"))
    # Processes that read and decode-check the files (the writer is one more).
    workers: int = setting(4, Integer(note=" (processes reading the files)"))
    # LitData's chunk size; tens of MiB stream well from object stores.
    chunk_mb: int = setting(64, Integer(note=" (MiB per chunk file)"))
    progress: bool = setting(True, Flag())


@dataclass
class GateConfig:
    """When a round's candidate replaces the model in service (nfnet.inference.promotion)."""

    # How far the candidate's top-1 may fall below the current model's, on this round's validation
    # set and on the previous round's.
    tolerance: Real = setting(0.01, Number(0, 1, note=" (how far below the current model's top-1 a candidate may be)"))
    # How far any class the current model knows may fall, on either set: a small validation set
    # moves by 1/n per image (0.1 is one image in ten).
    max_class_drop: Real = setting(0.1, Number(0, 1, note=" (how far one old class's top-1 may fall)"))


@dataclass
class ReplayConfig:
    """What a round trains on besides the images that arrived since the current version."""

    # The share of the current version's training images trained on again (a seeded choice by path).
    fraction: Real = setting(1.0, Number(0, 1, low_open=True, note=" (the share of the last round's training images trained on again)"))
    # How many times each new training image appears per epoch.
    new_repeats: int = setting(1, Integer(note=" (times each new training image appears per epoch)"))


@dataclass
class UpdateConfig(RunConfig):
    """`python update.py data.root=DIR registry=MODELS`: one round (or rounds as images arrive, with
    watch=true) of training, evaluation and promotion (conf/update.yaml)."""

    registry: str = setting(MISSING, Text(what="a folder (the model registry; created when absent)"))
    gate: GateConfig = field(default_factory=GateConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    # A round even when no image was added or changed since the current version.
    force: bool = setting(False, Flag())
    # Wait for min_new_images new images, run a round, and again, up to max_rounds rounds (null: no end);
    # the folder is looked at every poll_seconds, for at most max_wait_seconds without a round.
    watch: bool = setting(False, Flag())
    min_new_images: int = setting(1, Integer(note=" (new images that start a round)"))
    poll_seconds: Real = setting(60, Number(0, low_open=True, note=" (seconds between looks at the folder)"))
    max_rounds: Optional[int] = setting(None, Integer(nullable=True, note=" (null: no end)"))
    max_wait_seconds: Optional[Real] = setting(None, Number(0, nullable="to wait without end", note=" (seconds to wait for images without a round)"))


GROUPS = {"model": ModelConfig, "data": DataConfig, "augment": AugmentConfig, "optim": OptimConfig}
ENTRIES = {"train": TrainConfig, "eval": EvalConfig, "predict": PredictConfig, "export": ExportConfig, "pack": PackConfig,
           "update": UpdateConfig}


def _variant_field(name: str, key: str):
    if name not in VARIANTS:
        raise ValueError(f"model.name={name!r} is not a known NFNet; choose one of: {', '.join(VARIANTS)}")
    known = [f.name for f in dataclasses.fields(get_variant(name))]
    if key not in known:
        raise ValueError(f"the variant table has no field {key!r}; it has: {', '.join(known)}")
    return getattr(get_variant(name), key)


def register() -> None:
    """Make the schema and the `${variant:...}` resolver known to Hydra (once per process)."""
    if not OmegaConf.has_resolver("variant"):
        OmegaConf.register_new_resolver("variant", _variant_field)
    store = ConfigStore.instance()
    for group, node in GROUPS.items():
        store.store(group=group, name="base", node=node)
    for entry, node in ENTRIES.items():
        store.store(name=f"{entry}_schema", node=node)


def section(group: str, **values: Any) -> dict[str, Any]:
    """A group's config as a plain dict: the schema's defaults with `values` over them, resolved.

    For building the module and datamodule from Python without Hydra, e.g.
    `NFNetClassifier(section("model", name="nfnet_f0"), section("optim"), num_classes=1000)`;
    `data` needs its sizes given (`train_size=`, `test_size=`), which the command line takes from
    the model.
    """
    register()
    node = OmegaConf.merge(OmegaConf.structured(GROUPS[group]), values)
    return OmegaConf.to_container(node, resolve=True)


def constraint_at(schema: type, key: str) -> Constraint | None:
    """The constraint of a dotted key in a schema (None for a key without one)."""
    node, constraint = schema, None
    for part in key.split("."):
        match = {f.name: f for f in dataclasses.fields(node)}.get(part) if dataclasses.is_dataclass(node) else None
        if match is None:
            return None
        constraint = match.metadata.get("constraint")
        node = match.default_factory if match.default_factory is not dataclasses.MISSING else None
    return constraint


def constrained_keys(schema: type, prefix: str = "") -> list[tuple[str, Constraint]]:
    """Every (dotted key, constraint) of a schema, nested dataclasses included."""
    found = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested):
            found += constrained_keys(nested, f"{key}.")
        elif f.metadata.get("constraint") is not None:
            found.append((key, f.metadata["constraint"]))
    return found

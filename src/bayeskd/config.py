"""The typed schema of params.yaml: every stage validates the whole file before doing any work.

It is also the one list of the names params.yaml may use (datasets, nets, teacher losses,
distillation methods with their hyperparameters), so params validate without importing torch; the
registries that implement the names (bayeskd.data, bayeskd.nets, bayeskd.losses, bayeskd.distill)
are keyed by these lists and checked against them when imported.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

PARAMS_FILE = "params.yaml"
VALIDATED_FILE = "reports/params.validated.json"  # check_params' digest of the params.yaml it validated

DATASETS = ("gaussian", "gaussian_images", "digits", "cifar10", "cifar100", "imagefolder")
TEACHER_LOSSES = ("ce", "mse", "ls")
EMBEDDED_NETS = ("mlp_teacher", "mlp_student", "cnn_teacher", "cnn_student")
ZOO_NETS = (  # the standard CIFAR knowledge-distillation zoo (bayeskd.zoo)
    *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)), "resnet8x4", "resnet32x4", "ResNet18", "ResNet50",
    *(f"wrn_{d}_{w}" for d in (16, 40) for w in (1, 2)), *(f"vgg{d}" for d in (8, 11, 13, 16, 19)),
    "MobileNetV2", "ShuffleV1", "ShuffleV2",
)
NETS = EMBEDDED_NETS + ZOO_NETS

Fraction = Annotated[float, Field(gt=0, lt=1)]
PositiveInt = Annotated[int, Field(gt=0)]
NetName = Literal[NETS]


def bounded(low: int, high: int, why: str) -> type[int]:
    """An int in [low, high]: bounds that catch typos (a runaway value starts runaway work); the
    error names the range and `why`."""

    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low:,} and {high:,}: {why}")
        return value

    return Annotated[int, AfterValidator(check), Field(json_schema_extra={"minimum": low, "maximum": high})]


Epochs = bounded(1, 10_000, "more is taken for a typo (the CIFAR recipe trains 240 epochs)")
BatchSize = bounded(1, 65_536, "more is taken for a typo (the CIFAR recipe uses 64)")
IMAGES_WHY = "more is taken for a typo (CIFAR has 50,000 training images)"


def check_registry(kind: str, names: Iterable[str], implemented: Iterable[str]) -> None:
    """For registries, at import: they must implement exactly the names params.yaml may use."""
    if set(implemented) != set(names):
        raise RuntimeError(f"the {kind} registry implements {sorted(implemented)}, but bayeskd.config "
                           f"lists {sorted(names)}")


class Section(BaseModel):
    # strict types; floats must be finite (an infinite learning rate is a typo, not a setting)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Gaussian(Section):
    n_samples: bounded(1, 10_000_000, "more is taken for a typo (the paper's benchmark draws 100,000)")
    n_classes: Annotated[int, Field(ge=2)]
    dim: PositiveInt
    noise_var: Annotated[float, Field(gt=0)]
    train_fraction: Fraction
    val_fraction: Fraction

    @model_validator(mode="after")
    def _test_split_left(self) -> Gaussian:
        if self.train_fraction + self.val_fraction >= 1:
            raise ValueError(
                f"train_fraction + val_fraction = {self.train_fraction + self.val_fraction}: "
                "must be below 1 so that a test split remains"
            )
        n = self.n_samples
        n_train, n_val = round(self.train_fraction * n), round(self.val_fraction * n)  # as data.make_gaussian
        sizes = {"training": n_train, "validation": n_val, "test": n - n_train - n_val}
        if min(sizes.values()) < self.n_classes:
            shown = ", ".join(f"{size} {split}" for split, size in sizes.items())
            raise ValueError(f"n_samples = {n} gives {shown} samples; each split needs at least n_classes = "
                             f"{self.n_classes} (the data validation expects every class in every split)")
        return self


class GaussianImages(Section):
    """Synthetic CIFAR-format images with exact p* (bayeskd.synthetic): a latent Gaussian mixture per
    class, a smooth random linear decoder and isotropic pixel noise."""

    n_train: bounded(1, 1_000_000, IMAGES_WHY)
    n_val: bounded(0, 1_000_000, IMAGES_WHY)  # 0: no validation split
    n_test: bounded(1, 1_000_000, IMAGES_WHY)
    n_classes: Annotated[int, Field(ge=2)]
    channels: PositiveInt
    image_size: PositiveInt
    latent_dim: PositiveInt
    modes_per_class: PositiveInt
    bayes_accuracy: Fraction  # the target; the latent spread is calibrated to it
    smoothness: Annotated[float, Field(ge=0)]  # blur std of the decoder's fields, in pixels
    margin: Annotated[int, Field(ge=0)]  # the fields are 0 this close to the border
    contrast: Annotated[float, Field(gt=0, lt=0.5)]  # largest RMS deviation of a noise-free pixel from 0.5
    pixel_noise: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _feasible(self) -> GaussianImages:
        if self.bayes_accuracy <= 1 / self.n_classes:
            raise ValueError(f"bayes_accuracy = {self.bayes_accuracy}: must be above chance, "
                             f"1/n_classes = {1 / self.n_classes:.4g}")
        for split in ("n_train", "n_val", "n_test"):
            n = getattr(self, split)
            if 0 < n < self.n_classes:
                raise ValueError(f"{split} = {n}: a split needs at least n_classes = {self.n_classes} images "
                                 "(the data validation expects every class in every split)"
                                 + ("; 0 for none" if split == "n_val" else ""))
        if 2 * self.margin + 1 >= self.image_size:
            raise ValueError(f"margin = {self.margin} leaves no pixels of a {self.image_size}-pixel image "
                             "to the decoder's fields; use less than (image_size - 1) / 2")
        return self


class Digits(Section):
    val_fraction: Fraction
    test_fraction: Fraction

    @model_validator(mode="after")
    def _train_split_left(self) -> Digits:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction}: "
                "must be below 1 so that a training split remains"
            )
        return self


class Augment(Section):
    """Training views: random crop with `padding` pixels of zero padding, and horizontal flip.
    0 trains on the inputs as they are (one view)."""

    padding: Annotated[int, Field(ge=0, le=16)]


class Images(Section):
    """Datasets read from disk through torchvision: cifar10, cifar100 (the "python version" files
    under `root`) and imagefolder (`root/train/<class>/*`, `root/test/<class>/*`)."""

    root: str
    download: bool  # cifar only: fetch the files into root when they are missing
    val_fraction: Annotated[float, Field(ge=0, lt=1)]  # held out of train, stratified; 0: none
    image_size: PositiveInt  # imagefolder: images are resized to image_size x image_size


class Data(Section):
    name: Literal[DATASETS]
    seed: Annotated[int, Field(ge=0)]
    gaussian: Gaussian
    gaussian_images: GaussianImages
    digits: Digits
    images: Images
    augment: Augment

    @model_validator(mode="after")
    def _views_need_images(self) -> Data:
        if self.name == "gaussian" and self.augment.padding > 0:
            raise ValueError(f"augment.padding = {self.augment.padding}: the gaussian dataset has no "
                             "images to crop; use 0")
        return self


class Optim(Section):
    """SGD with momentum and a step schedule: lr is multiplied by gamma after each milestone epoch."""

    epochs: Epochs
    batch_size: BatchSize
    lr: Annotated[float, Field(gt=0)]
    momentum: Annotated[float, Field(ge=0, lt=1)]
    weight_decay: Annotated[float, Field(ge=0)]
    milestones: list[PositiveInt]
    gamma: Annotated[float, Field(gt=0, le=1)]

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if v != sorted(set(v)):
            raise ValueError(f"{v}: milestones must be strictly increasing")
        return v

    @model_validator(mode="after")
    def _milestones_within_the_epochs(self) -> Optim:
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            raise ValueError(f"milestones = {self.milestones}: {', '.join(map(str, late))} not within the "
                             f"{self.epochs} epochs; a milestone lies in 1..{self.epochs - 1} (the rate "
                             f"falls after that many epochs, so at {self.epochs} or later it never falls)")
        return self


class Teacher(Section):
    net: NetName
    loss: Literal[TEACHER_LOSSES]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    optim: Optim


# Each distillation method's hyperparameters with their defaults: params.yaml holds them under
# `student.<method>`, and the method (bayeskd.distill, bayeskd.feature) takes them as its keyword-only
# arguments.
Weight = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]


class Hparams(Section):
    """A method without hyperparameters (`none`); the base of those with some."""


class KD(Hparams):
    temperature: Positive = 4.0
    ce_weight: Weight = 0.1
    kd_weight: Weight = 0.9


class DKD(Hparams):
    temperature: Positive = 4.0
    ce_weight: Weight = 1.0
    alpha: Weight = 1.0
    beta: Weight = 8.0
    warmup: PositiveInt = 20


class DIST(Hparams):
    tau: Positive = 4.0
    ce_weight: Weight = 1.0
    beta: Weight = 2.0
    gamma: Weight = 2.0


class LSKD(KD):
    temperature: Positive = 2.0
    ce_weight: Weight = 0.1
    kd_weight: Weight = 9.0


class LSDKD(DKD):
    temperature: Positive = 2.0
    ce_weight: Weight = 1.0
    alpha: Weight = 9.0
    beta: Weight = 72.0
    warmup: PositiveInt = 20


class FeatureHparams(Hparams):
    weight: Weight
    ce_weight: Weight = 1.0


class FitNet(FeatureHparams):
    weight: Weight = 100.0


class AT(FeatureHparams):
    weight: Weight = 1000.0
    p: Positive = 2.0


class SP(FeatureHparams):
    weight: Weight = 3000.0


class CC(FeatureHparams):
    weight: Weight = 0.02
    embed_dim: PositiveInt = 128


class VID(FeatureHparams):
    weight: Weight = 1.0
    init_pred_var: Positive = 5.0
    eps: Positive = 1e-5


class RKD(FeatureHparams):
    weight: Weight = 1.0
    distance_weight: Weight = 25.0
    angle_weight: Weight = 50.0


class PKT(FeatureHparams):
    weight: Weight = 30000.0
    eps: Positive = 1e-7


class CRD(FeatureHparams):
    weight: Weight = 0.8
    feat_dim: PositiveInt = 128
    nce_k: PositiveInt = 16384
    nce_t: Positive = 0.07
    nce_m: Annotated[float, Field(ge=0, le=1)] = 0.5


class ReviewKD(FeatureHparams):
    weight: Weight = 1.0
    warmup: PositiveInt = 20
    max_mid_channels: PositiveInt = 512


class HSAKD(FeatureHparams):
    weight: Weight = 1.0
    joint_weight: Weight = 1.0
    teacher_weight: Weight = 1.0
    temperature: Positive = 3.0


METHODS: dict[str, type[Hparams]] = {
    "none": Hparams, "kd": KD, "dkd": DKD, "dist": DIST, "lskd": LSKD, "lsdkd": LSDKD,
    "fitnet": FitNet, "at": AT, "sp": SP, "cc": CC, "vid": VID, "rkd": RKD, "pkt": PKT, "crd": CRD,
    "reviewkd": ReviewKD, "hsakd": HSAKD,
}


def hparams(method: str) -> dict[str, float | int]:
    """Method `method`'s hyperparameters and their defaults."""
    return METHODS[method]().model_dump()


# student.<method> for every method with hyperparameters, each defaulting to the method's defaults
_MethodSections = create_model("MethodSections", __base__=Section,
                               **{name: (hp, hp()) for name, hp in METHODS.items() if hp.model_fields})


class Student(_MethodSections):
    """The student's net, its distillation method, and each method's hyperparameters under
    `student.<method>` (only the chosen method's are used)."""

    net: NetName
    method: Literal[tuple(METHODS)]
    optim: Optim

    def hparams(self) -> dict[str, float | int]:
        """The chosen method's hyperparameters."""
        section = getattr(self, self.method, None)
        return section.model_dump() if section is not None else {}


class Cache(Section):
    dtype: Literal["float16", "bfloat16", "float32"]
    shard_size: bounded(100, 1_000_000, "a shard is computed in memory, and fewer than 100 samples per "
                        "shard is taken for a typo (the CIFAR presets use 5,000)")
    views: Literal["all"] | PositiveInt  # every view of the view space, or this many per sample
    topk: Annotated[int, Field(ge=0)]  # 0 stores all classes; k stores the k largest logits
    min_accuracy: Annotated[float, Field(ge=0, le=1)]  # the teacher's least plausible accuracy on its views


class Compute(Section):
    processes: Annotated[int, Field(ge=1, le=64)]  # training processes per stage (torchrun, DDP)
    compile: bool  # torch.compile the training forward


class Evaluate(Section):
    ece_bins: Annotated[int, Field(ge=1, le=1000)]


class Export(Section):
    opset: Annotated[int, Field(ge=17, le=23)]
    batch_size: BatchSize
    latency_runs: bounded(1, 10_000, "more is taken for a typo (50 by default)")
    max_abs_diff: Annotated[float, Field(gt=0)]


class Params(Section):
    seed: Annotated[int, Field(ge=0)]
    data: Data
    teacher: Teacher
    cache: Cache
    student: Student
    compute: Compute
    evaluate: Evaluate
    export: Export

    @model_validator(mode="after")
    def _topk_below_the_classes(self) -> Params:
        classes = {"gaussian": self.data.gaussian.n_classes, "digits": 10, "cifar10": 10, "cifar100": 100,
                   "gaussian_images": self.data.gaussian_images.n_classes}
        k, known = self.cache.topk, classes.get(self.data.name)  # imagefolder: counted when read
        if k and known is not None and k >= known:
            raise ValueError(f"cache.topk = {k}: must be below the {known} classes of data.name = "
                             f"{self.data.name!r} (0 stores all logits)")
        return self


def with_overrides(params: dict, overrides: dict[str, object], source: str = "overrides") -> dict:
    """A copy of the params.yaml mapping with dotted-key overrides applied, validated."""
    params = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ParamsError(f"{source}: {dotted} = {value!r}: {'.'.join(parents)} is not a section")
        node[key] = value
    parse(params, source)  # raises ParamsError naming key, value and what is allowed
    return params


PRESETS_FILE = "presets.yaml"


def preset(name: str, path: str | Path = PRESETS_FILE) -> dict[str, object]:
    """The dotted-key overrides of preset `name`: for a CIFAR pair the shared recipe, then the pair's
    own values; a preset of the `synthetic` section is complete in itself."""
    named = presets_in(path)
    if name not in named:
        raise ParamsError(f"preset {name!r} does not exist; expected one of {', '.join(named)} "
                          "(`bayeskd preset --list`)")
    return dict(named[name])


def presets_in(path: str | Path = PRESETS_FILE) -> dict[str, dict[str, object]]:
    """Every preset of presets.yaml by name, as its complete dotted-key overrides; ParamsError naming
    the file and what is wrong if it is not such a file."""
    presets = read(path)
    if not isinstance(presets, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (recipe, pairs, synthetic), found a "
                          f"{type(presets).__name__}")
    recipe, pairs, synthetic = presets.get("recipe"), presets.get("pairs"), presets.get("synthetic") or {}
    named = lambda node: isinstance(node, dict) and all(isinstance(v, dict) for v in node.values())  # noqa: E731
    if not (isinstance(recipe, dict) and named(pairs) and named(synthetic)):
        raise ParamsError(f"{path}: expected `recipe` (key: value settings), `pairs` and optionally "
                          "`synthetic` (each a mapping of preset names to key: value settings)")
    return {k: recipe | v for k, v in pairs.items()} | synthetic


def override_args(overrides: dict[str, object]) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`, one shell word each (no spaces in values)."""
    out = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        out += ["-S", f"{key}={text}"]
    return out


def preset_args(name: str, path: str | Path = PRESETS_FILE) -> list[str]:
    """Preset `name` as `dvc exp run` arguments (`override_args`)."""
    return override_args(preset(name, path))


class ParamsError(ValueError):
    """params.yaml does not match the schema; the message names each key, value and what is allowed."""


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        sub = getattr(model.model_fields.get(str(part)), "annotation", None)
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{key} = {err['input']!r}: unknown key; allowed here: {', '.join(_allowed_keys(loc[:-1]))}"
    if err["type"] == "missing":
        return f"{key}: missing; this key is required"
    if err["type"] == "literal_error":
        return f"{key} = {err['input']!r}: not allowed; expected {err['ctx']['expected']}"
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(err["input"], dict):  # a model-level check: the message already names the values
        return msg if not loc or msg.startswith(f"{key}.") else f"{key}: {msg}"
    return f"{key} = {err['input']!r}: {msg}"


def parse(raw: object, source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = [f"{source}: {_describe(err)}" for err in e.errors()]
        raise ParamsError("\n".join(lines)) from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last one silently).
    Keys merged in with `<<:` may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: bytes | str, source: str) -> object:
    """YAML text (UTF-8) as Python objects; ParamsError naming `source` if it is not UTF-8, not
    YAML, or gives a key twice."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader
    except UnicodeDecodeError as e:
        raise ParamsError(f"{source}: not UTF-8 text (byte 0x{text[e.start]:02x} at offset {e.start})") \
            from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{source}: not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None


def read(path: str | Path) -> object:
    """A YAML file (params.yaml, presets.yaml) as Python objects; ParamsError naming the file."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ParamsError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_yaml(text, str(path))


def digest(raw: object) -> str:
    """The sha256 of parameter values (not of the file's bytes: comments and layout do not count).
    check_params records the digest of the params.yaml it validated; each stage compares it."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def load_digest(path: str | Path = PARAMS_FILE) -> tuple[Params, str]:
    """The parameters, validated, and the digest of their values, from one reading of the file."""
    raw = read(path)
    return parse(raw, str(path)), digest(raw)


def load(path: str | Path = PARAMS_FILE) -> Params:
    return load_digest(path)[0]


def load_digest_or_exit(path: str | Path = PARAMS_FILE) -> tuple[Params, str]:
    """For stage entry points: a bad params.yaml ends the process with exit code 2 and one message."""
    try:
        return load_digest(path)
    except ParamsError as e:
        print(f"error: invalid parameters\n{e}", file=sys.stderr)
        raise SystemExit(2) from None


def load_or_exit(path: str | Path = PARAMS_FILE) -> Params:
    return load_digest_or_exit(path)[0]

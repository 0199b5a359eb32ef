"""The typed schema of params.yaml: every stage validates the whole file before doing any work.

It is also the one list of the names params.yaml may use (datasets, nets, teacher losses,
distillation methods with their hyperparameters), so params validate without importing torch; the
registries that implement the names (bayeskd.data, bayeskd.nets, bayeskd.losses, bayeskd.distill)
are keyed by these lists and checked against them when imported.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

PARAMS_FILE = "params.yaml"

DATASETS = ("gaussian", "gaussian_images", "digits", "cifar10", "cifar100", "imagefolder")
TEACHER_LOSSES = ("ce", "mse", "ls", "ce_ts")
# trained with CE, then temperature-scaled on the validation split (bayeskd.calibration)
TEMPERATURE_SCALED = ("ce_ts",)
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


def check_registry(kind: str, names: Iterable[str], implemented: Iterable[str]) -> None:
    """For registries, at import: they must implement exactly the names params.yaml may use."""
    if set(implemented) != set(names):
        raise RuntimeError(f"the {kind} registry implements {sorted(implemented)}, but bayeskd.config "
                           f"lists {sorted(names)}")


class Section(BaseModel):
    # strict types; floats must be finite (an infinite learning rate is a typo, not a setting)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Gaussian(Section):
    n_samples: PositiveInt
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
        return self


class GaussianImages(Section):
    """Synthetic CIFAR-format images with exact p* (bayeskd.synthetic): a latent Gaussian mixture per
    class, a smooth random linear decoder and isotropic pixel noise."""

    n_train: PositiveInt
    n_val: Annotated[int, Field(ge=0)]  # 0: no validation split
    n_test: PositiveInt
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

    def no_validation_split(self) -> str | None:
        """The key and value that leave this dataset without a validation split; None if it has one."""
        if self.name == "gaussian_images" and self.gaussian_images.n_val == 0:
            return "data.gaussian_images.n_val = 0"
        if self.name in ("cifar10", "cifar100", "imagefolder") and self.images.val_fraction == 0:
            return "data.images.val_fraction = 0.0"
        return None  # gaussian and digits always hold one out

    @model_validator(mode="after")
    def _views_need_images(self) -> Data:
        if self.name == "gaussian" and self.augment.padding > 0:
            raise ValueError(f"augment.padding = {self.augment.padding}: the gaussian dataset has no "
                             "images to crop; use 0")
        return self


class Optim(Section):
    """SGD with momentum and a step schedule: lr is multiplied by gamma after each milestone epoch."""

    epochs: PositiveInt
    batch_size: PositiveInt
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


# The methods whose target is the teacher's softened output softmax(z / T) on its raw logits, and
# the name of their T: the temperature at which `evaluate` measures the teacher on the transfer set.
SOFTENED = {"kd": "temperature", "dkd": "temperature", "dist": "tau"}


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

    def temperature(self) -> float | None:
        """The temperature T at which the method softens the teacher's logits, softmax(z / T); None
        for a method that does not (labels only, feature methods, standardised logits)."""
        key = SOFTENED.get(self.method)
        return None if key is None else float(self.hparams()[key])


class Cache(Section):
    dtype: Literal["float16", "bfloat16", "float32"]
    shard_size: PositiveInt
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
    batch_size: PositiveInt
    latency_runs: PositiveInt
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

    @model_validator(mode="after")
    def _temperature_scaling_needs_validation(self) -> Params:
        missing = self.data.no_validation_split()
        if self.teacher.loss in TEMPERATURE_SCALED and missing:
            raise ValueError(f"teacher.loss = {self.teacher.loss!r} fits its temperature on the validation "
                             f"split, and {missing} leaves data.name = {self.data.name!r} without one; "
                             "hold one out, or use teacher.loss ce, mse or ls")
        return self


def with_overrides(params: dict, overrides: dict[str, object], source: str = "overrides") -> dict:
    """A copy of the params.yaml mapping with dotted-key overrides applied, validated."""
    params = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
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
    """Every preset of presets.yaml by name, as its complete dotted-key overrides."""
    presets = yaml.safe_load(Path(path).read_text())
    return {k: presets["recipe"] | v for k, v in presets["pairs"].items()} | presets.get("synthetic", {})


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


def load(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ParamsError(f"{path}: cannot read parameters: {e}") from None
    return parse(raw, str(path))


def load_or_exit(path: str | Path = PARAMS_FILE) -> Params:
    """For stage entry points: a bad params.yaml ends the process with exit code 2 and one message."""
    try:
        return load(path)
    except ParamsError as e:
        print(f"error: invalid parameters\n{e}", file=sys.stderr)
        raise SystemExit(2) from None

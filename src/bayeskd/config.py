"""The typed schema of params.yaml: every stage validates the whole file before doing any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PARAMS_FILE = "params.yaml"

Fraction = Annotated[float, Field(gt=0, lt=1)]
PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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
    name: Literal["gaussian", "gaussian_images", "digits", "cifar10", "cifar100", "imagefolder"]
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


def _known_net(name: str) -> str:
    from bayeskd.nets import NETS

    if name not in NETS:
        raise ValueError(f"{name!r} is not a known net; expected one of {', '.join(sorted(NETS))}")
    return name


class Teacher(Section):
    net: str
    loss: Literal["ce", "mse", "ls"]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    optim: Optim

    _net = field_validator("net")(_known_net)


class Student(Section):
    """The student's net, its distillation method, and, under `student.<method>`, any method's
    hyperparameters (bayeskd.distill.hparams lists each method's names and defaults)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    net: str
    method: str
    optim: Optim

    _net = field_validator("net")(_known_net)

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from bayeskd.distill import all_methods

        if name not in all_methods():
            raise ValueError(f"{name!r} is not a known distillation method; expected one of "
                             f"{', '.join(all_methods())}")
        return name

    @model_validator(mode="after")
    def _known_hparams(self) -> Student:
        from bayeskd.distill import all_methods, hparams

        for method, values in (self.model_extra or {}).items():
            if method not in all_methods():
                raise ValueError(f"student.{method}: unknown key; allowed here: net, method, optim, "
                                 f"and a method's hyperparameters under one of {', '.join(all_methods())}")
            if not isinstance(values, dict):
                raise ValueError(f"student.{method} = {values!r}: expected a mapping of {method}'s "
                                 "hyperparameters to values")
            defaults = hparams(method)
            for key, value in values.items():
                if key not in defaults:
                    raise ValueError(f"student.{method}.{key} = {value!r}: not a hyperparameter of {method}; "
                                     f"allowed: {', '.join(defaults) or 'none'}")
                default = defaults[key]
                kind, what = ((bool, "true or false") if isinstance(default, bool) else
                              (int, "an integer") if isinstance(default, int) else ((int, float), "a number"))
                if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
                    raise ValueError(f"student.{method}.{key} = {value!r}: expected {what}")
        return self

    def hparams(self) -> dict[str, float | int | bool]:
        """The hyperparameters of the chosen method that params.yaml sets."""
        return dict((self.model_extra or {}).get(self.method, {}))


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
    presets = yaml.safe_load(Path(path).read_text())
    named = {k: presets["recipe"] | v for k, v in presets["pairs"].items()} | presets.get("synthetic", {})
    if name not in named:
        raise ParamsError(f"preset {name!r} does not exist; expected one of {', '.join(named)}")
    return dict(named[name])


def preset_args(name: str, path: str | Path = PRESETS_FILE) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`, one shell word each (no spaces in values)."""
    out = []
    for key, value in preset(name, path).items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        out += ["-S", f"{key}={text}"]
    return out


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
        return msg if msg.startswith(f"{key}.") else f"{key}: {msg}"
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

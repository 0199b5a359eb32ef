"""The typed schema of params.yaml: every stage validates the whole file before doing any work.

The names params.yaml may use and the sections they bring come from their declarations: the
datasets (bayeskd.datasets, imported: they import no torch) with their `data.<key>` sections, and
the nets and distillation methods with their hyperparameters (bayeskd.zoo, bayeskd.methods), read
from the source with `declare.scan`, so params validate without importing torch. Teacher losses are
listed here (bayeskd.losses checks its registry against the list).
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
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from bayeskd import declare
from bayeskd.datasets import DATASETS
from bayeskd.declare import PositiveInt, Section, bounded

PARAMS_FILE = "params.yaml"
PACKAGE = Path(__file__).parent
VALIDATED_FILE = "reports/params.validated.json"  # check_params' digest of the params.yaml it validated

TEACHER_LOSSES = ("ce", "mse", "ls", "ce_ts")
# trained with CE, then temperature-scaled on the validation split (bayeskd.calibration)
TEMPERATURE_SCALED = ("ce_ts",)
DEVICES = ("auto", "cpu", "cuda")  # compute.device (bayeskd.placement)
NETS: dict[str, declare.NetDecl] = declare.scan(PACKAGE / "zoo", declare.net)
METHODS: dict[str, declare.MethodDecl] = declare.scan(PACKAGE / "methods", declare.method)

NetName = Literal[tuple(NETS)]


Epochs = bounded(1, 10_000, "more is taken for a typo (the CIFAR recipe trains 240 epochs)")
BatchSize = bounded(1, 65_536, "more is taken for a typo (the CIFAR recipe uses 64)")


def check_registry(kind: str, names: Iterable[str], implemented: Iterable[str]) -> None:
    """For registries, at import: they must implement exactly the names params.yaml may use."""
    if set(implemented) != set(names):
        raise RuntimeError(f"the {kind} registry implements {sorted(implemented)}, but bayeskd.config "
                           f"lists {sorted(names)}")


class Augment(Section):
    """Training views: random crop with `padding` pixels of zero padding, and horizontal flip.
    0 trains on the inputs as they are (one view)."""

    padding: Annotated[int, Field(ge=0, le=16)]


def _sections() -> dict[str, type[Section]]:
    """data.<key> of every dataset, by key; datasets that share a key share its section."""
    sections: dict[str, type[Section]] = {}
    for name, declared in DATASETS.items():
        if sections.setdefault(declared.key, declared.section) is not declared.section:
            raise RuntimeError(f"dataset {name!r} declares data.{declared.key} as "
                               f"{declared.section.__name__}, another dataset as "
                               f"{sections[declared.key].__name__}")
    return sections


class _DataChecks(Section):
    """The checks of `Data` that ask the dataset's declaration."""

    def no_validation_split(self) -> str | None:
        """The key and value that leave this dataset without a validation split; None if it has one."""
        if self.name == "gaussian_images" and self.gaussian_images.n_val == 0:
            return "data.gaussian_images.n_val = 0"
        if self.name in ("cifar10", "cifar100", "imagefolder") and self.images.val_fraction == 0:
            return "data.images.val_fraction = 0.0"
        return None  # gaussian and digits always hold one out

    @model_validator(mode="after")
    def _views_need_images(self) -> _DataChecks:
        if not DATASETS[self.name].images and self.augment.padding > 0:
            raise ValueError(f"augment.padding = {self.augment.padding}: the {self.name} dataset has no "
                             "images to crop; use 0")
        return self


# data: the dataset's name, the data seed, one section per dataset (data.<key>) and augment
Data = create_model(
    "Data", __base__=_DataChecks, name=(Literal[tuple(DATASETS)], ...),
    seed=(Annotated[int, Field(ge=0)], ...), **{key: (section, ...) for key, section in _sections().items()},
    augment=(Augment, ...),
)


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


def _hparams_section(declared: declare.MethodDecl) -> type[Section]:
    """student.<method>: the method's hyperparameters, each defaulting to its declared default."""
    return create_model(declared.name, __base__=Section,
                        **{key: (spec.annotation(), spec.default) for key, spec in declared.hparams.items()})


def hparams(method: str) -> dict[str, float | int]:
    """Method `method`'s hyperparameters and their defaults."""
    return METHODS[method].defaults()


# student.<method> for every method with hyperparameters, each defaulting to the method's defaults
_METHOD_SECTIONS = {name: _hparams_section(m) for name, m in METHODS.items() if m.hparams}
_MethodSections = create_model("MethodSections", __base__=Section,
                               **{name: (section, section()) for name, section in _METHOD_SECTIONS.items()})


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
    shard_size: bounded(100, 1_000_000, "a shard is computed in memory, and fewer than 100 samples per "
                        "shard is taken for a typo (the CIFAR presets use 5,000)")
    views: Literal["all"] | PositiveInt  # every view of the view space, or this many per sample
    topk: Annotated[int, Field(ge=0)]  # 0 stores all classes; k stores the k largest logits
    min_accuracy: Annotated[float, Field(ge=0, le=1)]  # the teacher's least plausible accuracy on its views
    batch_size: PositiveInt  # views per teacher forward while building


class Compute(Section):
    device: Literal[DEVICES]  # where every stage runs: auto (CUDA when present), cpu or cuda
    processes: Annotated[int, Field(ge=1, le=64)]  # training processes per stage (torchrun, DDP)
    compile: bool  # torch.compile the training forward
    threads: bounded(1, 1024, "more is taken for a typo")  # torch's CPU threads in each stage process


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
        declared = DATASETS[self.data.name]
        k, known = self.cache.topk, declared.num_classes(getattr(self.data, declared.key))  # None: when read
        if k and known is not None and k >= known:
            raise ValueError(f"cache.topk = {k}: must be below the {known} classes of data.name = "
                             f"{self.data.name!r} (0 stores all logits)")
        return self

    @model_validator(mode="after")
    def _a_sample_for_every_process(self) -> Params:
        processes = self.compute.processes
        for role in ("teacher", "student"):
            size = getattr(self, role).optim.batch_size
            if size < processes:
                raise ValueError(f"{role}.optim.batch_size = {size} is smaller than compute.processes = "
                                 f"{processes}: each process trains on its part of every batch; use a "
                                 f"batch of at least {processes}, or fewer processes")
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

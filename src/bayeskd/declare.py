"""Declarations: each distillation method, net and dataset is declared once, by a decorator beside its
code. A leaf module (the standard library and pydantic only).

    @method("kd", temperature=Float(4.0, gt=0), ce_weight=Float(0.1, ge=0), kd_weight=Float(0.9, ge=0))
    def kd(student_logits, teacher_logits, targets, epoch, *, temperature, ce_weight, kd_weight): ...

    @net("resnet8", depth=8)
    def cifar_resnet(num_classes, in_shape, *, depth, widths=(16, 16, 32, 64)): ...

    @dataset("gaussian", section=Gaussian, classes=lambda cfg: cfg.n_classes, images=False)
    def make_gaussian(cfg, seed): ...

A decorator attaches its declaration to the object; the packages bayeskd.methods, bayeskd.zoo and
bayeskd.datasets import every one of their modules and `collect` the declarations into their
registries, so adding a method, net or dataset is adding a file. Several decorators may be stacked on
one builder, one per name.

The params schema (bayeskd.config) must not import torch, so it reads the method and net declarations
from the source with `scan`, without importing the modules: their decorator arguments are literals,
or `Float`/`Int` of literals. Datasets import no torch when imported, so config imports them.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A section of params.yaml: strict types, no unknown keys; floats must be finite (an infinite
    learning rate is a typo, not a setting)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


Fraction = Annotated[float, Field(gt=0, lt=1)]
PositiveInt = Annotated[int, Field(gt=0)]


def fractions_leave(section: BaseModel, a: str, b: str, remains: str) -> None:
    """ValueError unless the fractions `a` + `b` of a section sum below 1, so that `remains` (the
    split neither takes) is left."""
    total = getattr(section, a) + getattr(section, b)
    if total >= 1:
        raise ValueError(f"{a} + {b} = {total}: must be below 1 so that a {remains} split remains")


def bounded(low: int, high: int, why: str) -> type[int]:
    """An int in [low, high]: bounds that catch typos (a runaway value starts runaway work); the
    error names the range and `why`."""

    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low:,} and {high:,}: {why}")
        return value

    return Annotated[int, AfterValidator(check), Field(json_schema_extra={"minimum": low, "maximum": high})]


BOUNDS = ("gt", "ge", "lt", "le")


@dataclass(frozen=True)
class Spec:
    """A hyperparameter: its type, its default, and its bounds (gt, ge, lt, le)."""

    type: type
    default: float | int
    bounds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.bounds) - set(BOUNDS):
            raise TypeError(f"bounds are {', '.join(BOUNDS)}; got {', '.join(sorted(self.bounds))}")

    def annotation(self) -> Any:
        """The pydantic type of the hyperparameter, with its bounds."""
        return Annotated[self.type, Field(**self.bounds)]


def Float(default: float, **bounds: float) -> Spec:
    """A float hyperparameter, e.g. Float(4.0, gt=0)."""
    return Spec(float, float(default), bounds)


def Int(default: int, **bounds: float) -> Spec:
    """An integer hyperparameter, e.g. Int(20, gt=0)."""
    if not isinstance(default, int) or isinstance(default, bool):
        raise TypeError(f"Int needs an integer default; got {default!r}")
    return Spec(int, default, bounds)


@dataclass(frozen=True)
class Declaration:
    """A name and what the project needs to know of the object declared under it. Used as a
    decorator, it attaches itself (with `impl`, the object) to the object's `__declared__`."""

    name: str
    impl: Any = field(default=None, compare=False, repr=False)

    def __call__(self, impl: Any) -> Any:
        # stacked decorators apply from the bottom up: each puts its declaration first, so that
        # __declared__ lists them as they read, from the top
        impl.__declared__ = (replace(self, impl=impl), *vars(impl).get("__declared__", ()))
        return impl


@dataclass(frozen=True)
class MethodDecl(Declaration):
    """A distillation method: a function (a logit method) or a FeatureMethod subclass (a feature
    method). `hparams`: its keyword-only arguments, params.yaml's `student.<name>` section. The flags
    are for feature methods: `single_process` (its state cannot be shared by DDP processes),
    `uses_stages` (False: the pre-logit vectors are all it needs), `in_float32` (its terms run outside
    autocast on float32 features); the decorator sets them on the class."""

    hparams: dict[str, Spec] = field(default_factory=dict)
    single_process: bool = False
    uses_stages: bool = True
    in_float32: bool = False

    def defaults(self) -> dict[str, float | int]:
        return {key: spec.default for key, spec in self.hparams.items()}

    def __call__(self, impl: Any) -> Any:
        if isinstance(impl, type):
            impl.single_process, impl.uses_stages = self.single_process, self.uses_stages
            impl.in_float32 = self.in_float32
        elif self.single_process or not self.uses_stages or self.in_float32:
            raise TypeError(f"method {self.name!r}: flags are for feature methods (classes), and "
                            f"{impl.__name__} is a function")
        return super().__call__(impl)


@dataclass(frozen=True)
class NetDecl(Declaration):
    """A net: its builder `(num_classes, in_shape, **kwargs) -> nn.Module` and its `kwargs`."""

    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, num_classes: int, in_shape: tuple[int, ...]) -> Any:
        return self.impl(num_classes, tuple(in_shape), **self.kwargs)


@dataclass(frozen=True)
class DatasetDecl(Declaration):
    """A dataset: its maker `(cfg, seed, **kwargs) -> bayeskd.datasets.base.Dataset`, where cfg is its
    params section `data.<key>` (a `section`, shared by datasets of one key); `classes`, its class
    count (a number, a function of the section, or None when only the files tell); `images`, whether
    its inputs are images (augmentation crops them)."""

    section: type[Section] | None = None
    key: str = ""
    classes: int | Callable[[Any], int] | None = None
    images: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)

    def make(self, cfg: Section, seed: int) -> Any:
        return self.impl(cfg, seed, **self.kwargs)

    def num_classes(self, cfg: Section) -> int | None:
        return self.classes(cfg) if callable(self.classes) else self.classes


def method(name: str, *, single_process: bool = False, uses_stages: bool = True, in_float32: bool = False,
           **hparams: Spec) -> MethodDecl:
    """Declares distillation method `name` with its flags and hyperparameters (Float or Int)."""
    for key, spec in hparams.items():
        if not isinstance(spec, Spec):
            raise TypeError(f"method {name!r}: declare {key} with Float(...) or Int(...), not {spec!r}")
    return MethodDecl(name, hparams=hparams, single_process=single_process, uses_stages=uses_stages,
                      in_float32=in_float32)


def net(name: str, **kwargs: Any) -> NetDecl:
    """Declares net `name`: its builder called with these keyword arguments."""
    return NetDecl(name, kwargs=kwargs)


def dataset(name: str, *, section: type[Section], classes: int | Callable[[Any], int] | None, images: bool,
            key: str | None = None, **kwargs: Any) -> DatasetDecl:
    """Declares dataset `name`: made from params section `data.<key>` (default: the name) of type
    `section`, calling its maker with these keyword arguments."""
    return DatasetDecl(name, section=section, key=key or name, classes=classes, images=images, kwargs=kwargs)


def _add(found: dict[str, Declaration], declared: Declaration, where: str) -> None:
    if declared.name in found:
        raise RuntimeError(f"{where}: {declared.name!r} is declared twice")
    found[declared.name] = declared


def collect(package: str, path: Iterable[str], kind: type[Declaration]) -> dict[str, Any]:
    """Imports every module of `package` (its `__path__`) and returns the declarations of `kind`
    attached to the objects they define, by name, in module order."""
    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(path):
        module = importlib.import_module(f"{package}.{info.name}")
        defined = {id(obj): obj for obj in vars(module).values()  # an object bound to two names: once
                   if getattr(obj, "__module__", None) == module.__name__}
        for obj in defined.values():
            for declared in getattr(obj, "__dict__", {}).get("__declared__", ()):
                if isinstance(declared, kind):
                    _add(found, declared, module.__name__)
    return found


SPECS = {"Float": Float, "Int": Int}


def _literal(node: ast.expr, where: str) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SPECS:
        args = [_literal(a, where) for a in node.args]
        return SPECS[node.func.id](*args, **{k.arg: _literal(k.value, where) for k in node.keywords})
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{where}: a declaration's arguments must be literals or Float/Int of literals "
                         f"(scan reads them without importing the module); got {ast.unparse(node)}") from None


def _callee(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        return node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
    return None


def scan(package_dir: Path, decorator: Callable[..., Declaration]) -> dict[str, Any]:
    """The declarations made with `decorator` (method or net) in the modules of `package_dir`, read
    from their source without importing them: what `collect` finds once they are imported, in the
    same order, without `impl`."""
    found: dict[str, Any] = {}
    for path in sorted(p for p in Path(package_dir).glob("*.py") if p.name != "__init__.py"):
        for node in ast.parse(path.read_text(), str(path)).body:
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            for call in node.decorator_list:
                if _callee(call) == decorator.__name__:
                    where = f"{path.name}:{call.lineno}"
                    args = [_literal(a, where) for a in call.args]
                    kwargs = {k.arg: _literal(k.value, where) for k in call.keywords}
                    try:
                        declared = decorator(*args, **kwargs)
                    except TypeError as e:
                        raise TypeError(f"{where}: {e}") from None
                    _add(found, declared, where)
    return found

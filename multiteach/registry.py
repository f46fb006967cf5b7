"""One registry style for presets, weighters, attacks and datasets (models stay in timm's registry).

A registry maps a name to a builder (a class or function). ``build(spec, **fixed)`` takes a name or a
``{"name": ..., **options}`` table (how configs name a component, e.g. ``weighter = {name = "dwa",
temperature = 2}``), checks the options against the builder's signature and types (pydantic), and calls it.
Unknown names and options are one-line errors that list the choices.

    WEIGHTERS = Registry("weighter")

    @WEIGHTERS.register("dwa")
    class DWA(Weighter): ...

    WEIGHTERS.build({"name": "dwa", "temperature": 2}, n=2)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Spec = str | Mapping[str, Any]


@dataclass
class Entry:
    """A registered builder and what is known about it (presets: description, teachers, schedule)."""

    name: str
    fn: Callable[..., Any]
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:  # meta fields read as attributes: entry.teachers, entry.schedule
        meta = self.__dict__.get("meta", {})
        if key in meta:
            return meta[key]
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no {key!r}")

    def options(self, fixed: tuple[str, ...] = ()) -> dict[str, Any]:
        """The builder's options with their defaults: its keyword-only parameters where it has them (presets,
        whose positional ones are the models), else every named one; ``fixed``: arguments the caller supplies."""
        params = [p for p in inspect.signature(self.fn).parameters.values()
                  if p.name not in {"self", "num_classes", *fixed}]
        keyword_only = [p for p in params if p.kind is p.KEYWORD_ONLY]
        chosen = keyword_only or [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in chosen}

    def check_options(self, names: Iterable[str], kind: str = "preset") -> None:
        """Refuse option names the builder does not take, without building it (one line naming them and the
        builder's options)."""
        allowed = self.options()
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an option of {kind} {self.name!r} (its options: "
                             f"{', '.join(sorted(allowed)) or 'none'})")


class Registry(Mapping[str, Entry], Generic[T]):
    """Name -> builder. ``populate``: modules imported on first lookup (they register the entries), so
    importing the registry does not import every entry's code."""

    def __init__(self, kind: str, populate: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._populate = populate
        self._entries: dict[str, Entry] = {}

    def _load(self) -> dict[str, Entry]:
        if self._populate:
            modules, self._populate = self._populate, ()
            for module in modules:
                importlib.import_module(module)
        return self._entries

    def register(self, name: str, description: str = "", **meta: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register a builder under ``name``; a second entry of the same name is refused."""
        def wrap(fn: Callable[..., T]) -> Callable[..., T]:
            self.add(name, fn, description, **meta)
            return fn
        return wrap

    def add(self, name: str, fn: Callable[..., Any], description: str = "", **meta: Any) -> None:
        if name in self._entries and self._entries[name].fn is not fn:
            raise ValueError(f"{self.kind} {name!r} is registered twice: pick another name")
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        self._entries[name] = Entry(name, fn, description or doc, meta)

    def __getitem__(self, name: str) -> Entry:
        entries = self._load()
        if name not in entries:
            raise KeyError(self.unknown(name))
        return entries[name]

    def get_entry(self, name: str) -> Entry:
        """The entry of ``name``; a one-line ValueError listing the choices when there is none."""
        entries = self._load()
        if name not in entries:
            raise ValueError(self.unknown(name))
        return entries[name]

    def unknown(self, name: object) -> str:
        return f"unknown {self.kind} {name!r}: choose one of {', '.join(sorted(self._load()))}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def build(self, spec: Spec | Any, *, fixed: Mapping[str, Any] | None = None, **defaults: Any) -> T:
        """Build from ``name`` or ``{"name": name, **options}``; ``fixed`` are arguments the caller supplies
        (e.g. the number of branches), ``defaults`` options used unless the spec sets them. An object that is
        already built (not a str or mapping) is returned as it is."""
        if not isinstance(spec, str | Mapping):
            return spec
        name, options = parse_spec(spec, self.kind)
        entry = self.get_entry(name)
        return call_checked(entry.fn, {**defaults, **options}, fixed or {}, f"{self.kind} {name!r}")


def parse_spec(spec: Spec, kind: str) -> tuple[str, dict[str, Any]]:
    """``"dwa"`` -> ("dwa", {}); ``{"name": "dwa", "temperature": 2}`` -> ("dwa", {"temperature": 2})."""
    if isinstance(spec, str):
        return spec, {}
    options = dict(spec)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"a {kind} given as a table needs a name: {{name = \"...\", ...options}}, got {dict(spec)}")
    return name, options


def call_checked(fn: Callable[..., T], options: Mapping[str, Any], fixed: Mapping[str, Any], what: str) -> T:
    """``fn(**fixed, **options)`` with unknown options and wrong types reported as one line naming them."""
    from pydantic import ConfigDict, ValidationError, validate_call

    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    allowed = [n for n, p in params.items() if n not in fixed and n != "self"
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = [k for k in options if k not in allowed]
    if unknown and not takes_any:
        raise ValueError(f"{what} has no option {', '.join(map(repr, unknown))}: its options are "
                         f"{', '.join(allowed) or 'none'}")
    if inspect.isclass(fn):  # check the options' types first, so the constructor never sees a wrong one
        _validate_types(fn, options, what)
        return fn(**fixed, **options)
    try:
        return validate_call(fn, config=ConfigDict(arbitrary_types_allowed=True))(**fixed, **options)
    except ValidationError as e:
        raise ValueError(f"{what}: {_pydantic_summary(e)}") from None


def _validate_types(cls: type, options: Mapping[str, Any], what: str) -> None:
    """Type-check a class's constructor options against its annotations (pydantic), without building it."""
    from pydantic import ConfigDict, ValidationError, create_model

    sig = inspect.signature(cls)
    hints = _hints(cls.__init__)
    fields = {n: (hints.get(n, Any), ...) for n in options if n in sig.parameters}
    if not fields:
        return
    model = create_model(f"{cls.__name__}Options", __config__=ConfigDict(arbitrary_types_allowed=True), **fields)
    try:
        model.model_validate(dict(options))
    except ValidationError as e:
        raise ValueError(f"{what}: {_pydantic_summary(e)}") from None


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolved forward references: check no types rather than fail
        return {}


def _pydantic_summary(e: Any) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())


# The registries. Each is filled by the module named, imported on first lookup.
PRESETS: Registry = Registry("preset", populate=("multiteach.methods",))
WEIGHTERS: Registry = Registry("weighter", populate=("multiteach.weighting", "multiteach.methods"))
ATTACKS: Registry = Registry("attack", populate=("multiteach.evaluation", "multiteach.methods"))
DATASETS: Registry = Registry("dataset", populate=("multiteach.datasets",))

__all__ = ["ATTACKS", "DATASETS", "PRESETS", "WEIGHTERS", "Entry", "Registry", "Spec", "call_checked", "parse_spec"]

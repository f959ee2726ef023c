"""Every transfer method, registered by name with the options it takes.

A method is a ``Method`` subclass (``l2t_fast.methods.base``) in the module of its family
(``supervised``, ``distillation``, ``l2tww``...), registered with ``@register``. The
registry is what the job, the command line, the sweep and the README list: a new method
is a new class in one module of this package (found on its own) plus its test.
"""
import importlib
import pkgutil
from dataclasses import dataclass

# What a method may need from the data besides labelled target batches; the data says
# which of these it offers (``l2t_fast.data``).
NEEDS = {
    "source_batches": "labelled images of the source task in every batch",
    "unlabelled": "unlabelled target images in every batch",
    "shared_labels": "a source task with the target's classes",
}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type
    family: str        # the module it lives in
    summary: str
    options: tuple     # Option rows (l2t_fast.jobs.options) it takes, SGD's first
    needs: frozenset   # keys of NEEDS
    order: int         # where it stands in tables


_REGISTRY = {}
_DISCOVERED = False


def register(name, *, summary, order, options=(), needs=()):
    """Class decorator: register a ``Method`` subclass as ``name``.

    ``options``: the rows of the option table it reads besides SGD's (``lr``,
    ``momentum``, ``weight_decay``, which every method takes); its constructor takes
    ``(setup, **options)``. ``needs``: keys of ``NEEDS``. ``order``: its place in tables.
    """
    from l2t_fast.methods.base import SGD_OPTIONS

    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"method {name}: unknown needs {sorted(unknown)}; know {sorted(NEEDS)}")

    def decorate(cls):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = MethodSpec(name, cls, cls.__module__.split(".")[2], summary,
                                     SGD_OPTIONS + tuple(options), frozenset(needs), order)
        cls.name = name
        return cls

    return decorate


def _discover():
    """Import every module of this package once, so that each registers its methods."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for module in pkgutil.walk_packages(__path__, __name__ + "."):
        importlib.import_module(module.name)


def registry():
    """``{name: MethodSpec}`` of every method, in table order."""
    _discover()
    return dict(sorted(_REGISTRY.items(), key=lambda item: item[1].order))


def spec(name):
    methods = registry()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(methods)}")
    return methods[name]


def build_method(name, setup, **options):
    """The method ``name``, ready to ``train_step``, for ``setup`` (a
    ``l2t_fast.methods.base.Setup``). ``options`` are rows of the option table that the
    method takes (see ``spec(name).options``); the table's defaults fill the rest, and
    each value is checked by its row."""
    method = spec(name)
    taken = {option.name: option for option in method.options}
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise ValueError(f"method {name} takes no options {unknown}; it takes "
                         f"{sorted(taken)}")
    values = {key: option.coerce(options.get(key, option.default))
              for key, option in taken.items()}
    return method.cls(setup.frozen_source(), **values)


def markdown_table():
    """The README's list of methods (docs/update_readme.py writes it, a test checks it)."""
    lines = ["| method | family | what it does | needs |", "|---|---|---|---|"]
    for name, method in registry().items():
        needs = ", ".join(NEEDS[need] for need in sorted(method.needs)) or "-"
        lines.append(f"| `{name}` | {method.family} | {method.summary} | {needs} |")
    return "\n".join(lines)

"""The one table of options: what ``l2t-fast transfer`` and a sweep can set, with default,
kind (how a value is read and checked) and help.

Every consumer reads this table: the command line (``add_arguments``), the config check
(``resolve_config`` in ``l2t_fast.jobs.transfer``), the sweep's type coercion
(``coerce``) and the README's option list (``markdown_table``, checked by a test). The
job's own rows are below; each method adds its rows where it is registered
(``l2t_fast.methods.register``), so a new method touches only its own module.
"""
import argparse
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}


# ---- kinds: how a value is read (from a command-line word or a config value) and checked --

class Kind(ABC):
    """Turns a config value (a Python, YAML or JSON value, or a command-line word) into
    the option's canonical value, or raises ValueError; ``describe`` says what it takes."""
    nargs = None

    @abstractmethod
    def coerce(self, value):
        """The canonical value; ValueError with a short reason if ``value`` is not one."""

    @abstractmethod
    def describe(self):
        """What the kind takes, as a phrase: "an int >= 1"."""


class Int(Kind):
    def __init__(self, low=None, high=None):
        self.low, self.high = low, high

    def coerce(self, value):
        if isinstance(value, str):
            value = value.strip()
            try:
                value = int(value)
            except ValueError:
                raise ValueError("not an int") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("not an int")
        if (self.low is not None and value < self.low) or (
                self.high is not None and value > self.high):
            raise ValueError("out of range")
        return value

    def describe(self):
        if self.high is None:
            return "an int" if self.low is None else f"an int >= {self.low}"
        return f"an int in [{self.low}, {self.high}]"


class Float(Kind):
    """A finite number; ``low``/``high`` bound it, strictly where ``above``/``below``."""

    def __init__(self, low=None, high=None, above=False, below=False):
        self.low, self.high, self.above, self.below = low, high, above, below

    def coerce(self, value):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError("not a number") from None
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError("not a number")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError("not finite")
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            raise ValueError("out of range")
        if self.high is not None and (value >= self.high if self.below else value > self.high):
            raise ValueError("out of range")
        return value

    def describe(self):
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.above else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.below else '<='} {self.high:g}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")


class Choice(Kind):
    def __init__(self, *choices):
        self.choices = tuple(choices)

    def coerce(self, value):
        if value not in self.choices:
            raise ValueError("not a choice")
        return value

    def describe(self):
        return "one of " + ", ".join(map(str, self.choices))


class Text(Kind):
    """A string (a path, a model name...); ``optional``: None (or the word ``none``) too."""

    def __init__(self, optional=False):
        self.optional = optional

    def coerce(self, value):
        if value is None or (self.optional and isinstance(value, str)
                             and value.lower() == "none"):
            if self.optional:
                return None
            raise ValueError("missing")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError("not a string")
        text = str(value)
        if not text:
            raise ValueError("empty")
        return text

    def describe(self):
        return "a string" + (" or none" if self.optional else "")


class Flag(Kind):
    def coerce(self, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ValueError("not a boolean")

    def describe(self):
        return "true or false"


class ListOf(Kind):
    """A non-empty list of ``item`` values without repeats; a single value is a list of one.
    ``everything`` names a word that stands for every possible value (e.g. ``all``);
    ``optional``: None too (the job chooses)."""
    nargs = "+"

    def __init__(self, item, everything=None, optional=False):
        self.item, self.everything, self.optional = item, everything, optional

    def coerce(self, value):
        if value is None and self.optional:
            return None
        if self.everything is not None and value == self.everything:
            return value
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        if self.everything is not None and value == [self.everything]:
            return self.everything
        if not value:
            raise ValueError("empty")
        items = [self.item.coerce(v) for v in value]
        seen = set()
        for item in items:
            key = repr(item)
            if key in seen:
                raise ValueError(f"lists {item!r} twice")
            seen.add(key)
        return items

    def describe(self):
        text = f"one or more (no repeats) of: {self.item.describe()}"
        if self.everything is not None:
            text = f"'{self.everything}' or " + text
        return text + (" or none" if self.optional else "")


class OrAuto(Kind):
    """The word ``auto`` (the job chooses when it runs, e.g. from the machine), or a value
    of ``kind``."""

    def __init__(self, kind):
        self.kind = kind

    def coerce(self, value):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return self.kind.coerce(value)

    def describe(self):
        return f"auto or {self.kind.describe()}"


class MethodName(Kind):
    """The name of a registered method (``l2t_fast.methods``)."""

    def coerce(self, value):
        from l2t_fast import methods

        names = list(methods.registry())
        if value not in names:
            raise ValueError(f"unknown method {value!r}; choose from {', '.join(names)}")
        return value

    def describe(self):
        return "a method name"


class Pair(Kind):
    """A (source layer index, target layer index) pair: ``[0, 1]`` or the word ``0:1``."""

    def coerce(self, value):
        if isinstance(value, str):
            parts = value.split(":")
            if len(parts) != 2:
                raise ValueError("not SOURCE:TARGET")
            value = parts
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError("not a pair")
        return [Int(0).coerce(v) for v in value]

    def describe(self):
        return "SOURCE:TARGET layer indices"


# ---- options ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    name: str                # config key (the command line's --name-with-dashes)
    default: Any
    kind: Kind
    help: str
    group: str = "job"       # "job" or "method" (rows a method registers)
    used_by: tuple = field(default=(), compare=False)  # method names, filled by the registry

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    def coerce(self, value):
        """The canonical value, or a ValueError that names the option and what it takes."""
        try:
            return self.kind.coerce(value)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.name} must be {self.kind.describe()}, got {value!r} "
                             f"({error})") from None


JOB_OPTIONS = (
    Option("scenario", "task", Choice("task", "domain"),
           "embedded digits data: 'task' (source digits 0-4, target digits 5-9: a new task) or "
           "'domain' (source: all ten digits; target: the same digits drawn over photographs, "
           "few labels: a new domain)"),
    Option("data", "digits", Text(),
           "'digits' (embedded, see --scenario), an image folder (CLASS/*.png, or train/ and "
           "test/ or val/ with CLASS/ inside), or a torchvision data set name such as CIFAR10 "
           "(needs torchvision and --data-root); folders and named data sets stream from "
           "disk with random resized crops and flips"),
    Option("data_root", None, Text(optional=True), "folder a torchvision data set was "
           "downloaded to"),
    Option("image_size", 16, Int(8), "images are resized to this square size"),
    Option("source_model", "resnet14", Text(),
           "resnet8, resnet14, resnet20, torchvision:NAME or timm:NAME"),
    Option("target_model", "resnet14", Text(),
           "resnet8, resnet14, resnet20, torchvision:NAME or timm:NAME"),
    Option("source_checkpoint", None, Text(optional=True),
           "state_dict file of the source model, or a full checkpoint with one under "
           "'model' or 'state_dict' (l2t-fast pretrain makes one; without it or "
           "--source-weights the source is pretrained on the digits' source task)"),
    Option("source_weights", None, Text(optional=True),
           "pretrained weights of a torchvision or timm source model, loaded (and downloaded "
           "on first use) by that library: torchvision's weight names (DEFAULT, "
           "IMAGENET1K_V1) or a timm pretrained tag (DEFAULT, a1_in1k...)"),
    Option("source_epochs", 15, Int(1),
           "epochs to pretrain the source on the data's source task (then cached)"),
    Option("cache_dir", None, Text(optional=True),
           "where pretrained sources are cached (default ~/.cache/l2t_fast)"),
    Option("source_layers", None, ListOf(Text(), optional=True),
           "source module names to match (default: the model's stages)"),
    Option("target_layers", None, ListOf(Text(), optional=True),
           "target module names to match (default: the model's stages)"),
    Option("methods", "all", ListOf(MethodName(), everything="all"),
           "methods to compare ('all': every method that the data allows)"),
    Option("seeds", [0, 1, 2, 3, 4], ListOf(Int(0)),
           "seeds; each draws its own labelled images and initialisation"),
    Option("labels_per_class", 10, Int(0),
           "labelled target training images per class (0: all)"),
    Option("epochs", 40, Int(1), "training epochs over the labelled target images"),
    Option("batch_size", 25, Int(2), "training batch size"),
    Option("augment_shift", 4, Int(0),
           "random translation augmentation of the embedded digits, in pixels (0: none)"),
    Option("workers", "auto", OrAuto(Int(0)),
           "DataLoader worker processes that decode image folders and named data sets "
           "(auto: min(4, CPU count); 0: in the main process); results do not depend on it"),
    Option("device", "auto", Text(), "auto, cpu, cuda, cuda:N"),
    Option("amp", "off", Choice("off", "bf16"),
           "bf16: forward passes of training and evaluation under torch.autocast in "
           "bfloat16 (CUDA only); the matching loss feeds the GPU kernels bf16 maps and "
           "accumulates in float32"),
    Option("channels_last", False, Flag(),
           "models and input batches in torch.channels_last memory format"),
)

# ``l2t-fast analyze``: what it measures; the rows above configure the transfer job it runs
# (with its own defaults for these two) or describe the data and layers of --models.
ANALYSES = ("cka", "distance", "interpolation", "criticality", "block_shuffle", "mistakes",
            "domain")
ANALYZE_JOB_DEFAULTS = {"methods": ["scratch", "finetune", "l2t-ww"], "seeds": [0, 1]}
ANALYZE_OPTIONS = (
    Option("results", None, Text(optional=True),
           "job folder of `l2t-fast transfer` to analyse (its scratch, finetune and l2t-ww "
           "networks; default: run that job first)"),
    Option("models", None, ListOf(Text(), optional=True),
           "two networks to compare instead of a job: each a model name (random weights), a "
           "trained network of a job (models/*.pt), or NAME=FILE (a state_dict of model "
           "NAME); their layers: --source-layers and --target-layers"),
    Option("analyses", "all", ListOf(Choice(*ANALYSES), everything="all"),
           "analyses to run ('all': every one the networks allow)"),
    Option("analysis_images", 512, Int(8),
           "target test images the CKA, criticality and domain distance use (at most)"),
    Option("cka_batch_size", 128, Int(4), "batch size of the minibatch CKA"),
    Option("interpolation_points", 11, Int(2),
           "networks evaluated along each straight line between two networks"),
    Option("criticality_alphas", [0.0, 0.25, 0.5, 0.75, 1.0], ListOf(Float(0, 1)),
           "rewind factors of module criticality (0: the initial weights, 1: the trained)"),
    Option("criticality_sigmas", [0.05, 0.1, 0.2, 0.4, 0.8], ListOf(Float(0, above=True)),
           "noise radii of module criticality, relative to each module's weight scale"),
    Option("criticality_epsilon", 0.05, Float(0),
           "error rise a noisy, rewound module may cause and still count"),
    Option("block_sizes", None, ListOf(Int(1), optional=True),
           "block sizes of the block-shuffle experiment (default: every power of two that "
           "divides the image size)"),
)


def analyze_table():
    """The rows of ``l2t-fast analyze``: the transfer job's (with the defaults of
    ``ANALYZE_JOB_DEFAULTS``), then ``ANALYZE_OPTIONS``."""
    from dataclasses import replace

    rows = {name: replace(option, default=ANALYZE_JOB_DEFAULTS[name])
            if name in ANALYZE_JOB_DEFAULTS else option for name, option in table().items()}
    rows.update((option.name, option) for option in ANALYZE_OPTIONS)
    return rows


def table():
    """Every option, ``{name: Option}``: the job's rows, then each method's, in registry
    order (an option that several methods take appears once, naming them all)."""
    from l2t_fast import methods

    rows = {option.name: option for option in JOB_OPTIONS}
    for name, spec in methods.registry().items():
        for option in spec.options:
            known = rows.get(option.name)
            if known is not None and known.group == "job":
                raise AssertionError(f"method {name} redefines job option {option.name}")
            if known is not None and (known.default, known.help) != (option.default,
                                                                      option.help):
                raise AssertionError(f"method {name} redefines option {option.name}")
            used_by = (known.used_by if known else ()) + (name,)
            rows[option.name] = Option(option.name, option.default, option.kind, option.help,
                                       "method", used_by)
    return rows


def defaults():
    """``{name: default}`` of every option."""
    return {name: option.default for name, option in table().items()}


def coerce(name, value):
    """``value`` of option ``name`` in canonical form (the sweep reads its grid with this)."""
    rows = table()
    if name not in rows:
        raise ValueError(f"unknown option {name!r}; options: {', '.join(sorted(rows))}")
    return rows[name].coerce(value)


def _shown(value):
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def _scenario_values(name):
    """What the embedded scenarios set ``name`` to, e.g. "task: 0.2", or ""."""
    from l2t_fast.data.digits import SCENARIO_SETTINGS

    return ", ".join(f"{scenario}: {_shown(settings[name])}"
                     for scenario, settings in SCENARIO_SETTINGS.items() if name in settings)


def _help(option):
    text = option.help
    if option.used_by:
        text += f" [{', '.join(option.used_by)}]"
    text += f" (default: {_shown(option.default)}"
    tuned = _scenario_values(option.name)
    if tuned:
        text += f"; digits scenarios {tuned}"
    return text + ")"


def add_arguments(parser, rows=None):
    """One command-line flag per option of ``rows`` (default: ``table()``). Unset flags stay
    out of the parsed namespace (``argparse.SUPPRESS``), so that the job can tell a user's
    value from a default."""
    for option in (table() if rows is None else rows).values():
        kwargs = {"default": argparse.SUPPRESS, "help": _help(option),
                  "dest": option.name}
        if isinstance(option.kind, Flag):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parser_of(option)
            kwargs["nargs"] = option.kind.nargs
            kwargs["metavar"] = option.name.upper()
        parser.add_argument(option.flag, **kwargs)


def _parser_of(option):
    """argparse ``type=`` for one word: the item's kind for list options (the list is
    checked as a whole by ``resolve_config``)."""
    kind = option.kind.item if isinstance(option.kind, ListOf) else option.kind

    def parse(word):
        if isinstance(option.kind, ListOf) and word == option.kind.everything:
            return word
        try:
            return kind.coerce(word)
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"{word!r} is not {kind.describe()} ({error})") from None

    parse.__name__ = option.name  # argparse names it in "invalid NAME value"
    return parse


def from_arguments(args, rows=None):
    """The config a parsed command line sets: only the options (of ``rows``, default
    ``table()``) the user gave."""
    config = {}
    for option in (table() if rows is None else rows).values():
        if hasattr(args, option.name):
            value = getattr(args, option.name)
            if isinstance(option.kind, ListOf) and value == [option.kind.everything]:
                value = option.kind.everything
            config[option.name] = value
    return config


def markdown_table():
    """The README's option list (tests/test_readme.py keeps the README equal to it)."""
    lines = ["| option | default | takes | what |", "|---|---|---|---|"]
    for option in table().values():
        default = _shown(option.default)
        tuned = _scenario_values(option.name)
        if tuned:
            default += f" (digits {tuned})"
        what = option.help + (f" [{', '.join(option.used_by)}]" if option.used_by else "")
        lines.append(f"| `{option.flag}` | {default} | {option.kind.describe()} | "
                     f"{what.replace('|', '/')} |")
    return "\n".join(lines)

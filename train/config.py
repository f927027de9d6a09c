"""Recipe schema, YAML loading and ``key=value`` overrides.

A recipe is a YAML file with the sections below; every key has a default here, a recipe sets
only what differs, and ``section.key=value`` overrides from the command line win. Unknown
sections or keys are refused, so a typo never silently trains with a default. ``check_recipe``
then checks the resolved recipe's values against ``RANGES`` (every numeric key has one) before
anything is built, whichever backend trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message is one line for the user."""


@dataclass
class ModelConfig:
    name: str = "resnet18"  # a key of train.models.MODEL_BUILDERS
    stem: str = "auto"  # imagenet: 7x7/2 conv + max-pool; lowres: 3x3/1 conv, no max-pool; auto: by input size
    head: str = "linear"  # linear | ebv
    ebv_dim: int | None = None  # EBV dimension d; None: d = number of classes
    ebv_tau: float = 0.07
    ebv_seed: int = 42
    ebv_threshold: float = 0.002
    ebv_steps: int = 100_000  # cap on basis-optimisation steps (the official generator's cap)


@dataclass
class DataConfig:
    batch_size: int = 256  # global: split evenly across DDP ranks
    workers: int = 4  # DataLoader worker processes per rank (0: load in the training process)
    shuffle_buffer: int = 2000  # samples held for shuffling (0: stream order)
    shuffle_shards: bool = True
    crop: str = "pad"  # none | pad (random crop after zero padding) | resized (random resized crop)
    # Pixels (an integer), or a fraction of the sub-image side (below 1); the default is the source's 4 px
    # at 56 px, which scales with the side: 1 px at 7 or 14, 2 at 28, 8 at 112.
    crop_padding: int | float = 4 / 56
    resized_scale: float = 0.35  # smallest area fraction of the random resized crop
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # of x/255, like the source
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False  # exclude norm weights and biases from weight decay


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step | constant
    epochs: int = 100
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    min_lr: float = 1e-4  # cosine floor
    step_epochs: int = 30  # step: multiply lr by gamma every step_epochs
    gamma: float = 0.1


@dataclass
class TrainConfig:
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0: off
    cutmix_alpha: float = 0.0  # 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed when mixup or cutmix is on
    ema_decay: float = 0.0  # 0: off; e.g. 0.9998
    grad_clip: float = 0.0  # max global grad norm; 0: off
    accumulate_steps: int = 1  # micro-batches per optimizer step (each rank's batch split k ways)
    amp: bool | str = "auto"  # autocast: auto (on CUDA only) | true (every device, CPU included) | false
    amp_dtype: str = "bfloat16"  # bfloat16 | float16 (float16 uses a GradScaler)
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the training model
    compile_backend: str = "inductor"  # inductor | aot_eager (no code generation) | eager (graph capture only)
    fuse: int = 1  # members trained at once as one grouped network (cli.py train --fuse K); 1: one at a time
    seed: int = 0
    deterministic: bool = False
    val_every: int = 1  # validate every n epochs (and always after the last)
    checkpoint_every: int = 1


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Largest sub-image side for which model.stem=auto picks the lowres stem (the source method's stem for
# its 56 and 112 px members). With it a network ends on a side/8 grid, with the imagenet stem on side/32;
# up to 112 px the lowres grid is the nearer to torchvision's 7x7 at 224 (14 against 3.5 at 112).
AUTO_LOWRES_MAX_SIDE = 112
STEMS = ("imagenet", "lowres")


def resolve_stem(stem: str, side: int) -> str:
    """``auto`` → ``lowres`` for sub-images up to AUTO_LOWRES_MAX_SIDE px, ``imagenet`` above; others unchanged."""
    if stem == "auto":
        return "lowres" if side <= AUTO_LOWRES_MAX_SIDE else "imagenet"
    return stem


CHOICES = {
    "model.stem": ("auto", *STEMS),
    "model.head": ("linear", "ebv"),
    "data.crop": ("none", "pad", "resized"),
    "optimizer.name": ("sgd", "adamw"),
    "schedule.name": ("cosine", "step", "constant"),
    "train.amp_dtype": ("bfloat16", "float16"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
}
# Keys that take true, false or one of these words.
SWITCHES = {"train.amp": ("auto",)}

# Keys that take pixels (an integer >= 0) or a fraction of the sub-image side (a number in (0, 1)).
PIXELS_OR_FRACTION = {"data.crop_padding"}


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``None`` is unbounded, ``open_*`` excludes the end."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.open_high and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {_number(self.low)}"
        return (f"in {'(' if self.open_low else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.open_high else ']'}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


_POSITIVE = Range(0, open_low=True)
_NON_NEGATIVE = Range(0)
_AT_LEAST_ONE = Range(1)
_FRACTION = Range(0, 1)
_BELOW_ONE = Range(0, 1, open_high=True)
_SEED = Range(0, 2**32, open_high=True)

# The allowed values of every numeric key (a test checks none is missing). Floats must also be finite.
RANGES: dict[str, Range] = {
    "model.ebv_dim": _AT_LEAST_ONE, "model.ebv_tau": _POSITIVE, "model.ebv_seed": _SEED,
    "model.ebv_threshold": _FRACTION, "model.ebv_steps": _AT_LEAST_ONE,
    "data.batch_size": _AT_LEAST_ONE, "data.workers": _NON_NEGATIVE, "data.shuffle_buffer": _NON_NEGATIVE,
    "data.crop_padding": _NON_NEGATIVE, "data.resized_scale": Range(0, 1, open_low=True),
    "optimizer.lr": _POSITIVE, "optimizer.momentum": _BELOW_ONE, "optimizer.weight_decay": _NON_NEGATIVE,
    "schedule.epochs": _AT_LEAST_ONE, "schedule.warmup_epochs": _NON_NEGATIVE,
    "schedule.warmup_start_factor": _FRACTION, "schedule.min_lr": _NON_NEGATIVE,
    "schedule.step_epochs": _AT_LEAST_ONE, "schedule.gamma": Range(0, 1, open_low=True),
    "train.label_smoothing": _BELOW_ONE, "train.mixup_alpha": _NON_NEGATIVE, "train.cutmix_alpha": _NON_NEGATIVE,
    "train.mix_prob": _FRACTION, "train.ema_decay": _BELOW_ONE, "train.grad_clip": _NON_NEGATIVE,
    "train.accumulate_steps": _AT_LEAST_ONE, "train.seed": _SEED, "train.val_every": _AT_LEAST_ONE,
    "train.checkpoint_every": _AT_LEAST_ONE, "train.fuse": _AT_LEAST_ONE,
}
# List keys: (length, range of each element). Samples are always H x W x 3.
LIST_RANGES: dict[str, tuple[int, Range]] = {"data.mean": (3, Range()), "data.std": (3, _POSITIVE)}

_SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name not in ("name", "description")}


def recipe_dir() -> Path:
    return Path(str(resources.files(__package__) / "recipes"))


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description, for the recipes shipped with the package."""
    out = {}
    for path in sorted(recipe_dir().glob("*.yaml")):
        out[path.stem] = str(yaml.safe_load(path.read_text()).get("description", ""))
    return out


def _coerce(path: str, value: Any, annotation: str) -> Any:
    """Check ``value`` against the type of the field's default; ints are accepted for floats."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path} may not be null")
    if path in PIXELS_OR_FRACTION:
        return _pixels_or_fraction(path, value)
    if path in SWITCHES:
        if isinstance(value, bool) or value in SWITCHES[path]:
            return value
        raise ConfigError(f"{path} must be true, false or {' or '.join(SWITCHES[path])}, got {value!r}")
    if "list" in annotation:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"{path} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if "float" in annotation:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if "int" in annotation:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    value = str(value)
    if path in CHOICES and value not in CHOICES[path]:
        raise ConfigError(f"{path} must be one of {', '.join(CHOICES[path])}, got {value!r}")
    return value


def _pixels_or_fraction(path: str, value: Any) -> int | float:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
            (isinstance(value, float) and value >= 1):
        raise ConfigError(f"{path} must be pixels (an integer >= 0) or a fraction of the sub-image side "
                          f"(a number below 1, e.g. 0.125), got {value!r}")
    return value


def _apply(recipe: Recipe, path: str, value: Any) -> None:
    section_name, _, key = path.partition(".")
    if section_name in ("name", "description") and not key:
        setattr(recipe, section_name, str(value))
        return
    if section_name not in _SECTIONS:
        raise ConfigError(f"unknown recipe section {section_name!r} in {path!r}; "
                          f"sections: {', '.join(_SECTIONS)}")
    section = getattr(recipe, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"unknown recipe key {path!r}; {section_name} has: {', '.join(fields)}")
    setattr(section, key, _coerce(path, value, str(fields[key].type)))


def recipe_from_dict(raw: dict[str, Any], name: str) -> Recipe:
    recipe = Recipe(name=name)
    for top, body in raw.items():
        if top in ("name", "description"):
            _apply(recipe, top, body)
        elif isinstance(body, dict):
            for key, value in body.items():
                _apply(recipe, f"{top}.{key}", value)
        else:
            raise ConfigError(f"recipe entry {top!r} must be a section (a mapping), got {body!r}")
    return recipe


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = recipe_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            shipped = ", ".join(list_recipes())
            raise ConfigError(f"unknown recipe {name_or_path!r}; shipped recipes: {shipped}")
    elif not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    return recipe_from_dict(raw, raw.get("name", path.stem))


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``section.key=value`` strings; values parse as YAML (``0.1``, ``true``, ``[1,2]``)."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or "." not in path:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optimizer.lr=0.05)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not a YAML scalar") from exc
        _apply(recipe, path.strip(), value)
    return recipe


def _check_number(path: str, value: float, allowed: Range | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path} must be a finite number, got {value}")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{path} must be {allowed}, got {_number(value)}")


def _check_value(path: str, value: Any) -> None:
    if path in LIST_RANGES:
        length, each = LIST_RANGES[path]
        if len(value) != length:
            raise ConfigError(f"{path} must hold {length} values (one per channel), got {len(value)}")
        for item in value:
            _check_number(path, item, each)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(path, value, RANGES.get(path))


def check_recipe(recipe: Recipe) -> Recipe:
    """Refuse (ConfigError, one line naming the key) a value out of its range; the recipe otherwise.

    Called on the resolved recipe (YAML, then overrides), so a later override can fix a recipe's value.
    """
    for section_name in _SECTIONS:
        section = getattr(recipe, section_name)
        for item in dataclasses.fields(section):
            _check_value(f"{section_name}.{item.name}", getattr(section, item.name))
    schedule = recipe.schedule
    if schedule.name == "cosine" and schedule.min_lr > recipe.optimizer.lr:
        raise ConfigError(f"schedule.min_lr={schedule.min_lr:g} exceeds optimizer.lr={recipe.optimizer.lr:g}: "
                          "the cosine schedule would raise the learning rate")
    return recipe


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)

"""The unlearning router: which methods to try, in which order, for a champion and a requested method.

With `method=auto` the champion's family decides:

- a SISA ensemble uses `sisa`, which retrains only the constituents whose shards held forget rows;
- a certified head with removal budget left uses `newton`, gated, and escalates to `retrain`;
  a head whose budget is spent is retrained;
- a plain MLP uses the configured approximate method, gated, and escalates to `retrain`.

An explicit method must keep the champion's family; `retrain` is valid for every family
and retrains the whole model of that family from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.errors import ConfigurationError
from tasks.settings import UnlearnSettings

AUTO = "auto"
RETRAIN = "retrain"


@dataclass(frozen=True)
class Route:
    """The methods to try in order (the last one is exact) and why the router chose them."""

    plan: tuple[str, ...]
    reason: str


def is_exact(name: str) -> bool:
    """Tell whether a method's result equals retraining without the forget rows."""
    from models.unlearning import method_spec

    return name == RETRAIN or method_spec(name).exact


def family_methods(family: str) -> list[str]:
    """Return the registered methods that unlearn from, and return, a model of `family`, plus `retrain`.

    A method serves the family of the first model class its spec accepts. `newton`, for
    example, also accepts a plain MLP, but it returns a certified model.
    """
    from models.families import FAMILY_TYPES
    from models.unlearning import METHODS, method_spec

    model_type = FAMILY_TYPES[family]
    usable = {RETRAIN} | {name for name in METHODS if method_spec(name).model_types[0] is model_type}
    return sorted(usable)


def validate_method(name: str, family: str, role: str = "method") -> None:
    """Reject a method name the registry does not know, or one that cannot unlearn from `family`."""
    from models.unlearning import METHODS

    valid = family_methods(family)
    if name != AUTO and name not in METHODS:
        raise ConfigurationError(f"Unknown unlearning {role} {name!r}; valid for the {family} family: {AUTO}, {', '.join(valid)}.")
    if name != AUTO and name not in valid:
        raise ConfigurationError(f"Unlearning {role} {name!r} cannot unlearn from the {family} family; "
                                 f"valid for the {family} family: {AUTO}, {', '.join(valid)}.")


def validate_settings(settings: UnlearnSettings, family: str) -> None:
    """Check the configured method, the approximate method of `auto` and the exact fallback for `family`."""
    from models.unlearning import METHODS

    validate_method(settings.method, family)
    if family == "mlp":
        validate_method(settings.approximate, family, "setting unlearn.approximate")
        if is_exact(settings.approximate):
            raise ConfigurationError(f"unlearn.approximate is {settings.approximate!r}, an exact method; "
                                     "set it to an approximate one such as neggrad_plus.")
    if settings.fallback == AUTO or not is_exact(settings.fallback):
        raise ConfigurationError(f"unlearn.fallback must be an exact method such as {RETRAIN!r}, got {settings.fallback!r}.")
    validate_method(settings.fallback, family, "setting unlearn.fallback")
    unknown = sorted(set(settings.method_settings) - set(METHODS))
    if unknown:
        raise ConfigurationError(f"unlearn.method_settings names unknown methods {unknown}; use method names from `lethe methods`.")
    for name, overrides in settings.method_settings.items():
        check_method_settings(name, overrides)


def method_defaults() -> dict[str, dict]:
    """Return the default settings of each method that has settings; `retrain` follows the `train` section."""
    from models.unlearning import FINETUNE_DEFAULTS, NEGGRAD_PLUS_DEFAULTS, NEWTON_DEFAULTS, SALUN_DEFAULTS, SCRUB_DEFAULTS

    return {"finetune": FINETUNE_DEFAULTS, "neggrad_plus": NEGGRAD_PLUS_DEFAULTS, "scrub": SCRUB_DEFAULTS,
            "salun": SALUN_DEFAULTS, "newton": NEWTON_DEFAULTS, "retrain": {}, "sisa": {}}


def check_method_settings(name: str, overrides: dict) -> None:
    """Reject an unknown key, or a value whose type differs from the default's, before the run purges anything."""
    defaults = method_defaults().get(name)
    if defaults is None:
        return  # a method registered without known defaults checks its own settings when it runs
    if not isinstance(overrides, dict):
        raise ConfigurationError(f"unlearn.method_settings.{name} must be an object of settings, got {type(overrides).__name__}.")
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "none (its recipe comes from the train section or the model)"
        raise ConfigurationError(f"unlearn.method_settings.{name} has unknown settings {unknown}; valid settings: {valid}.")
    for key, value in overrides.items():
        if not _same_kind(defaults[key], value):
            raise ConfigurationError(f"unlearn.method_settings.{name}.{key} is {value!r} ({type(value).__name__}), but it must be "
                                     f"of type {type(defaults[key]).__name__}, like its default {defaults[key]!r}.")


def _same_kind(default, value) -> bool:
    # bool is an int in Python, but a flag given as 1 or a number given as true is a mistake.
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return default is None or isinstance(value, type(default))


def route(champion, requested: str, settings: UnlearnSettings) -> Route:
    """Pick the methods to try for `champion` when `requested` is `auto`, or check the explicit one."""
    from models.families import family_of

    family = family_of(champion)
    validate_method(requested, family)
    if requested != AUTO:
        plan = (requested,) if is_exact(requested) else (requested, settings.fallback)
        return Route(plan, f"method {requested} requested explicitly")

    if family == "sisa-mlp":
        return Route(("sisa",), "auto: the champion is a SISA ensemble, so sisa retrains only the affected constituents")
    if family == "certified":
        state = champion.head.describe()
        left, budget = state["budget_left"], state["residual_budget"]
        if left > 0:
            return Route(("newton", settings.fallback),
                         f"auto: the certified head has removal budget left ({left:.4g} of {budget:.4g}), so newton")
        return Route((settings.fallback,), f"auto: the certified head's removal budget ({budget:.4g}) is spent, so {settings.fallback}")
    return Route((settings.approximate, settings.fallback),
                 f"auto: the champion is a plain MLP, so the approximate method {settings.approximate} with gates")

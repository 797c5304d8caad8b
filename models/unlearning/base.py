"""The unlearning interface: method protocol, result records, registry and settings validation.

A method has the signature `method(model, forget, retain, val, settings, device) ->
UnlearnResult`. It never modifies the input model, rejects settings it does not
know, and returns the unlearned model with an `UnlearnRecord`. Methods register with
`register_method`, which also stores a `MethodSpec`: the model classes the method
accepts and how to build such a model from a trained baseline.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from models.data import Split
from models.network import TabularMLP

logger = logging.getLogger(__name__)


@dataclass
class UnlearnRecord:
    """Summary of one unlearning run for the experiment log.

    `settings` includes the defaults used. `details` contains method-specific outcomes
    (for example the certified budget left after a Newton removal) as JSON-compatible values.
    """

    method: str
    steps: int
    epochs: int
    wall_time_s: float
    device: str
    settings: dict
    details: dict = field(default_factory=dict)


@dataclass
class UnlearnResult:
    """The unlearned model and the record of how it was made."""

    model: nn.Module
    record: UnlearnRecord


class UnlearnMethod(Protocol):
    """A function that returns a copy of `model` with the `forget` rows removed."""

    def __call__(
        self, model: nn.Module, forget: Split, retain: Split, val: Split, settings: dict, device: torch.device
    ) -> UnlearnResult: ...


# Builds the model a method unlearns from, out of a trained baseline MLP, its training and
# validation data and model settings: prepare(baseline, train, val, settings, device).
PrepareModel = Callable[[TabularMLP, Split, Split, dict, torch.device], nn.Module]


def keep_baseline(model: TabularMLP, train: Split, val: Split, settings: dict, device: torch.device) -> nn.Module:
    """Return the baseline unchanged, for methods that unlearn from a plain TabularMLP. Rejects any setting."""
    resolve_settings("baseline", {}, settings)
    return model


@dataclass(frozen=True)
class MethodSpec:
    """Requirements of a registered method besides its settings.

    `model_types` are the model classes the method accepts. `prepare` builds such a
    model from a trained TabularMLP and the rows it was trained on, so benchmarks and
    tests can run every method from one baseline. Its settings configure the model
    it builds (for example SisaConfig fields), not the unlearning run. `exact` is True when the result
    equals retraining without the forget rows (with the same seeds), not an approximation.
    """

    name: str
    model_types: tuple[type[nn.Module], ...] = (TabularMLP,)
    prepare: PrepareModel = keep_baseline
    exact: bool = False

    def accepts(self, model_type: type[nn.Module]) -> bool:
        """Tell whether the method accepts models of `model_type`."""
        return issubclass(model_type, self.model_types)


METHODS: dict[str, UnlearnMethod] = {}
SPECS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    model_types: tuple[type[nn.Module], ...] = (TabularMLP,),
    prepare: PrepareModel = keep_baseline,
    exact: bool = False,
) -> Callable[[UnlearnMethod], UnlearnMethod]:
    """Add the decorated function to METHODS under `name`, with its MethodSpec in SPECS.

    Raises ValueError on a duplicate name.
    """

    def decorator(method: UnlearnMethod) -> UnlearnMethod:
        if name in METHODS:
            raise ValueError(f"Unlearning method {name!r} is already registered.")
        METHODS[name] = method
        SPECS[name] = MethodSpec(name=name, model_types=model_types, prepare=prepare, exact=exact)
        return method

    return decorator


def get_method(name: str) -> UnlearnMethod:
    """Look up an unlearning method by name. Raises KeyError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"Unknown unlearning method {name!r}. Valid methods: {', '.join(sorted(METHODS))}.") from None


def method_spec(name: str) -> MethodSpec:
    """Return the MethodSpec of a registered method.

    A function put into METHODS directly, without the decorator (as fault-injection
    tests do), gets the default spec: it accepts a TabularMLP. Raises KeyError
    listing the valid names when `name` is not registered.
    """
    get_method(name)
    return SPECS.get(name, MethodSpec(name=name))


def resolve_settings(method: str, defaults: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Merge `settings` over `defaults`. Raises ValueError naming any key that has no default."""
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown settings for {method!r}: {unknown}. Valid settings: {sorted(defaults)}.")
    return {**defaults, **settings}


def check_model_type(method: str, model: nn.Module) -> None:
    """Raise TypeError when `method` does not accept a model of this class, naming the classes it does accept."""
    spec = method_spec(method)
    if not spec.accepts(type(model)):
        accepted = ", ".join(model_type.__name__ for model_type in spec.model_types)
        raise TypeError(
            f"Unlearning method {method!r} accepts {accepted}, got {type(model).__name__}. "
            f"Build one from the baseline with models.unlearning.method_spec({method!r}).prepare."
        )


def copy_to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Return a deep copy of `model` on `device`, leaving the input untouched."""
    return copy.deepcopy(model).to(device)

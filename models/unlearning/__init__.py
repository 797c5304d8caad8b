"""Registry of unlearning methods: each returns a copy of a model with a forget set removed.

Every method has the signature
`method(model, forget, retain, val, settings, device) -> UnlearnResult`, never
modifies the input model, and rejects settings it does not know (see `base`).
Importing this package registers every method module below. A new method is one
new module that decorates its function with `register_method`, plus one import here.
"""

from __future__ import annotations

from models.unlearning.base import (
    METHODS,
    SPECS,
    MethodSpec,
    UnlearnMethod,
    UnlearnRecord,
    UnlearnResult,
    check_model_type,
    copy_to_device,
    get_method,
    method_spec,
    register_method,
    resolve_settings,
)
from models.unlearning.loops import cycle_batches

# Imported for their registration side effect, in the order they appear in METHODS.
from models.unlearning.retrain import retrain
from models.unlearning.finetune import FINETUNE_DEFAULTS, finetune
from models.unlearning.neggrad_plus import NEGGRAD_PLUS_DEFAULTS, neggrad_plus
from models.unlearning.scrub import SCRUB_DEFAULTS, scrub
from models.unlearning.salun import SALUN_DEFAULTS, salun
from models.unlearning.sisa import sisa
from models.unlearning.newton import NEWTON_DEFAULTS, newton

__all__ = [
    "FINETUNE_DEFAULTS",
    "METHODS",
    "NEGGRAD_PLUS_DEFAULTS",
    "NEWTON_DEFAULTS",
    "SALUN_DEFAULTS",
    "SCRUB_DEFAULTS",
    "SPECS",
    "MethodSpec",
    "UnlearnMethod",
    "UnlearnRecord",
    "UnlearnResult",
    "check_model_type",
    "copy_to_device",
    "cycle_batches",
    "finetune",
    "get_method",
    "method_spec",
    "neggrad_plus",
    "newton",
    "register_method",
    "resolve_settings",
    "retrain",
    "salun",
    "scrub",
    "sisa",
]

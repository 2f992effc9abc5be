"""Method presets: the baselines of the BalPoE paper and BalPoE itself as named overlays on any recipe.

``--method NAME`` (the recipe field ``method``) replaces the recipe's model and loss settings with those of
the method and keeps everything else (data, split, backbone, schedule, seed), so that methods are compared at
the same budget:

- ``ce``: cross-entropy, predicting with the raw logits (the paper's CE rows): 1 expert, lambda 1, no
  mixup, ``remove_mean_lambda=False``.
- ``ce-la``: cross-entropy + post-hoc logit adjustment (Menon et al., ICLR 2021): as ``ce``, but the
  prediction removes ``log pi_train`` (``remove_mean_lambda=True``).
- ``bs``: balanced softmax (Ren et al., NeurIPS 2020): 1 expert, lambda 0, no mixup.
- ``lade``: LADE (Hong et al., CVPR 2021), balanced softmax + the LADE regulariser: 1 expert, lambda 0,
  ``loss="lade"``, no mixup (the reference LADE trains without it); ``lade_weight`` and
  ``lade_remine_lambda`` stay the recipe's.
- ``balpoe-erm``: BalPoE trained without mixup (the paper's "BalPoE, ERM" rows): 3 experts, lambdas
  1 / 0 / -1, no mixup.
- ``balpoe``: BalPoE: 3 experts, lambdas 1 / 0 / -1, with the recipe's mixup (which must be on).

Every preset also sets ``loss`` and ``remove_mean_lambda``, so a method means the same on any recipe.

This module holds only data and checks (no ``balpoe_hf`` imports), so that the recipe module can use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Literal

Method = Literal["ce", "ce-la", "bs", "lade", "balpoe-erm", "balpoe"]

_ONE_EXPERT = {"num_experts": 1, "mixup_alpha": 0.0, "loss": "balpoe", "remove_mean_lambda": True}
_THREE_EXPERTS = {"num_experts": 3, "lambdas": [1.0, 0.0, -1.0], "loss": "balpoe", "remove_mean_lambda": True}

# Method -> the recipe fields it sets. ``balpoe`` leaves mixup_alpha to the recipe.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "ce": {**_ONE_EXPERT, "lambdas": [1.0], "remove_mean_lambda": False},
    "ce-la": {**_ONE_EXPERT, "lambdas": [1.0]},
    "bs": {**_ONE_EXPERT, "lambdas": [0.0]},
    "lade": {**_ONE_EXPERT, "lambdas": [0.0], "loss": "lade"},
    "balpoe-erm": {**_THREE_EXPERTS, "mixup_alpha": 0.0},
    "balpoe": dict(_THREE_EXPERTS),
}

METHOD_DESCRIPTIONS: dict[str, str] = {
    "ce": "cross-entropy, raw logits",
    "ce-la": "cross-entropy + post-hoc logit adjustment",
    "bs": "balanced softmax",
    "lade": "LADE (balanced softmax + LADE regulariser)",
    "balpoe-erm": "BalPoE 1/0/-1 without mixup",
    "balpoe": "BalPoE 1/0/-1 with mixup",
}

METHODS: tuple[str, ...] = tuple(METHOD_SETTINGS)
# Recipe fields every preset sets (``balpoe`` leaves mixup_alpha to the recipe): a comparison of methods
# cannot set them for all of its methods.
EVERY_METHOD_FIELDS: tuple[str, ...] = tuple(sorted(set.intersection(*(set(settings) for settings
                                                                        in METHOD_SETTINGS.values()))))


def _unknown(name: object) -> ValueError:
    close = difflib.get_close_matches(str(name), METHODS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown method {name!r}; the methods are {', '.join(METHODS)}.{hint}")


def method_settings(method: str) -> dict[str, Any]:
    """The recipe fields that ``method`` sets (a fresh copy), e.g. ``{"num_experts": 1, ...}``."""
    if method not in METHOD_SETTINGS:
        raise _unknown(method)
    return {name: list(value) if isinstance(value, list) else value
            for name, value in METHOD_SETTINGS[method].items()}


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """A comma list like ``"ce,bs,balpoe"`` (or a list of names) -> method names, checked and in order.

    Raises ``ValueError`` for an unknown name (suggesting the closest one), a repeated name or an empty list.
    """
    if isinstance(methods, str):
        methods = methods.split(",")
    names = [name.strip() for name in methods if name.strip()]
    if not names:
        raise ValueError(f"no method given; choose from {', '.join(METHODS)}.")
    for name in names:
        if name not in METHOD_SETTINGS:
            raise _unknown(name)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"methods {repeated} are listed more than once.")
    return names


def method_conflicts(method: str, given: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields in ``given`` (values the user set explicitly) that ``method`` sets to something else.

    Returns ``{field: (given value, the method's value)}``; numbers compare by value (``1 == 1.0``).
    """
    settings = method_settings(method)
    return {name: (given[name], value) for name, value in settings.items()
            if name in given and given[name] != value}

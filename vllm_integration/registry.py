"""The algorithm map: (algorithm ID, layer type) -> vLLM quantize-method class.

Successor of vLLM Ascend's ``ASCEND_QUANTIZATION_METHOD_MAP`` (<= v0.13) and
``_SCHEME_REGISTRY`` (v0.23, ``register_scheme``): method classes register themselves with
:func:`register_method`; :func:`get_method_class` looks one up. Registering a second class for
the same key raises, and an unknown key raises with the list of supported IDs. Pure Python:
importing it does not import vLLM.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["LAYER_TYPES", "get_method_class", "register_method", "registered_methods", "supported_ids"]

#: "linear": LinearBase layers (and a quantized lm_head); "moe": routed experts.
LAYER_TYPES = ("linear", "moe")

_REGISTRY: dict[tuple[str, str], type] = {}


def register_method(algo: str, layer_type: str) -> Callable[[type], type]:
    """Class decorator: register ``cls`` for ``(algo, layer_type)``; a duplicate raises ``ValueError``."""
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {layer_type!r}; expected one of {', '.join(LAYER_TYPES)}")

    def wrap(cls: type) -> type:
        key = (algo, layer_type)
        if key in _REGISTRY:
            raise ValueError(
                f"a method is already registered for algorithm {algo!r} and layer type {layer_type!r}: "
                f"{_REGISTRY[key].__qualname__} (refusing {cls.__qualname__})"
            )
        _REGISTRY[key] = cls
        return cls

    return wrap


def supported_ids(layer_type: str) -> list[str]:
    return sorted(a for a, t in _REGISTRY if t == layer_type)


def get_method_class(algo: str, layer_type: str) -> type:
    """The class registered for ``(algo, layer_type)``; ``ValueError`` listing the supported IDs otherwise."""
    try:
        return _REGISTRY[(algo, layer_type)]
    except KeyError:
        raise ValueError(
            f"algorithm ID {algo!r} is not supported for {layer_type} layers; supported: "
            f"{', '.join(supported_ids(layer_type)) or '(none registered)'}"
        ) from None


def registered_methods() -> dict[tuple[str, str], type]:
    """A copy of the map (for inspection and tests)."""
    return dict(_REGISTRY)

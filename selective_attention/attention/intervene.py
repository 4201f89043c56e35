"""One intervention primitive: attach state to a model's attention modules and switch its attention implementation.

Head masks, the retrieval probe, the attention recorder, the tree kernel and the head-wise KV cache are all the same
move: every attention module gets an attribute that the registered attention function reads, the model switches to
that function, and leaving restores both. `intervene` does it once, returns a typed `Intervention` handle (also a
context manager), and keeps a per-model stack so nested interventions unwind in reverse order, as
TransformerLens' hook contexts do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from selective_attention.modeling import attention_modules, check_attention_interface, text_config

#: Attribute of the model holding its stack of active interventions (innermost last).
STACK_ATTRIBUTE = "_sa_interventions"


class Intervention:
    """An active intervention; `remove()` (or leaving its `with` block) restores what it replaced."""

    def __init__(self, model: nn.Module, attribute: str, modules: list[tuple[int, nn.Module]],
                 saved_modules: list[tuple[nn.Module, Any]], saved_config: dict[str, Any],
                 previous_implementation: str | None, name: str) -> None:
        self.model = model
        self.attribute = attribute
        self.name = name
        self._modules = modules
        self._saved_modules = saved_modules
        self._saved_config = saved_config
        self._previous_implementation = previous_implementation
        self.active = True

    def remove(self) -> None:
        """Restore the attributes, config entries and attention implementation this intervention replaced."""
        if not self.active:
            return
        stack: list[Intervention] = getattr(self.model, STACK_ATTRIBUTE)
        if stack[-1] is not self:
            raise RuntimeError(f"interventions unwind in reverse order: remove {stack[-1].name!r} before "
                               f"{self.name!r}")
        for module, value in self._saved_modules:
            setattr(module, self.attribute, value)
        config = text_config(self.model)
        for key, value in self._saved_config.items():
            setattr(config, key, value)
        if self._previous_implementation is not None \
                and self.model.config._attn_implementation != self._previous_implementation:
            self.model.set_attn_implementation(self._previous_implementation)
        stack.pop()
        self.active = False

    def update(self, value_for_layer: Callable[[int], Any], config: dict[str, Any] | None = None) -> None:
        """Replace the attached values (and text-config entries) in place, wherever this intervention sits in the
        stack; `remove()` still restores what was there before it began."""
        if not self.active:
            raise RuntimeError(f"{self.name!r} was removed")
        values = {layer: value_for_layer(layer) for layer in {layer for layer, _ in self._modules}}
        for layer, module in self._modules:
            setattr(module, self.attribute, values[layer])
        text = text_config(self.model)
        for key, value in (config or {}).items():
            if key not in self._saved_config:
                self._saved_config[key] = getattr(text, key, None)
            setattr(text, key, value)

    def __enter__(self) -> Intervention:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Intervention({self.name!r}, attribute={self.attribute!r}, active={self.active})"


def intervene(model: nn.Module, attribute: str, value_for_layer: Callable[[int], Any],
              implementation: str | None = None, config: dict[str, Any] | None = None,
              name: str | None = None, handle: type[Intervention] = Intervention) -> Intervention:
    """Set `attribute` on every attention module to `value_for_layer(layer)`, the text config's entries `config`,
    and switch the model to `implementation` (None: keep the current one). Checks the model before changing
    anything; the returned handle (of class `handle`, a subclass of `Intervention` for typed handles) restores all
    of it."""
    check_attention_interface(model)
    modules = attention_modules(model)
    values = {layer: value_for_layer(layer) for layer in modules}  # computed first: a failing value changes nothing
    saved_modules = [(module, getattr(module, attribute, None)) for ms in modules.values() for module in ms]
    text = text_config(model)
    saved_config = {key: getattr(text, key, None) for key in (config or {})}
    previous = model.config._attn_implementation
    for layer, layer_modules in modules.items():
        for module in layer_modules:
            setattr(module, attribute, values[layer])
    for key, value in (config or {}).items():
        setattr(text, key, value)
    if implementation is not None and previous != implementation:
        model.set_attn_implementation(implementation)
    layered = [(layer, module) for layer, ms in modules.items() for module in ms]
    intervention = handle(model, attribute, layered, saved_modules, saved_config,
                          previous if implementation is not None else None, name or attribute)
    stack = getattr(model, STACK_ATTRIBUTE, None)
    if stack is None:
        stack = []
        object.__setattr__(model, STACK_ATTRIBUTE, stack)  # a plain list, not a submodule or buffer
    stack.append(intervention)
    return intervention


def active_intervention(model: nn.Module, attribute: str) -> Intervention | None:
    """The innermost active intervention on `attribute`, if any."""
    return next((h for h in reversed(active_interventions(model)) if h.attribute == attribute), None)


def active_interventions(model: nn.Module) -> list[Intervention]:
    """The model's active interventions, outermost first."""
    return list(getattr(model, STACK_ATTRIBUTE, []))

"""Each backend's advanced controls, rendered from its Params declaration (no per-backend UI code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from backends.base import Param, param_field_info
from backends.registry import get_backend


def control_for(default: Any, param: Param) -> gr.components.Component:
    """choices → dropdown, bool → checkbox, bounded number → slider, other number → number box, else text."""
    info = param.help or None
    # interactive=True: gradio infers interactivity from event inputs, and the run event is wired inside @gr.render.
    if param.choices:
        return gr.Dropdown(choices=list(param.choices), value=default, label=param.label, info=info, interactive=True)
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=param.label, info=info, interactive=True)
    if isinstance(default, (int, float)):
        if param.minimum is not None and param.maximum is not None:
            step = param.step or (1 if isinstance(default, int) else (param.maximum - param.minimum) / 100)
            return gr.Slider(param.minimum, param.maximum, value=default, step=step, label=param.label, info=info,
                             interactive=True)
        return gr.Number(value=default, label=param.label, info=info, interactive=True,
                         precision=0 if isinstance(default, int) else None)
    return gr.Textbox(value=str(default), label=param.label, info=info, interactive=True)


def coerce(value: Any, kind: type) -> Any:
    """A control's value as the declared field's type (sliders and number boxes hand back floats)."""
    if kind is bool:
        return bool(value)
    if kind is int:
        return round(float(value))
    if kind is float:
        return float(value)
    return value if kind is str and isinstance(value, str) else kind(value)


@dataclass
class ParamControls:
    """The rendered controls in order, and which (backend, field, type) each one sets."""

    keys: list[tuple[str, str, type]]
    components: list[gr.components.Component]

    def collect(self, values: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Control values (in `components` order) → {backend: {field: value}}."""
        out: dict[str, dict[str, Any]] = {}
        for (backend, name, kind), value in zip(self.keys, values, strict=True):
            out.setdefault(backend, {})[name] = coerce(value, kind)
        return out


def render_param_controls(backends: list[str]) -> ParamControls:
    """One tab per backend that declares parameters, one control per field (fields without a default are left out:
    the backend has no value to show)."""
    keys: list[tuple[str, str, type]] = []
    components: list[gr.components.Component] = []
    with gr.Tabs():
        for name in backends:
            backend = get_backend(name)
            fields = [f for f in param_field_info(backend.Params) if f[1] is not dataclasses.MISSING]
            if not fields:
                continue
            with gr.Tab(backend.label):
                for field_name, default, param in fields:
                    keys.append((name, field_name, type(default)))
                    components.append(control_for(default, param))
    return ParamControls(keys, components)

"""Benchmark models: each builder takes a preset name and returns a `Model`.

A `Model` holds its `config`, an `init()` that returns `(params, batch)` arrays and
`loss_with(per_layer)`, which builds `loss(params, batch) -> scalar` with every layer
function passed through `per_layer` first. Variants use the hook to wrap each layer
(`jax.checkpoint`, `checkpoint_name`, ...); `model.loss` is the unwrapped loss.

A layer function has the signature `layer(w, x) -> x`, where `w` is that layer's
slice of the stacked weights. To add a model, write a builder and register it in
`MODELS`; run.py picks it up by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = Any
Layer = Callable[[Array, Array], Array]
PerLayer = Callable[[Layer], Layer]
Loss = Callable[[Any, Any], Array]


def identity_layer(layer: Layer) -> Layer:
    """The default `per_layer` hook: leave the layer as it is."""
    return layer


@dataclasses.dataclass(frozen=True)
class Model:
    """A benchmark workload: its arrays and its loss, with a hook on each layer."""

    name: str
    preset: str
    config: dict[str, Any]
    init: Callable[[], tuple[Any, Any]]
    loss_with: Callable[[PerLayer], Loss]

    @property
    def loss(self) -> Loss:
        """The plain loss, no layer wrapped."""
        return self.loss_with(identity_layer)


def stacked_loss(layer: Layer, num_layers: int) -> Callable[[PerLayer], Loss]:
    """`loss_with` for a Python loop of `layer` over stacked weights `params["w"]`.

    The loss is `mean(x.astype(f32) ** 2)` of the last layer's output.
    """

    def loss_with(per_layer: PerLayer) -> Loss:
        wrapped = per_layer(layer)

        def loss(params: dict[str, Array], batch: dict[str, Array]) -> Array:
            x = batch["x"]
            for i in range(num_layers):
                x = wrapped(params["w"][i], x)
            return jnp.mean(x.astype(jnp.float32) ** 2)

        return loss

    return loss_with


def pick_preset(presets: dict[str, dict[str, Any]], preset: str, model: str) -> dict[str, Any]:
    """The config of `preset`, or a `ValueError` naming the ones that exist."""
    if preset not in presets:
        raise ValueError(f"model {model!r} has no preset {preset!r}; choose from {list(presets)}")
    return dict(presets[preset])


# ---------------------------------------------------------------------------- mlp

MLP_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"layers": 4, "dim": 128, "rows": 256, "dtype": "bfloat16"},
    # The reference workload of shared/notes/GPU_FINDINGS.md.
    "reference": {"layers": 16, "dim": 4096, "rows": 16384, "dtype": "bfloat16"},
}


def mlp_layer(w: Array, x: Array) -> Array:
    """One dense layer: `tanh(x @ w)`."""
    return jnp.tanh(x @ w)


def mlp(preset: str) -> Model:
    """`layers` dense layers `x = tanh(x @ w[i])`, weights stacked `(L, D, D)`."""
    config = pick_preset(MLP_PRESETS, preset, "mlp")
    layers, dim, rows = config["layers"], config["dim"], config["rows"]
    dtype = jnp.dtype(config["dtype"])

    def init() -> tuple[dict[str, Array], dict[str, Array]]:
        kw, kx = jax.random.split(jax.random.PRNGKey(0))
        w = jax.random.normal(kw, (layers, dim, dim), dtype) * jnp.asarray(dim**-0.5, dtype)
        x = jax.random.normal(kx, (rows, dim), dtype)
        return {"w": w}, {"x": x}

    return Model("mlp", preset, config, init, stacked_loss(mlp_layer, layers))


# ---------------------------------------------------------------------------- cnn

CNN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"layers": 3, "channels": 16, "size": 16, "images": 8, "dtype": "bfloat16"},
    # Sized by hand, not yet measured on a GPU.
    "reference": {"layers": 8, "channels": 256, "size": 64, "images": 64, "dtype": "bfloat16"},
}


def cnn_layer(w: Array, x: Array) -> Array:
    """One 3x3 'SAME' convolution, NHWC, channels in = channels out, then relu."""
    y = jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.relu(y)


def cnn(preset: str) -> Model:
    """`layers` 3x3 convolutions with relu, kernels stacked `(L, 3, 3, C, C)`."""
    config = pick_preset(CNN_PRESETS, preset, "cnn")
    layers, ch, size, images = (config[k] for k in ("layers", "channels", "size", "images"))
    dtype = jnp.dtype(config["dtype"])

    def init() -> tuple[dict[str, Array], dict[str, Array]]:
        kw, kx = jax.random.split(jax.random.PRNGKey(0))
        scale = jnp.asarray((2.0 / (9 * ch)) ** 0.5, dtype)
        w = jax.random.normal(kw, (layers, 3, 3, ch, ch), dtype) * scale
        x = jax.random.normal(kx, (images, size, size, ch), dtype)
        return {"w": w}, {"x": x}

    return Model("cnn", preset, config, init, stacked_loss(cnn_layer, layers))


MODELS: dict[str, Callable[[str], Model]] = {"mlp": mlp, "cnn": cnn}

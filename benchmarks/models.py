"""Benchmark models: each builder takes a preset name and returns a `Model`.

A `Model` holds its `config`, an `init()` that returns `(params, batch)` arrays,
`loss_with(per_layer)`, which builds `loss(params, batch) -> scalar` with every layer
function passed through `per_layer` first, and the optax `optimizer` that trains it.
Variants use the hook to wrap each layer (`jax.checkpoint`, `checkpoint_name`, ...);
`model.loss` is the unwrapped loss.

A layer function has the signature `layer(w, x) -> x`, where `w` is that layer's
parameters (a slice of stacked weights, or a pytree). To add a model, write a builder
and register it in `MODELS`; run.py picks it up by name.

Models:
  mlp       the reference MLP of shared/notes/GPU_FINDINGS.md, bf16, SGD.
  cnn       a small ResNet-style network in plain JAX: conv, batch norm with batch
            statistics, residual adds, max and global average pooling, a classifier
            head and cross entropy; f32 params, bf16 compute, SGD.
  gpt       a GPT-style decoder in flax nnx (pre-norm blocks, causal attention, gelu
            MLP, tied LM head, next-token cross entropy); f32 params, bf16 compute,
            optax adamw; a Python loop over the blocks.
  gpt_scan  the same decoder with its blocks stacked and run by `nnx.scan`.

A builder must not touch a JAX backend: run.py's parent process calls it for the
config only. Arrays are made in `init()`, graph definitions at trace time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Array = Any
Layer = Callable[[Array, Array], Array]
PerLayer = Callable[[Layer], Layer]
Loss = Callable[[Any, Any], Array]

SGD_LEARNING_RATE = 1e-3
ADAMW = {"learning_rate": 3e-4, "b1": 0.9, "b2": 0.95, "weight_decay": 0.1}
SIZED_BY_HAND = "sized by hand, not measured on a GPU"


def identity_layer(layer: Layer) -> Layer:
    """The default `per_layer` hook: leave the layer as it is."""
    return layer


def sgd() -> optax.GradientTransformation:
    """Plain SGD: `p - lr * g` in the parameter's dtype, no optimizer state."""
    return optax.sgd(SGD_LEARNING_RATE)


@dataclasses.dataclass(frozen=True)
class Model:
    """A benchmark workload: its arrays, its loss with a hook on each layer, its optimizer.

    `offload_dots` says that the layers are matmuls, so JAX's
    `offload_dot_with_no_batch_dims` policy is a meaningful offload candidate for it.
    """

    name: str
    preset: str
    config: dict[str, Any]
    init: Callable[[], tuple[Any, Any]]
    loss_with: Callable[[PerLayer], Loss]
    optimizer: optax.GradientTransformation = dataclasses.field(default_factory=sgd)
    offload_dots: bool = False

    @functools.cached_property
    def loss(self) -> Loss:
        """The plain loss, no layer wrapped (one function object per model)."""
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
    # 24x the reference's rows: about 96 GiB of layer inputs and tanh outputs kept for
    # the backward, more than an 80 GB GPU holds without offloading. Sized by hand,
    # not measured on a GPU.
    "full": {"layers": 16, "dim": 4096, "rows": 393216, "dtype": "bfloat16"},
}


def mlp_layer(w: Array, x: Array) -> Array:
    """One dense layer: `tanh(x @ w)`."""
    return jnp.tanh(x @ w)


def mlp(preset: str) -> Model:
    """`layers` dense layers `x = tanh(x @ w[i])`, weights stacked `(L, D, D)`."""
    config = pick_preset(MLP_PRESETS, preset, "mlp")
    layers, dim, rows = config["layers"], config["dim"], config["rows"]
    dtype = jnp.dtype(config["dtype"])
    config["optimizer"] = f"sgd(lr={SGD_LEARNING_RATE})"

    def init() -> tuple[dict[str, Array], dict[str, Array]]:
        kw, kx = jax.random.split(jax.random.PRNGKey(0))
        w = jax.random.normal(kw, (layers, dim, dim), dtype) * jnp.asarray(dim**-0.5, dtype)
        x = jax.random.normal(kx, (rows, dim), dtype)
        return {"w": w}, {"x": x}

    return Model("mlp", preset, config, init, stacked_loss(mlp_layer, layers), offload_dots=True)


# ---------------------------------------------------------------------------- cnn

# ResNet-18 stages on 128x128 images; sized by hand, not measured on a GPU.
CNN_REFERENCE: dict[str, Any] = {
    "widths": [64, 128, 256, 512],
    "blocks_per_stage": [2, 2, 2, 2],
    "size": 128,
    "images": 256,
    "classes": 1000,
}
CNN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "widths": [8, 16],
        "blocks_per_stage": [1, 1],
        "size": 16,
        "images": 8,
        "classes": 10,
    },
    "reference": CNN_REFERENCE,
    # 8x the reference's images: about 80 GB of activations by the same estimate,
    # beyond an 80 GB GPU without offloading. Sized by hand, not measured on a GPU.
    "full": CNN_REFERENCE | {"images": 2048},
}
CNN_IN_CHANNELS = 3
BN_EPSILON = 1e-5
CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def conv(x: Array, w: Array, stride: int = 1) -> Array:
    """A 'SAME' convolution, NHWC, in `x`'s dtype (the f32 kernel is cast to it)."""
    return jax.lax.conv_general_dilated(
        x, w.astype(x.dtype), (stride, stride), "SAME", dimension_numbers=CONV_DIMS
    )


def batch_norm(x: Array, p: dict[str, Array]) -> Array:
    """Batch norm over (N, H, W) with the batch's statistics (training mode), in f32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
    y = (x32 - mean) * jax.lax.rsqrt(var + BN_EPSILON) * p["scale"] + p["bias"]
    return y.astype(x.dtype)


def stem_layer(w: Array, x: Array) -> Array:
    """3x3 conv, batch norm, relu, then a 3x3 stride-2 max pool."""
    y = jax.nn.relu(batch_norm(conv(x, w["conv"]), w["bn"]))
    return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")


def residual_layer(stride: int) -> Layer:
    """A basic ResNet block: conv-bn-relu-conv-bn, plus a shortcut, then relu.

    The shortcut is a 1x1 conv with batch norm when the block changes shape.
    """

    def layer(w: dict[str, Any], x: Array) -> Array:
        y = jax.nn.relu(batch_norm(conv(x, w["conv1"], stride), w["bn1"]))
        y = batch_norm(conv(y, w["conv2"]), w["bn2"])
        shortcut = batch_norm(conv(x, w["proj"], stride), w["bn_proj"]) if "proj" in w else x
        return jax.nn.relu(y + shortcut)

    return layer


def cnn_strides(config: dict[str, Any]) -> list[int]:
    """The stride of each residual block: 2 at the start of every stage but the first."""
    return [
        2 if stage > 0 and i == 0 else 1
        for stage, n in enumerate(config["blocks_per_stage"])
        for i in range(n)
    ]


def cnn_shapes(config: dict[str, Any]) -> dict[str, Any]:
    """The parameter shapes: `stem`, `blocks` (a list) and `head`."""
    widths, blocks_per_stage = config["widths"], config["blocks_per_stage"]
    bn = lambda c: {"scale": (c,), "bias": (c,)}  # noqa: E731
    shapes: dict[str, Any] = {
        "stem": {"conv": (3, 3, CNN_IN_CHANNELS, widths[0]), "bn": bn(widths[0])},
        "blocks": [],
        "head": {"w": (widths[-1], config["classes"]), "b": (config["classes"],)},
    }
    cin = widths[0]
    for stage, (cout, n) in enumerate(zip(widths, blocks_per_stage, strict=True)):
        for i in range(n):
            block = {
                "conv1": (3, 3, cin, cout),
                "bn1": bn(cout),
                "conv2": (3, 3, cout, cout),
                "bn2": bn(cout),
            }
            if cin != cout or (stage > 0 and i == 0):
                block |= {"proj": (1, 1, cin, cout), "bn_proj": bn(cout)}
            shapes["blocks"].append(block)
            cin = cout
    return shapes


def cnn_activation_estimate(config: dict[str, Any]) -> int:
    """Rough bytes of saved activations: 4 bf16 tensors per conv output (conv out,
    normalised, relu out, next input) plus the f32 batch-norm input copy of each."""
    n, size = config["images"], config["size"]
    total = n * size * size * config["widths"][0] * (4 * 2 + 4)  # stem, before the pool
    size = math.ceil(size / 2)
    for stride, block in zip(cnn_strides(config), cnn_shapes(config)["blocks"], strict=True):
        size = math.ceil(size / stride)
        convs = 3 if "proj" in block else 2
        total += convs * n * size * size * block["conv1"][-1] * (4 * 2 + 4)
    return total


def cnn(preset: str) -> Model:
    """A ResNet-style classifier; the residual blocks (and the stem) are the layers."""
    config = pick_preset(CNN_PRESETS, preset, "cnn")
    shapes = cnn_shapes(config)
    strides = cnn_strides(config)
    is_shape = lambda s: isinstance(s, tuple)  # noqa: E731
    num_params = sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=is_shape))
    config |= {
        "param_dtype": "float32",
        "compute_dtype": "bfloat16",
        "optimizer": f"sgd(lr={SGD_LEARNING_RATE})",
        "params": num_params,
        "activation_estimate_bytes": cnn_activation_estimate(config),
        "sizing": f"activation estimate is a rough formula; {SIZED_BY_HAND}",
    }
    n, size, classes = config["images"], config["size"], config["classes"]

    def init() -> tuple[dict[str, Any], dict[str, Array]]:
        # numpy's generator: jax.random would compile a threefry kernel per shape.
        rng = np.random.default_rng(0)

        def make(path: tuple[Any, ...], shape: tuple[int, ...]) -> Array:
            if path[-1] == jax.tree_util.DictKey("scale"):  # batch norm starts as identity
                return jnp.ones(shape)
            if len(shape) == 1:  # batch-norm and head biases
                return jnp.zeros(shape)
            std = (2.0 / math.prod(shape[:-1])) ** 0.5
            return jnp.asarray(rng.normal(0.0, std, shape), jnp.float32)

        params = jax.tree_util.tree_map_with_path(make, shapes, is_leaf=is_shape)
        images = rng.normal(size=(n, size, size, CNN_IN_CHANNELS))
        labels = rng.integers(0, classes, (n,))
        return params, {
            "images": jnp.asarray(images, jnp.bfloat16),
            "labels": jnp.asarray(labels, jnp.int32),
        }

    def loss_with(per_layer: PerLayer) -> Loss:
        stem = per_layer(stem_layer)
        blocks = {s: per_layer(residual_layer(s)) for s in set(strides)}

        def loss(params: dict[str, Any], batch: dict[str, Array]) -> Array:
            x = stem(params["stem"], batch["images"])
            for stride, w in zip(strides, params["blocks"], strict=True):
                x = blocks[stride](w, x)
            pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            logits = pooled @ params["head"]["w"] + params["head"]["b"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
            return jnp.mean(ce)

        return loss

    return Model("cnn", preset, config, init, loss_with)


# ---------------------------------------------------------------------------- gpt

GPT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"layers": 2, "dim": 64, "heads": 4, "seq": 32, "batch": 4, "vocab": 256},
    # 674M params. Activations (~37.6 GB by `gpt_activation_estimate`) dominate f32
    # params + grads + adamw state (~10.8 GB); the sum leaves room in 80 GB for bf16
    # weight copies and XLA's workspace. Sized by hand, not measured on a GPU.
    "reference": {"layers": 12, "dim": 2048, "heads": 16, "seq": 1024, "batch": 16, "vocab": 32768},
    # 3x the reference's batch: ~113 GB of activations by the same estimate, beyond an
    # 80 GB GPU without offloading. Sized by hand, not measured on a GPU.
    "full": {"layers": 12, "dim": 2048, "heads": 16, "seq": 1024, "batch": 48, "vocab": 32768},
}
GPT_DEFAULTS = {
    "mlp_ratio": 4,
    "tie_embeddings": True,
    "param_dtype": "float32",
    "compute_dtype": "bfloat16",
}


def dtypes(config: dict[str, Any]) -> dict[str, Any]:
    """The `dtype` (compute) and `param_dtype` keywords of nnx layers."""
    return {
        "dtype": jnp.dtype(config["compute_dtype"]),
        "param_dtype": jnp.dtype(config["param_dtype"]),
    }


class Block(nnx.Module):
    """A pre-norm decoder block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

    def __init__(self, config: dict[str, Any], *, rngs: nnx.Rngs):
        dim, hidden = config["dim"], config["mlp_ratio"] * config["dim"]
        kw = dtypes(config)
        self.heads = config["heads"]
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs, **kw)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs, **kw)
        self.proj = nnx.Linear(dim, dim, rngs=rngs, **kw)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs, **kw)
        self.fc = nnx.Linear(dim, hidden, rngs=rngs, **kw)
        self.out = nnx.Linear(hidden, dim, rngs=rngs, **kw)

    def attention(self, x: Array) -> Array:
        """Causal multi-head self-attention; softmax in f32, the rest in x's dtype."""
        b, s, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3 * self.heads, d // self.heads), 3, 2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** -0.5
        causal = jnp.tril(jnp.ones((s, s), bool))
        scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d))

    def __call__(self, x: Array) -> Array:
        x = x + self.attention(self.ln1(x))
        return x + self.out(nnx.gelu(self.fc(self.ln2(x))))


def block_layer(graphdef: Any) -> Layer:
    """A block as a `layer(w, x)`: `w` is the block's parameters as a pure dict."""

    def layer(w: Any, x: Array) -> Array:
        return nnx.merge(graphdef, w)(x)

    return layer


def pure(module: nnx.Module) -> dict[str, Any]:
    """A module's state as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(module))


class GPT(nnx.Module):
    """Token and position embeddings, `layers` blocks, a final norm, an LM head.

    With `config["scan"]` the blocks are one `Block` whose parameters are stacked on a
    leading layer axis (made with `nnx.vmap`) and run by `nnx.scan`; otherwise they are
    an `nnx.List` run by a Python loop. Either way each block call goes through the
    `per_layer` hook in its functional form, `block_layer`.
    """

    def __init__(self, config: dict[str, Any], *, rngs: nnx.Rngs):
        dim, vocab = config["dim"], config["vocab"]
        kw = dtypes(config)
        self.scan = config["scan"]
        self.embed = nnx.Embed(vocab, dim, rngs=rngs, **kw)
        self.pos = nnx.Embed(config["seq"], dim, rngs=rngs, **kw)
        if self.scan:

            @nnx.split_rngs(splits=config["layers"])
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs: nnx.Rngs) -> Block:
                return Block(config, rngs=rngs)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config["layers"])])
        self.ln_f = nnx.LayerNorm(dim, rngs=rngs, **kw)
        tied = config["tie_embeddings"]
        self.head = None if tied else nnx.Linear(dim, vocab, use_bias=False, rngs=rngs, **kw)

    def __call__(self, tokens: Array, per_layer: PerLayer = identity_layer) -> Array:
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))[None]
        if self.scan:
            layer = per_layer(block_layer(nnx.graphdef(self.blocks)))
            run = nnx.scan(
                lambda block, x: layer(pure(block), x), in_axes=(0, nnx.Carry), out_axes=nnx.Carry
            )
            x = run(self.blocks, x)
        else:
            layer = per_layer(block_layer(nnx.graphdef(self.blocks[0])))
            for block in self.blocks:
                x = layer(pure(block), x)
        x = self.ln_f(x)
        return self.embed.attend(x) if self.head is None else self.head(x)


def gpt_param_count(config: dict[str, Any]) -> int:
    """Parameters of `GPT(config)`, by formula (the builder must not make arrays)."""
    d, v, hidden = config["dim"], config["vocab"], config["mlp_ratio"] * config["dim"]
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + hidden * d + d
    head = 0 if config["tie_embeddings"] else d * v
    return v * d + config["seq"] * d + config["layers"] * block + 2 * d + head


def gpt_activation_estimate(config: dict[str, Any]) -> int:
    """Rough bytes the backward pass needs from the forward, with nothing recomputed.

    Per block, with s*b*d = tokens x width and bf16 (2 bytes) tensors: ln1 in and out,
    q, k, v, attention out, ln2 in and out (8 x 2 sbd), the MLP hidden before and
    after gelu (2 x 2 x 4 sbd), f32 probabilities and their bf16 copy (6 heads s^2 b);
    plus the logits in bf16 and f32 and the f32 log-softmax (10 b s vocab).
    """
    s, b, d, h = config["seq"], config["batch"], config["dim"], config["heads"]
    hidden = config["mlp_ratio"] * d
    per_block = 2 * (8 * s * b * d + 2 * s * b * hidden) + 6 * h * s * s * b
    return config["layers"] * per_block + 10 * b * s * config["vocab"]


@functools.cache
def gpt_graphdef(frozen_config: tuple[tuple[str, Any], ...]) -> Any:
    """The graph definition of `GPT(config)`, from abstract arrays only."""
    config = dict(frozen_config)
    return nnx.graphdef(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))


def gpt(preset: str, scan: bool = False) -> Model:
    """A GPT-style decoder trained with optax adamw on random tokens."""
    arch = GPT_DEFAULTS | pick_preset(GPT_PRESETS, preset, "gpt") | {"scan": scan}
    frozen = tuple(sorted(arch.items()))
    config = dict(arch)
    params = gpt_param_count(config)
    param_bytes = params * jnp.dtype(config["param_dtype"]).itemsize
    adamw_args = ", ".join(f"{k}={v}" for k, v in ADAMW.items())
    config |= {
        "optimizer": f"adamw({adamw_args})",
        "params": params,
        "param_bytes": param_bytes,
        "params_grads_adamw_bytes": 4 * param_bytes,
        "activation_estimate_bytes": gpt_activation_estimate(config),
        "sizing": f"param count by formula; activation estimate is rough; {SIZED_BY_HAND}",
    }
    name = "gpt_scan" if scan else "gpt"

    @jax.jit  # one compile instead of one per eager op
    def init() -> tuple[dict[str, Any], dict[str, Array]]:
        model = GPT(config, rngs=nnx.Rngs(0))
        shape = (config["batch"], config["seq"] + 1)
        tokens = jax.random.randint(jax.random.PRNGKey(1), shape, 0, config["vocab"], jnp.int32)
        return pure(model), {"tokens": tokens}

    def loss_with(per_layer: PerLayer) -> Loss:
        def loss(params: dict[str, Any], batch: dict[str, Array]) -> Array:
            model = nnx.merge(gpt_graphdef(frozen), params)
            tokens = batch["tokens"]
            logits = model(tokens[:, :-1], per_layer).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
            return jnp.mean(ce)

        return loss

    return Model(name, preset, config, init, loss_with, optax.adamw(**ADAMW), offload_dots=True)


def gpt_scan(preset: str) -> Model:
    """`gpt` with its blocks stacked and run by `nnx.scan`."""
    return gpt(preset, scan=True)


MODELS: dict[str, Callable[[str], Model]] = {
    "mlp": mlp,
    "cnn": cnn,
    "gpt": gpt,
    "gpt_scan": gpt_scan,
}

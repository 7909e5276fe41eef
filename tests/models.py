"""Small models for the CPU tests: each returns (loss_fn, args)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Model = tuple[Callable[..., Any], tuple[Any, ...]]


def _keys(n: int, seed: int = 0) -> list[jax.Array]:
    return list(jax.random.split(jax.random.key(seed), n))


def mlp() -> Model:
    """Dict params, tanh layers, mean squared output."""
    k = _keys(4)
    params = {
        "w1": jax.random.normal(k[0], (32, 64)) * 0.2,
        "b1": jnp.zeros(64),
        "w2": jax.random.normal(k[1], (64, 64)) * 0.2,
        "w3": jax.random.normal(k[2], (64, 8)) * 0.2,
    }
    x = jax.random.normal(k[3], (16, 32))

    def loss(params, x):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        h = jnp.tanh(h @ params["w2"])
        return jnp.mean((h @ params["w3"]) ** 2)

    return loss, (params, x)


def stacked_mlp() -> Model:
    """The GPU_FINDINGS reference shape, tiny: stacked weights, Python loop."""
    k = _keys(2)
    w = jax.random.normal(k[0], (4, 64, 64)) * 0.15
    x = jax.random.normal(k[1], (32, 64))

    def loss(w, x):
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i])
        return jnp.mean(x**2)

    return loss, (w, x)


def max_pool(x: jax.Array) -> jax.Array:
    """3 x 3 windows, stride 2, NHWC, padded: the benchmarks' cnn's pool."""
    pads = ((0, 0), (0, 1), (0, 1), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pads)


def conv_pool() -> Model:
    """A stem as the benchmarks' cnn has one: bf16 convolution, relu, padded max pool,
    then a second convolution and relu."""
    k = _keys(3)
    ws = [jax.random.normal(k[0], (3, 3, 3, 8)) * 0.3, jax.random.normal(k[1], (3, 3, 8, 8)) * 0.3]
    x = jax.random.normal(k[2], (4, 16, 16, 3)).astype(jnp.bfloat16)

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w.astype(x.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def loss(ws, x):
        h = jax.nn.relu(conv(max_pool(jax.nn.relu(conv(x, ws[0]))), ws[1]))
        return jnp.mean(h.astype(jnp.float32) ** 2)

    return loss, (ws, x)


def cnn() -> Model:
    """Conv, relu, max-pool, dense head, int labels."""
    k = _keys(4)
    params = {
        "c1": jax.random.normal(k[0], (3, 3, 3, 8)) * 0.3,
        "c2": jax.random.normal(k[1], (3, 3, 8, 8)) * 0.3,
        "head": jax.random.normal(k[2], (8 * 4 * 4, 10)) * 0.1,
    }
    images = jax.random.normal(k[3], (4, 16, 16, 3))
    labels = jnp.arange(4, dtype=jnp.int32) % 10

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def pool(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def loss(params, images, labels):
        x = pool(jax.nn.relu(conv(images, params["c1"])))
        x = pool(jax.nn.relu(conv(x, params["c2"])))
        logits = x.reshape(x.shape[0], -1) @ params["head"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    return loss, (params, images, labels)


def attention() -> Model:
    """A bf16 pre-norm attention block with layernorm and softmax."""
    k = _keys(5)
    d, t = 32, 16
    bf = jnp.bfloat16
    params = {
        "qkv": (jax.random.normal(k[0], (d, 3 * d)) * 0.1).astype(bf),
        "out": (jax.random.normal(k[1], (d, d)) * 0.1).astype(bf),
        "scale": jnp.ones(d, bf),
        "mlp": (jax.random.normal(k[2], (d, 4 * d)) * 0.1).astype(bf),
        "mlp_out": (jax.random.normal(k[3], (4 * d, d)) * 0.1).astype(bf),
    }
    x = jax.random.normal(k[4], (2, t, d)).astype(bf)

    def layernorm(x, scale):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
        return ((x32 - mean) * lax.rsqrt(var + 1e-5)).astype(x.dtype) * scale

    def loss(params, x):
        h = layernorm(x, params["scale"])
        q, kk, v = jnp.split(h @ params["qkv"], 3, axis=-1)
        s = jnp.einsum("btd,bsd->bts", q, kk) / jnp.sqrt(jnp.asarray(d, bf))
        mask = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.where(mask, s, jnp.asarray(-1e4, bf))
        a = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(bf)
        x = x + jnp.einsum("bts,bsd->btd", a, v) @ params["out"]
        h = layernorm(x, params["scale"])
        x = x + jax.nn.gelu(h @ params["mlp"]) @ params["mlp_out"]
        return jnp.mean(x.astype(jnp.float32) ** 2)

    return loss, (params, x)


def scan_layers() -> Model:
    """Layers applied with lax.scan over stacked weights."""
    k = _keys(2)
    w = jax.random.normal(k[0], (5, 32, 32)) * 0.2
    x = jax.random.normal(k[1], (8, 32))

    def loss(w, x):
        def layer(h, wi):
            h = jnp.tanh(h @ wi)
            return h, None

        h, _ = lax.scan(layer, x, w)
        return jnp.sum(h**2)

    return loss, (w, x)


def control_flow() -> Model:
    """cond and fori_loop around dense layers."""
    k = _keys(3)
    w = jax.random.normal(k[0], (32, 32)) * 0.2
    v = jax.random.normal(k[1], (32, 32)) * 0.2
    x = jax.random.normal(k[2], (8, 32))

    def loss(w, v, x):
        h = jnp.tanh(x @ w)
        h = lax.cond(jnp.sum(h) > 0, lambda h: jnp.sin(h @ v), lambda h: jnp.cos(h @ v), h)
        h = lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w), h)
        return jnp.mean(h**2)

    return loss, (w, v, x)


def inner_jit_checkpoint() -> Model:
    """A loss with an inner jax.jit, a jax.checkpoint and a custom_jvp."""
    k = _keys(3)
    w = jax.random.normal(k[0], (32, 32)) * 0.2
    v = jax.random.normal(k[1], (32, 32)) * 0.2
    x = jax.random.normal(k[2], (8, 32))

    @jax.jit
    def block(h, w):
        return jnp.tanh(h @ w)

    @jax.checkpoint
    def remat_block(h, v):
        return jax.nn.gelu(h @ v)

    def loss(w, v, x):
        h = block(x, w)
        h = remat_block(h, v)
        h = jax.nn.softplus(h @ w)  # softplus uses a custom_jvp inside logaddexp
        return jnp.mean(h**2)

    return loss, (w, v, x)


MODELS: dict[str, Callable[[], Model]] = {
    "mlp": mlp,
    "stacked_mlp": stacked_mlp,
    "cnn": cnn,
    "attention": attention,
    "scan": scan_layers,
    "control_flow": control_flow,
    "inner_jit_checkpoint": inner_jit_checkpoint,
}

"""hetjax on models it was not written with: an equinox transformer, Hugging Face's GPT-2.

- `equinox`: six pre-norm blocks of `eqx.nn` layers (MultiheadAttention with a causal
  mask, LayerNorm, a GELU MLP), width 1024, 16 heads, 512 tokens, batch 16, bf16 weights
  and inputs; the loss is the mean square of the output.
- `gpt2`: `transformers`' `FlaxGPT2LMHeadModel`, 2 layers of GPT-2 small (768 wide, 12
  heads, the 50,257-token vocabulary, tied embeddings), randomly initialised (no weights
  are downloaded), bf16 weights and compute, 1024 tokens, batch 8; the loss is the
  next-token cross-entropy in f32.

Memory: the loss's value and gradient is compiled for the H200 (nothing runs), plain and
with each hetjax policy; each line gives the device temp, host temp and the step time that
`hetjax.simulate_step` predicts, and the warnings hetjax gave.

Numerics (`--numerics`): a small copy of the model (batch 2, 128 tokens) runs on this
machine's backend in f32 and in bf16: the relative L2 difference of hetjax's gradient
(`policy="all"`, every residual) from plain `jax.grad(loss)`, under `jax.jit` and op by op
(`jax.disable_jit`), beside plain's own difference between the two.

Usage (needs `pip install equinox "transformers<5"` beside `.[dev]`; no GPU):
    JAX_PLATFORMS=cpu python benchmarks/foreign_models.py gpt2 [--numerics | --variants all]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

import hetjax

Model = tuple[Callable[..., jax.Array], tuple[Any, ...]]  # loss, its arguments


def equinox_model(
    dtype: Any, batch: int, tokens: int, width: int = 1024, heads: int = 16, layers: int = 6
) -> Model:
    import equinox as eqx

    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        ln2: eqx.nn.LayerNorm
        mlp: eqx.nn.MLP

        def __init__(self, key: jax.Array) -> None:
            k1, k2 = jax.random.split(key)
            self.ln1 = eqx.nn.LayerNorm(width)
            self.ln2 = eqx.nn.LayerNorm(width)
            self.attn = eqx.nn.MultiheadAttention(heads, width, key=k1)
            self.mlp = eqx.nn.MLP(width, width, 4 * width, 1, activation=jax.nn.gelu, key=k2)

        def __call__(self, x: jax.Array) -> jax.Array:  # x: (tokens, width)
            h = jax.vmap(self.ln1)(x)
            mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
            x = x + self.attn(h, h, h, mask=mask)
            return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))

    blocks = [Block(k) for k in jax.random.split(jax.random.key(0), layers)]
    params, static = eqx.partition(blocks, eqx.is_array)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    x = jax.random.normal(jax.random.key(1), (batch, tokens, width), dtype)

    def loss(params: Any, x: jax.Array) -> jax.Array:
        model = eqx.combine(params, static)

        def one(x: jax.Array) -> jax.Array:
            for block in model:
                x = block(x)
            return x

        return jnp.mean(jax.vmap(one)(x).astype(jnp.float32) ** 2)

    return loss, (params, x)


def gpt2_model(
    dtype: Any, batch: int, tokens: int, width: int = 768, heads: int = 12, vocab: int = 50257
) -> Model:
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(
        n_layer=2, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=max(tokens, 1024)
    )
    model = FlaxGPT2LMHeadModel(config, dtype=dtype, seed=0)
    params = jax.tree.map(lambda a: a.astype(dtype), model.params)
    ids = jax.random.randint(jax.random.key(1), (batch, tokens), 0, config.vocab_size)

    def loss(params: Any, ids: jax.Array) -> jax.Array:
        logits = model(ids, params=params, train=False).logits[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    return loss, (params, ids)


MODELS = {"equinox": (equinox_model, 16, 512), "gpt2": (gpt2_model, 8, 1024)}


VARIANTS = ("all", "auto", "auto@0.8", "auto@0.6")


def memory(name: str, variants: tuple[str, ...] = VARIANTS) -> None:
    build, batch, tokens = MODELS[name]
    loss, args = build(jnp.bfloat16, batch, tokens)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)

    def compiled(f: Callable) -> tuple[int, int, float]:
        c = hetjax.compile_for(jax.value_and_grad(f), *abstract, target="h200")
        m, e = c.memory_analysis(), hetjax.simulate_step(c, "h200")
        return m.temp_size_in_bytes, m.host_temp_size_in_bytes, e.step_ms

    base = compiled(loss)
    print(f"{name} plain: temp {base[0] / 2**20:.0f} MiB, {base[2]:.1f} ms predicted")
    plain = hetjax.analyze(loss, *abstract, policy="none", target="h200")
    peak = plain.compiled.plain.peak_bytes
    for variant, options in [
        ("all", dict(policy="all")),
        ("auto", dict(policy="auto")),
        ("auto@0.8", dict(policy="auto", device_budget=0.8 * peak)),
        ("auto@0.6", dict(policy="auto", device_budget=0.6 * peak)),
    ]:
        if variant not in variants:
            continue
        start = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            temp, host, ms = compiled(hetjax.het_offload(loss, target="h200", **options))
        said = [
            str(w.message)[:120] for w in caught if issubclass(w.category, hetjax.HetjaxWarning)
        ]
        print(
            f"{variant}: temp {temp / 2**20:.0f} MiB ({temp / base[0]:.2f}x), "
            f"host {host / 2**20:.0f} MiB, {ms:.1f} ms ({ms / base[2]:.2f}x) predicted "
            f"[{time.time() - start:.0f} s] {said}",
            flush=True,
        )


def relative(a: Any, b: Any) -> float:
    """Relative L2 difference of two gradient trees, in f32."""
    a, b = (jax.tree.map(lambda t: t.astype(jnp.float32), t) for t in (a, b))
    return float(otu.tree_norm(otu.tree_sub(a, b)) / otu.tree_norm(b))


def numerics(name: str) -> None:
    build = MODELS[name][0]
    for dtype in (jnp.float32, jnp.bfloat16):
        loss, args = build(dtype, 2, 128)
        plain = jax.jit(jax.grad(loss))(*args)
        offloaded_loss = hetjax.het_offload(loss, policy="all", min_bytes=0)
        with jax.disable_jit():
            op_by_op = jax.grad(loss)(*args)
            offloaded_op_by_op = jax.grad(offloaded_loss)(*args)
        offloaded = jax.jit(jax.grad(offloaded_loss))(*args)

        def same(a: Any, b: Any) -> str:
            return (
                " (bitwise)"
                if jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
                else ""
            )

        print(
            f"{name} {jnp.dtype(dtype).name} on {jax.default_backend()}, jax {jax.__version__}: "
            f"hetjax all vs plain, jit {relative(offloaded, plain):.2g}{same(offloaded, plain)}, "
            f"op by op {relative(offloaded_op_by_op, op_by_op):.2g}"
            f"{same(offloaded_op_by_op, op_by_op)}; plain jit vs op by op "
            f"{relative(plain, op_by_op):.2g}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--numerics", action="store_true", help="gradients here, not memory")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=VARIANTS, help="memory: these only"
    )
    args = parser.parse_args()
    if args.numerics:
        numerics(args.model)
    else:
        memory(args.model, tuple(args.variants))


if __name__ == "__main__":
    main()

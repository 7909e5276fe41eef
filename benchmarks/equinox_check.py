"""hetjax on a model it was not written with: an equinox transformer.

Six pre-norm blocks of `eqx.nn` layers (MultiheadAttention with a causal mask, LayerNorm,
a GELU MLP), width 1024, 16 heads, 512 tokens, batch 16, bf16 weights and inputs. The
loss's value and gradient is compiled for the H200 (nothing runs), plain and with each
hetjax policy; each line gives the device temp, host temp and the step time that
`hetjax.simulate_step` predicts, and the warnings hetjax gave.

Usage (needs `pip install equinox` beside `.[dev]`; no GPU):
    JAX_PLATFORMS=cpu python benchmarks/equinox_check.py
"""

import functools
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp

import hetjax

D, H, T, B, L = 1024, 16, 512, 16, 6


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.ln1 = eqx.nn.LayerNorm(D)
        self.ln2 = eqx.nn.LayerNorm(D)
        self.attn = eqx.nn.MultiheadAttention(H, D, key=k1)
        self.mlp = eqx.nn.MLP(D, D, 4 * D, 1, activation=jax.nn.gelu, key=k2)

    def __call__(self, x):  # x: (T, D)
        h = jax.vmap(self.ln1)(x)
        mask = jnp.tril(jnp.ones((T, T), bool))
        x = x + self.attn(h, h, h, mask=mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))


def loss(params, x, static):
    model = eqx.combine(params, static)

    def one(x):
        for b in model:
            x = b(x)
        return x

    y = jax.vmap(one)(x)
    return jnp.mean(y.astype(jnp.float32) ** 2)


def main() -> None:
    blocks = [Block(k) for k in jax.random.split(jax.random.key(0), L)]
    params, static = eqx.partition(blocks, eqx.is_array)
    p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), params)
    x = jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16)
    plain_loss = functools.partial(loss, static=static)

    def compiled(f):
        c = hetjax.compile_for(jax.value_and_grad(f), p, x, target="h200")
        m, e = c.memory_analysis(), hetjax.simulate_step(c, "h200")
        return m.temp_size_in_bytes, m.host_temp_size_in_bytes, e.step_ms

    base = compiled(plain_loss)
    print(f"plain: temp {base[0] / 2**20:.0f} MiB, {base[2]:.1f} ms predicted")
    plain = hetjax.analyze(plain_loss, p, x, policy="none", target="h200")
    peak = plain.compiled.plain.peak_bytes
    for name, options in [
        ("all", dict(policy="all")),
        ("auto", dict(policy="auto")),
        ("auto@0.8", dict(policy="auto", device_budget=0.8 * peak)),
        ("auto@0.6", dict(policy="auto", device_budget=0.6 * peak)),
    ]:
        start = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            temp, host, ms = compiled(hetjax.het_offload(plain_loss, target="h200", **options))
        said = [
            str(w.message)[:120] for w in caught if issubclass(w.category, hetjax.HetjaxWarning)
        ]
        print(
            f"{name}: temp {temp / 2**20:.0f} MiB ({temp / base[0]:.2f}x), "
            f"host {host / 2**20:.0f} MiB, {ms:.1f} ms ({ms / base[2]:.2f}x) predicted "
            f"[{time.time() - start:.0f} s] {said}",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Flax NNX and linen wrappers of the k-WTA op."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kwta_jax import kwta
from kwta_jax.layers import KWTA, LinenKWTA, iter_kwta_layers, set_kwta_backward, set_kwta_ratio


class TinyNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(6, 20, rngs=rngs)
        self.act = KWTA(0.2)
        self.dense2 = nnx.Linear(20, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense2(self.act(self.dense1(x)))


def hidden_winners(model, x):
    return np.asarray((model.act(model.dense1(x)) != 0).sum(axis=1))


def test_nnx_layer_equals_the_op():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5))
    layer = KWTA(0.3, groups="channel", use_abs=True)
    np.testing.assert_array_equal(layer(x), kwta(x, ratio=0.3, groups="channel", use_abs=True))
    np.testing.assert_array_equal(KWTA(k=4)(x), kwta(x, k=4))


def test_ratio_annealing_keeps_model_and_optimizer_state():
    model = TinyNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 6))
    y = jnp.arange(8) % 3

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(3):
        train_step(model, optimizer, x, y)
    np.testing.assert_array_equal(hidden_winners(model, x), 4)  # int(0.2 * 20)
    params_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    opt_state_before = jax.tree.map(jnp.copy, nnx.state(optimizer))

    assert set_kwta_ratio(model, 0.1) == 1
    np.testing.assert_array_equal(hidden_winners(model, x), 2)  # the same model, fewer winners
    chex_equal = jax.tree.map(np.array_equal, params_before, nnx.state(model, nnx.Param))
    assert all(jax.tree.leaves(chex_equal)), "changing the ratio must not touch the parameters"
    same_opt = jax.tree.map(np.array_equal, opt_state_before, nnx.state(optimizer))
    assert all(jax.tree.leaves(same_opt)), "changing the ratio must not touch the optimizer"

    loss = train_step(model, optimizer, x, y)  # re-traces once, keeps training the same state
    assert np.isfinite(loss)
    assert int(optimizer.step[...]) == 4


def test_set_kwta_backward_builds_a_bpda_copy():
    model = TinyNet(nnx.Rngs(0))
    bpda = nnx.clone(model)
    assert set_kwta_backward(bpda, "identity") == 1
    assert model.act.backward == "exact" and bpda.act.backward == "identity"
    x = jax.random.normal(jax.random.key(2), (2, 6))
    np.testing.assert_array_equal(model(x), bpda(x))  # same forward pass
    grad_exact = jax.grad(lambda x: model(x).sum())(x)
    grad_bpda = jax.grad(lambda x: bpda(x).sum())(x)
    assert not np.allclose(grad_exact, grad_bpda)
    w1, w2 = model.dense1.kernel[...], model.dense2.kernel[...]
    expected = jnp.broadcast_to(w1 @ w2.sum(1), x.shape)  # identity backward: a linear map
    np.testing.assert_allclose(grad_bpda, expected, rtol=1e-5, atol=1e-6)  # sums cancel near 0


def test_iter_kwta_layers_finds_nested_layers():
    model = nnx.Sequential(TinyNet(nnx.Rngs(0)), KWTA(k=1))
    assert len(list(iter_kwta_layers(model))) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ratio=0.0), "ratio must be in"),
        (dict(), "exactly one"),
        (dict(ratio=0.1, backward="x"), "backward"),
    ],
)
def test_nnx_layer_validates_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KWTA(**kwargs)


def test_set_kwta_ratio_validates():
    with pytest.raises(ValueError, match="ratio must be in"):
        set_kwta_ratio(TinyNet(nnx.Rngs(0)), 1.2)


class LinenNet(nn.Module):
    ratio: float = 0.2

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(20)(x)
        x = LinenKWTA(ratio=self.ratio)(x)
        return nn.Dense(3)(x)


def test_linen_layer_and_ratio_change_reuse_params():
    x = jax.random.normal(jax.random.key(3), (5, 6))
    params = LinenNet().init(jax.random.key(4), x)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    out_02 = LinenNet(ratio=0.2).apply(params, x)
    out_01 = LinenNet(ratio=0.1).apply(params, x)  # same params, new ratio
    assert out_02.shape == out_01.shape == (5, 3)
    assert not np.allclose(out_02, out_01)
    grads = jax.grad(lambda p: LinenNet(ratio=0.1).apply(p, x).sum())(params)
    updates, opt_state = tx.update(grads, opt_state)  # the old optimizer state still fits
    assert jax.tree.structure(optax.apply_updates(params, updates)) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="ratio must be in"):
        LinenKWTA(ratio=2.0)


def test_linen_matches_op():
    x = jax.random.normal(jax.random.key(5), (3, 4, 4, 2))
    layer = LinenKWTA(k=3, groups="channel")
    np.testing.assert_array_equal(layer.apply({}, x), kwta(x, k=3, groups="channel"))


def test_partial_activation_in_linen():
    class Mlp(nn.Module):
        act: callable = jax.nn.relu

        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(self.act(nn.Dense(10)(x)))

    x = jnp.ones((2, 4))
    model = Mlp(act=functools.partial(kwta, ratio=0.3))
    params = model.init(jax.random.key(0), x)
    assert model.apply(params, x).shape == (2, 2)


def test_layer_accepts_an_int_axis_like_the_op():
    x = jnp.arange(10.0).reshape(2, 5)
    np.testing.assert_array_equal(KWTA(k=2, axes=1)(x), kwta(x, k=2, axes=1))


@pytest.mark.parametrize(
    "ratio,want", [(np.float32(0.7), 7), (np.float64(0.7), 7), (0.7, 7), (np.float32(0.3), 3)]
)
def test_layer_and_op_agree_on_numpy_ratios(ratio, want):
    """np.float32(0.7) is 0.699999988; both read it as 0.7 and keep 7 of 10."""
    x = jnp.arange(10.0)[None]
    assert int(jnp.sum(KWTA(ratio)(x) != 0)) == want
    assert int(jnp.sum(kwta(x, ratio=ratio) != 0)) == want

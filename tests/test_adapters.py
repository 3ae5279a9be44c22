"""Model adapters: NNX, linen and pure functions as `Model` (apply + params), the BPDA twin
of any library k-WTA inside, eval mode, and parameters passed to compiled attacks as arguments
rather than baked in as constants."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kwta_jax import evaluation, kwta
from kwta_jax.adapters import Model, as_model, from_apply, from_linen, from_logits_fn, from_nnx
from kwta_jax.backward import kwta_backward
from kwta_jax.layers import KWTA, LinenKWTA

X = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))


class NnxMLP(nnx.Module):
    def __init__(self, act, rngs, dropout=0.0, batchnorm=False):
        self.l1, self.act = nnx.Linear(64, 16, rngs=rngs), act
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs) if batchnorm else None
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        h = self.l1(x.reshape(x.shape[0], -1))
        if self.bn is not None:
            h = self.bn(h)
        return self.l2(self.drop(self.act(h)))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x.reshape(x.shape[0], -1))
        return nn.Dense(4)(LinenKWTA(ratio=0.25)(h))


def _apply(params, x):
    h = x.reshape(x.shape[0], -1) @ params["w1"]
    return kwta(h, ratio=0.25) @ params["w2"]


def _params():
    k1, k2 = jax.random.split(jax.random.key(1))
    return {"w1": jax.random.normal(k1, (64, 16)), "w2": jax.random.normal(k2, (16, 4))}


def _models():
    linen = LinenMLP()
    return {
        "nnx": from_nnx(NnxMLP(KWTA(0.25), nnx.Rngs(0))),
        "linen": from_linen(linen, linen.init(jax.random.key(0), X)),
        "apply": from_apply(_apply, _params()),
    }


@pytest.mark.parametrize("kind", ["nnx", "linen", "apply"])
def test_bpda_twin_same_forward_identity_backward(kind):
    model = _models()[kind]
    assert model.count_kwta(X) == 1
    twin = model.bpda("identity")
    assert twin.params is model.params  # shared: passed once to a compiled attack
    np.testing.assert_array_equal(twin.logits_fn()(X), model.logits_fn()(X))
    g = jax.grad(lambda v: model.logits_fn()(v).sum())(X)
    g_twin = jax.grad(lambda v: twin.logits_fn()(v).sum())(X)
    assert not np.allclose(g, g_twin)
    # The identity backward is the gradient of the model with k-WTA removed (pure apply).
    if kind == "apply":
        p = model.params
        g_lin = jax.grad(lambda v: (v.reshape(4, -1) @ p["w1"] @ p["w2"]).sum())(X)
        np.testing.assert_allclose(g_twin, g_lin, rtol=1e-5)


def test_a_model_without_kwta_has_no_kwta_and_its_twin_is_itself():
    model = from_nnx(NnxMLP(jax.nn.relu, nnx.Rngs(0)))
    assert model.count_kwta(X) == 0
    g = jax.grad(lambda v: model.logits_fn()(v).sum())(X)
    g_twin = jax.grad(lambda v: model.bpda().logits_fn()(v).sum())(X)
    np.testing.assert_array_equal(g, g_twin)


def test_the_scope_reaches_kwta_called_directly_and_explicit_layer_backwards_win():
    with kwta_backward("relu") as scope:
        y = jax.grad(lambda v: kwta(v, k=1).sum())(jnp.array([[-1.0, 2.0, 3.0]]))
    assert scope.calls == 1
    np.testing.assert_array_equal(y, [[0.0, 1.0, 1.0]])  # the ReLU surrogate's derivative
    with pytest.raises(ValueError, match="surrogate must be one of"):
        with kwta_backward("tanh"):
            pass


def test_from_nnx_puts_a_copy_in_eval_mode_and_refuses_custom_train_flags():
    net = NnxMLP(KWTA(0.25), nnx.Rngs(0), dropout=0.5, batchnorm=True)
    model = from_nnx(net)
    assert net.drop.deterministic is False  # the user's model is left as it was
    np.testing.assert_array_equal(model.logits_fn()(X), model.logits_fn()(X))

    class Custom(nnx.Module):
        def __init__(self):
            self.train = True
            self.l = nnx.Linear(64, 4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.l(x.reshape(x.shape[0], -1))

    with pytest.raises(ValueError, match=r"from_nnx: layers still in train mode .*train=True"):
        from_nnx(Custom())


def test_wrong_objects_get_the_adapter_to_use():
    with pytest.raises(TypeError, match="from_linen"):
        as_model(LinenMLP())
    with pytest.raises(TypeError, match="from_apply"):
        as_model(_apply)
    with pytest.raises(TypeError, match="flax.linen.Module"):
        from_linen(NnxMLP(jax.nn.relu, nnx.Rngs(0)), {})
    assert isinstance(as_model(NnxMLP(jax.nn.relu, nnx.Rngs(0))), Model)


def test_a_jitted_apply_is_unwrapped_so_the_twin_sees_the_scope():
    model = from_apply(jax.jit(_apply), _params())
    model.logits_fn()(X)  # a cached trace of the jitted function must not matter
    assert model.count_kwta(X) == 1


def test_params_are_jit_arguments_not_constants():
    # A 512x512 layer: captured in a closure, its 262,144 floats become program constants.
    big = jax.random.normal(jax.random.key(2), (512, 512))

    def apply(p, x):
        h = jnp.tanh(jnp.pad(x.reshape(x.shape[0], -1), ((0, 0), (0, 448))) @ p["big"])
        return h[:, :4]

    spec = evaluation.build_suite(["fgsm"])[0]
    y = jnp.zeros(4, jnp.int32)
    sizes = {}
    for name, model in (
        ("argument", from_apply(apply, {"big": big})),
        ("closure", from_logits_fn(functools.partial(apply, {"big": big}))),
    ):
        run, params = evaluation._bind(spec, evaluation.Models(model))
        sizes[name] = len(jax.jit(run).lower(params, X, y, jax.random.key(0), 0.1).as_text())
    assert sizes["argument"] < 100_000 < sizes["closure"], sizes

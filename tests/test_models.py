"""Models: shapes, where the k-WTA layers sit, train/eval modes, normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kwta_jax.layers import KWTA, iter_kwta_layers, set_kwta_backward, set_kwta_ratio
from kwta_jax.models import ACTIVATIONS, MODELS, BasicBlock, KWTAReLU, create_model


def _abstract(name, **kw):
    """Model with abstract leaves (no initialisation compute) for structural checks."""
    return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kw))


# Number of k-WTA layers per model with act="kwta" (kwta_scope="dense" unless "all").
KWTA_COUNT = {"mlp": 2, "cnn": 1, "cnn_deep": 1, "resnet18": 16}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_output_shape_and_kwta_layers(name, act):
    shape = (32, 32, 3) if name in ("resnet18", "cnn_deep") else (28, 28, 1)
    model = _abstract(name, act=act, ratio=0.2, num_classes=7, input_shape=shape)
    out = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((3, *shape), jnp.float32))
    assert out.shape == (3, 7) and out.dtype == jnp.float32
    layers = list(iter_kwta_layers(model))
    assert len(layers) == (0 if act == "relu" else KWTA_COUNT[name])
    assert all(isinstance(layer, KWTA) and layer.ratio == 0.2 for layer in layers)
    if act == "kwta_relu":
        assert any(isinstance(m, KWTAReLU) for _, m in nnx.iter_modules(model))


def test_cnn_kwta_scope_all_uses_conv_ratio_in_convs():
    model = _abstract("cnn", act="kwta", ratio=0.1, kwta_scope="all", conv_ratio=0.7,
                      groups="channel")  # fmt: skip
    assert [a.ratio for a in model.conv_acts] == [0.7] * 4
    assert all(a.groups == "channel" for a in model.conv_acts)
    assert isinstance(model.dense_act, KWTA) and model.dense_act.ratio == 0.1
    assert model.dense_act.groups == "sample"  # dense features always compete as a whole
    dense_only = _abstract("cnn", act="kwta", ratio=0.1)
    assert all(a is jax.nn.relu for a in dense_only.conv_acts)
    deep = _abstract("cnn_deep", act="kwta", kwta_scope="all", input_shape=(32, 32, 3))
    assert len(deep.convs) == 6 and len(list(iter_kwta_layers(deep))) == 7


def test_resnet18_kwta_after_batchnorm_and_residual_add_relu_stem():
    model = _abstract("resnet18", act="kwta", ratio=0.1, input_shape=(32, 32, 3))
    assert len(model.blocks) == 8
    for block in model.blocks:
        assert isinstance(block.act1, KWTA) and isinstance(block.act2, KWTA)
    assert not isinstance(getattr(model, "stem_act", None), KWTA)
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 11.0e6 < n_params < 11.3e6  # ResNet-18 for 10 classes: 11.17M


def test_set_kwta_ratio_and_backward_reach_every_layer():
    model = _abstract("cnn", act="kwta_relu", kwta_scope="all")
    assert set_kwta_ratio(model, 0.3) == 5
    assert {layer.ratio for layer in iter_kwta_layers(model)} == {0.3}
    assert set_kwta_backward(model, "identity") == 5


def _rngs():
    # RBG keys: XLA:CPU compiles their random ops ~4x faster than threefry (test time only).
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _make(name, **kw):
    """Initialised model (one jitted call: eager init compiles every initializer op)."""
    return nnx.jit(lambda: create_model(name, rngs=_rngs(), **kw))()


def _variant(model, name, **kw):
    """``model``'s parameters in the graph of ``create_model(name, **kw)`` (no new init)."""
    return nnx.merge(nnx.graphdef(_abstract(name, **kw)), nnx.state(model))


def _forward(model, x):
    return nnx.jit(lambda m, x: m(x))(model, x)


def test_mlp_forward_kwta_differs_from_relu_with_same_params():
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    relu = _make("mlp", act="relu")
    kwta = _variant(relu, "mlp", act="kwta", ratio=0.6)
    kw_relu = _variant(relu, "mlp", act="kwta_relu", ratio=0.6)
    y_relu, y_kwta, y_kr = _forward(relu, x), _forward(kwta, x), _forward(kw_relu, x)
    assert np.all(np.isfinite(y_kwta)) and not np.allclose(y_relu, y_kwta)
    # With 60% winners some winners are negative, which the trailing ReLU removes.
    assert not np.allclose(y_kwta, y_kr)
    # With ratio 1 every unit wins: k-WTA then ReLU is exactly ReLU.
    set_kwta_ratio(kw_relu, 1.0)
    np.testing.assert_allclose(_forward(kw_relu, x), y_relu, rtol=1e-6, atol=1e-6)


def test_normalisation_is_inside_the_model():
    x = jax.random.uniform(jax.random.key(2), (2, 28, 28, 1))
    plain = _make("mlp", act="relu")
    norm = _variant(plain, "mlp", act="relu", mean=[0.5], std=[0.25])
    np.testing.assert_allclose(
        _forward(norm, x), _forward(plain, (x - 0.5) / 0.25), rtol=1e-5, atol=1e-5
    )


def test_dropout_follows_train_and_eval_modes():
    model = _make("cnn", act="relu", input_shape=(8, 8, 1))
    x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 1))
    model.train()
    assert not np.allclose(_forward(model, x), _forward(model, x))  # fresh dropout masks
    model.eval()
    np.testing.assert_array_equal(_forward(model, x), _forward(model, x))


def test_batchnorm_follows_train_and_eval_modes():
    # One residual block of the ResNet (the whole network only adds compile time).
    block = nnx.jit(lambda: BasicBlock(3, 4, 2, act="kwta", ratio=0.5, groups="sample",
                                       rngs=_rngs()))()  # fmt: skip
    before = np.asarray(block.bn1.mean[...])
    x = jax.random.uniform(jax.random.key(4), (2, 8, 8, 3))
    block.eval()
    assert _forward(block, x).shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(block.bn1.mean[...], before)
    block.train()
    _forward(block, x)
    assert not np.allclose(block.bn1.mean[...], before)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        create_model("vgg", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        create_model("mlp", act="tanh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ratio"):
        _abstract("mlp", act="kwta", ratio=0.0)
    with pytest.raises(ValueError, match="kwta_scope"):
        _abstract("cnn", act="kwta", kwta_scope="convs")

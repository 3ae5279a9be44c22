"""`kwta_jax.robustness.evaluate` on a user's own models (NNX, linen, a pure function), none
written by train.py, and every pitfall a new user meets: a working call or one clear error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_attacks_adaptive import toy_data

from kwta_jax import kwta, robustness
from kwta_jax.adapters import from_apply, from_linen
from kwta_jax.layers import KWTA, LinenKWTA
from kwta_jax.results import EvalResult

X, Y, _ = toy_data(24, seed=3)  # [24, 8, 8, 1] in [0, 1], 4 classes
# Smoke-sized attacks, and no masking checks (tests/test_diagnostics.py covers them; here they
# would triple the compilations).
QUICK = dict(budget="quick", progress=False, log=None, diagnostics=False)


def _apply(params, x):
    h = kwta(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"], ratio=0.25)
    return h @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def params():
    """The pure-function k-WTA MLP, trained a little on the toy data."""
    x, y, _ = toy_data(256, seed=1)
    k1, k2 = jax.random.split(jax.random.key(0))
    p = {"w1": jax.random.normal(k1, (64, 32)) / 8, "b1": jnp.zeros(32),
         "w2": jax.random.normal(k2, (32, 4)) / 6, "b2": jnp.zeros(4)}  # fmt: skip
    tx = optax.adam(1e-2)
    state = tx.init(p)

    @jax.jit
    def step(p, state):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(_apply(p, x), y).mean()  # noqa: E731
        updates, state = tx.update(jax.grad(loss)(p), state)
        return optax.apply_updates(p, updates), state

    for _ in range(100):
        p, state = step(p, state)
    return p


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.act = nnx.Linear(64, 32, rngs=rngs), KWTA(0.25)
        self.l2 = nnx.Linear(32, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # left in train mode: from_nnx evals a copy

    def __call__(self, x):
        return self.l2(self.drop(self.act(self.l1(x.reshape(x.shape[0], -1)))))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(LinenKWTA(ratio=0.25)(nn.Dense(32)(x.reshape(x.shape[0], -1))))


def _check(res: EvalResult):
    assert res.mode == "cascade"
    assert list(res.pred) == ["apgd-ce", "apgd-t", "fab-t", "square", "bpda"]
    assert not res.skipped  # the BPDA twin was built automatically
    assert res.x_adv[0.3].shape == X.shape
    assert res.worst_accuracy(0.3) <= min(res.accuracy(a, 0.3) for a in res.pred)
    assert [c["status"] for c in res.preflight] == ["ok"] * 4


# The three ways in, each in a few lines of user code: AutoAttack's preset plus BPDA, cascade.
def test_nnx_model():
    model = NnxMLP(nnx.Rngs(0))
    res = robustness.evaluate(model, X, Y, eps=0.3, key=jax.random.key(0),
                              suite=["autoattack", "bpda"], **QUICK)  # fmt: skip
    _check(res)


def test_linen_model():
    module = LinenMLP()
    variables = module.init(jax.random.key(0), X)
    model = from_linen(module, variables)
    res = robustness.evaluate(model, X, Y, eps=0.3, key=jax.random.key(0),
                              suite=["autoattack", "bpda"], **QUICK)  # fmt: skip
    _check(res)


def test_pure_apply_function(params, tmp_path):
    res = robustness.evaluate(from_apply(_apply, params), X, Y, eps=0.3, key=jax.random.key(0),
                              suite=["autoattack", "bpda"], **QUICK)  # fmt: skip
    _check(res)
    assert res.clean_accuracy > 0.9  # trained: the attacks have something to break
    # Results a user can use: the breaking attack by name, save and load.
    names = res.breaking_attack(0.3)
    broken = ~res.worst_correct(0.3) & res.clean_correct
    assert set(names[broken]) <= set(res.pred) and all(
        n is None for n in names[res.worst_correct(0.3)]
    )
    # Each worst-case adversarial is in the ball and fools the model where an attack broke it.
    x_adv = res.x_adv[0.3]
    assert np.abs(x_adv - X).max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    pred = np.asarray(jnp.argmax(_apply(params, jnp.asarray(x_adv)), -1))
    np.testing.assert_array_equal(pred[broken] != Y[broken], True)
    path = res.save(tmp_path / "r.npz")
    back = EvalResult.load(path)
    assert back.to_dict() == res.to_dict()
    np.testing.assert_array_equal(back.x_adv[0.3], res.x_adv[0.3])
    np.testing.assert_array_equal(back.breaking_attack(0.3), names)


def test_same_key_same_result_and_an_int_seed_is_a_key(params):
    model = from_apply(_apply, params)
    a = robustness.evaluate(model, X, Y, eps=0.3, key=jax.random.key(7), suite="pgd", **QUICK)
    b = robustness.evaluate(model, X, Y, eps=0.3, key=7, suite="pgd", **QUICK)
    np.testing.assert_array_equal(a.pred["pgd"][0.3], b.pred["pgd"][0.3])
    with pytest.raises(TypeError, match="key: expected a PRNG key"):
        robustness.evaluate(model, X, Y, eps=0.3, key="zero", suite="pgd", **QUICK)


# ---------------------------------------------------------------------------------------------
# Pitfalls: each is a working call or one clear error naming the argument.
# ---------------------------------------------------------------------------------------------


def test_names_scalars_and_lists_are_accepted(params):
    model = from_apply(_apply, params)
    for suite in ("fgsm", ["fgsm"], ["fgsm", "pgd"]):
        res = robustness.evaluate(model, X, Y, eps=8 / 255, key=0, suite=suite, **QUICK)
        assert res.eps_values == [8 / 255]
        # A radius typed with fewer digits is found.
        assert res.accuracy("fgsm", 0.0313725) == res.accuracy("fgsm", 8 / 255)
    with pytest.raises(KeyError, match=r"eps=0.05 was not evaluated; radii: \[0.031"):
        res.accuracy("fgsm", 0.05)
    with pytest.raises(KeyError, match="attack 'square' did not run"):
        res.accuracy("square", 8 / 255)
    with pytest.raises(ValueError, match=r"unknown attack\(s\) \['fgsn'\]"):
        robustness.evaluate(model, X, Y, eps=0.1, key=0, suite=["fgsn"], **QUICK)
    with pytest.raises(ValueError, match="eps: values must be > 0"):
        robustness.evaluate(model, X, Y, eps=[0.1, -1], key=0, suite="fgsm", **QUICK)
    with pytest.raises(ValueError, match=r"attacks: \['fgsm'\] repeated"):
        robustness.evaluate(model, X, Y, eps=0.1, key=0, suite=["fgsm", "fgsm"], **QUICK)


def test_inputs_of_any_rank(params):
    flat = X.reshape(len(X), -1)  # [N, 64]
    model = from_apply(_apply, params)
    res = robustness.evaluate(model, flat, Y, eps=0.3, key=0, suite=["fgsm", "pgd", "square"],
                              **QUICK)  # fmt: skip
    image = robustness.evaluate(model, X, Y, eps=0.3, key=0, suite=["fgsm"], **QUICK)
    assert res.x_adv[0.3].shape == flat.shape
    np.testing.assert_array_equal(res.pred["fgsm"][0.3], image.pred["fgsm"][0.3])


def test_bounds_other_than_unit(params):
    model = from_apply(_apply, params)
    unit = robustness.evaluate(model, X, Y, eps=0.3, key=0, suite="fgsm", **QUICK)
    signed = from_apply(lambda p, x: _apply(p, (x + 1) / 2), params)
    res = robustness.evaluate(signed, 2 * X - 1, Y, eps=0.6, key=0, suite="fgsm",
                              bounds=(-1, 1), **QUICK)  # fmt: skip
    np.testing.assert_array_equal(res.pred["fgsm"][0.6], unit.pred["fgsm"][0.3])
    assert res.x_adv[0.6].min() >= -1 and np.abs(res.x_adv[0.6] - (2 * X - 1)).max() <= 0.6 + 1e-5
    with pytest.raises(ValueError, match=r"x: inputs must lie within bounds=\(0, 1\)"):
        robustness.evaluate(model, 2 * X - 1, Y, eps=0.1, key=0, suite="fgsm", **QUICK)
    with pytest.raises(ValueError, match="bounds: need finite low < high"):
        robustness.evaluate(model, X, Y, eps=0.1, key=0, suite="fgsm", bounds=(1, 0), **QUICK)


def test_softmax_outputs_are_reported(params):
    probs = from_apply(lambda p, x: jax.nn.softmax(_apply(p, x)), params)
    lines = []
    res = robustness.evaluate(probs, X, Y, eps=0.1, key=0, suite="fgsm", budget="quick",
                              progress=False, log=lines.append)  # fmt: skip
    assert any("look like probabilities" in line for line in lines)
    assert {c["name"]: c["status"] for c in res.preflight}["logits_not_probabilities"] == "warning"


def test_batch_dependent_models_are_refused(params):
    centred = from_apply(lambda p, x: _apply(p, x - x.mean(0, keepdims=True) + 0.5), params)
    with pytest.raises(robustness.PreflightError, match="change with the other examples"):
        robustness.evaluate(centred, X, Y, eps=0.1, key=0, suite="fgsm", **QUICK)


def test_labels_and_shapes_are_checked(params):
    model = from_apply(_apply, params)
    with pytest.raises(robustness.PreflightError, match=r"labels must lie in \[0, 4\)"):
        robustness.evaluate(model, X, Y + 4, eps=0.1, key=0, suite="fgsm", **QUICK)
    with pytest.raises(ValueError, match=r"y: expected \[N\] integer labels"):
        robustness.evaluate(model, X, Y[:3], eps=0.1, key=0, suite="fgsm", preflight=False,
                            **QUICK)  # fmt: skip

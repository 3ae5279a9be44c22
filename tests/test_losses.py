"""Attack losses against float64 NumPy references: values, gradients w.r.t. the logits and
w.r.t. the input through a small model, on ordinary and on confident logits (``p_y = 1 - 1e-9``,
where float32 rounds ``p_y`` to 1 and a ``log_softmax`` cross-entropy loses its true-class term).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kwta_jax import attacks

C = 10  # classes
B = 8  # examples


# --- float64 references ------------------------------------------------------------------------


def _others(z, y):
    """``z`` with the true class set to -inf: ``[B, C]`` float64."""
    return np.where(np.eye(z.shape[1], dtype=bool)[y], -np.inf, z)


def ref_cross_entropy(z, y):
    """``log(1 + sum_{j != y} exp(z_j - z_y))`` and its gradient ``p - e_y`` with ``1 - p_y``
    summed from the other classes (no cancellation)."""
    rows = np.arange(len(y))
    rel = _others(z, y) - z[rows, y][:, None]
    top = rel.max(1, keepdims=True)
    e = np.exp(rel - top)  # 0 at the true class
    s = e.sum(1)
    a = np.log(s) + top[:, 0]  # logsumexp over j != y
    value = np.logaddexp(0.0, a)
    p_others = e / s[:, None] * np.exp(a - value)[:, None]  # softmax(rel) * sigmoid(a)
    grad = p_others.copy()
    grad[rows, y] = -p_others.sum(1)
    return value, grad


def _onehot(idx, c):
    return np.eye(c)[idx]


def ref_margin(z, y):
    o = _others(z, y).argmax(1)
    rows = np.arange(len(y))
    return z[rows, o] - z[rows, y], _onehot(o, z.shape[1]) - _onehot(y, z.shape[1])


def _ratio(num, dnum, den, dden):
    return num / den, dnum / den[:, None] - (num / den**2)[:, None] * dden


def ref_dlr(z, y):
    m, dm = ref_margin(z, y)
    order = np.argsort(-z, axis=1)
    c = z.shape[1]
    den = (
        np.take_along_axis(z, order[:, :1], 1)[:, 0] - np.take_along_axis(z, order[:, 2:3], 1)[:, 0]
    )
    dden = _onehot(order[:, 0], c) - _onehot(order[:, 2], c)
    return _ratio(m, dm, den + 1e-12, dden)


def ref_dlr_targeted(z, y, t):
    rows, c = np.arange(len(y)), z.shape[1]
    num = z[rows, t] - z[rows, y]
    dnum = _onehot(t, c) - _onehot(y, c)
    order = np.argsort(-z, axis=1)
    zs = np.take_along_axis(z, order, 1)
    den = zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3])
    dden = _onehot(order[:, 0], c) - 0.5 * (_onehot(order[:, 2], c) + _onehot(order[:, 3], c))
    return _ratio(num, dnum, den + 1e-12, dden)


def targets_of(y):
    return (np.asarray(y) + 3) % C


LOSSES = {
    # name: (float32 loss (logits, y) -> [B], float64 reference (z, y) -> (value, grad))
    "ce": (attacks.cross_entropy, ref_cross_entropy),
    "margin": (attacks.margin, ref_margin),
    "dlr": (attacks.dlr, ref_dlr),
    "dlr_targeted": (
        lambda z, y: attacks.dlr_targeted(z, y, jnp.asarray(targets_of(y), jnp.int32)),
        lambda z, y: ref_dlr_targeted(z, y, targets_of(y)),
    ),
}


# --- logits ------------------------------------------------------------------------------------


def ordinary_logits(seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(B, C)) * scale).astype(np.float32)
    return z, np.asarray(rng.integers(0, C, B), np.int32)  # some correct, some not


def confident_logits(seed=0, one_minus_p=1e-9):
    """Correct, with ``1 - p_y = one_minus_p`` (to float32 rounding of the logits): the other
    logits are spread around ``log(one_minus_p / (C - 1))`` below ``z_y``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, B)
    rel = rng.normal(size=(B, C)) * 1.5
    rel = np.where(np.eye(C, dtype=bool)[y], -np.inf, rel)
    shift = np.log(one_minus_p) - np.log(np.exp(rel).sum(1, keepdims=True))
    z_y = rng.normal(size=(B, 1)) * 3
    z = np.where(np.eye(C, dtype=bool)[y], z_y, z_y + rel + shift)
    return z.astype(np.float32), y.astype(np.int32)


def test_the_confident_logits_are_what_they_claim():
    z, y = confident_logits()
    _, grad = ref_cross_entropy(z.astype(np.float64), y)
    np.testing.assert_allclose(-grad[np.arange(B), y], 1e-9, rtol=1e-3)
    # ... and float32 log_softmax rounds p_y to 1: the true-class derivative is lost there.
    naive = jax.grad(lambda v: -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(v), y[:, None], 1)))
    assert np.all(np.asarray(naive(jnp.asarray(z)))[np.arange(B), y] == 0.0)


# --- values and gradients w.r.t. the logits ----------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kind", ["ordinary", "confident"])
def test_loss_value_and_logit_gradient_match_float64(name, kind):
    fn, ref = LOSSES[name]
    z, y = (ordinary_logits if kind == "ordinary" else confident_logits)(seed=1)
    value, grad = jax.value_and_grad(lambda v: fn(v, jnp.asarray(y)).sum())(jnp.asarray(z))
    want_value, want_grad = ref(z.astype(np.float64), y)
    per_example = np.asarray(fn(jnp.asarray(z), jnp.asarray(y)), np.float64)
    assert per_example.dtype == np.float64 and per_example.shape == (B,)
    np.testing.assert_allclose(per_example, want_value, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(float(value), want_value.sum(), rtol=1e-5)
    # Every entry to float32 precision relative to its row: the 1e-9-sized true-class term of a
    # confident cross-entropy included. (A DLR row can be ~0: with the true class third and the
    # best other first, DLR is 1 - 1e-12 / (z_1 - z_3), whose 1e-12 float32 cannot resolve.)
    row = np.abs(want_grad).max(1, keepdims=True)
    scale = np.maximum(row, 1e-3 * row.max())
    err = np.abs(np.asarray(grad, np.float64) - want_grad)
    assert np.all(err <= 1e-5 * scale), err / scale


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    log10_one_minus_p=st.floats(-30.0, -0.01),
    classes=st.integers(4, 12),
)
def test_cross_entropy_matches_float64_from_uncertain_to_saturated(
    seed, log10_one_minus_p, classes
):
    # One example per draw, ``sum_{j != y} exp(z_j - z_y)`` from ~1 (p_y ~ 0.5) down to 1e-30
    # (the true-class derivative is then 1e-30: far below float32's epsilon, still normal).
    rng = np.random.default_rng(seed)
    y = np.asarray([rng.integers(0, classes)])
    rel = np.where(np.eye(classes, dtype=bool)[y], -np.inf, rng.normal(size=(1, classes)))
    rel = rel + log10_one_minus_p * np.log(10) - np.log(np.exp(rel).sum(1, keepdims=True))
    z = np.where(np.eye(classes, dtype=bool)[y], 0.0, rel).astype(np.float32)
    value, grad = jax.value_and_grad(lambda v: attacks.cross_entropy(v, jnp.asarray(y)).sum())(
        jnp.asarray(z)
    )
    want_value, want_grad = ref_cross_entropy(z.astype(np.float64), y)
    np.testing.assert_allclose(float(value), want_value[0], rtol=2e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=2e-4, atol=0)


# --- gradients w.r.t. the input through a small model -----------------------------------------

D, H = 16, 32


def small_model(logit_scale, seed=0):
    """``x [B, 4, 4, 1] -> W2 tanh(W1 x + b1) * logit_scale``: float32 for JAX, float64 for the
    reference (forward and backward by hand)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(D, H)) / np.sqrt(D)
    b1 = rng.normal(size=H) * 0.1
    w2 = rng.normal(size=(H, C)) / np.sqrt(H)
    w1f, b1f, w2f = (jnp.asarray(a, jnp.float32) for a in (w1, b1, w2))
    w1, b1, w2 = (np.asarray(a, np.float32).astype(np.float64) for a in (w1, b1, w2))

    def f32(x):
        return (jnp.tanh(x.reshape(x.shape[0], -1) @ w1f + b1f) @ w2f) * logit_scale

    def f64_and_vjp(x):
        h = np.tanh(x.reshape(x.shape[0], -1) @ w1 + b1)
        z = h @ w2 * logit_scale

        def vjp(dz):  # [B, C] -> [B, D]
            return (((dz * logit_scale) @ w2.T) * (1 - h**2)) @ w1.T

        return z, vjp

    return f32, f64_and_vjp


def inputs(n=B, seed=3):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.3, 0.7, size=(n, 4, 4, 1)).astype(np.float32)


def confident_model():
    """The model at a scale where ``B`` inputs are correct (label = argmax) with ``1 - p_y``
    between 1e-18 and 6e-8: float32 rounds ``p_y`` to 1, the true-class term is a normal float."""
    x = inputs(200)
    _, f64 = small_model(1.0)
    z, _ = f64(x.astype(np.float64))
    srt = np.sort(z, 1)
    gap = srt[:, -1] - srt[:, -2]
    scale = 20.0 / np.median(gap)
    keep = np.flatnonzero((gap * scale > 17.0) & (gap * scale < 38.0))[:B]
    f32, f64 = small_model(scale)
    x = x[keep]
    z, _ = f64(x.astype(np.float64))
    y = z.argmax(1).astype(np.int32)
    _, g = ref_cross_entropy(z, y)
    one_minus_p = -g[np.arange(B), y]
    assert len(keep) == B and np.all(one_minus_p < 6e-8) and np.all(one_minus_p > 1e-18)
    return f32, f64, x, y


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kind", ["ordinary", "confident"])
def test_input_gradient_through_a_model_matches_float64(name, kind):
    fn, ref = LOSSES[name]
    if kind == "confident":
        f32, f64, x, y = confident_model()
    else:
        f32, f64 = small_model(3.0)
        x = inputs()
        y = np.arange(B, dtype=np.int32) % C
    loss, grad, logits = attacks.losses.loss_and_grad(f32, fn, jnp.asarray(x), jnp.asarray(y))
    z, vjp = f64(x.astype(np.float64))
    want_value, dz = ref(z, y)
    want = vjp(dz)
    got = np.asarray(grad, np.float64).reshape(B, D)
    np.testing.assert_allclose(np.asarray(loss, np.float64), want_value, rtol=1e-4)
    # Per example: relative error of the gradient vector, and every clearly nonzero pixel's sign
    # (relative to the batch for a row that is ~0: a saturated DLR, see above).
    norm = np.linalg.norm(want, axis=1)
    err = np.linalg.norm(got - want, axis=1) / np.maximum(norm, 1e-3 * norm.max())
    assert err.max() < 1e-3, err
    clear = np.abs(want) > 1e-3 * np.maximum(norm, 1e-3 * norm.max())[:, None]
    np.testing.assert_array_equal(np.sign(got)[clear], np.sign(want)[clear])


def test_fgsm_direction_is_the_float64_gradient_sign_on_confident_inputs():
    f32, f64, x, y = confident_model()
    eps = 0.05  # inputs in [0.3, 0.7]: the box never binds
    x_adv = jax.jit(functools.partial(attacks.fgsm, f32, eps=eps))(jnp.asarray(x), jnp.asarray(y))
    step = (np.asarray(x_adv, np.float64) - x).reshape(B, D)
    z, vjp = f64(x.astype(np.float64))
    want = vjp(ref_cross_entropy(z, y)[1])
    clear = np.abs(want) > 1e-3 * np.abs(want).max(1, keepdims=True)
    np.testing.assert_array_equal(np.sign(step)[clear], np.sign(want)[clear])
    np.testing.assert_allclose(np.abs(step)[clear], eps, rtol=1e-5)

    # What the float32 log_softmax cross-entropy did on the same inputs: wrong signs.
    def naive(v):
        logp = jax.nn.log_softmax(f32(v))
        return -jnp.take_along_axis(logp, jnp.asarray(y)[:, None], 1).sum()

    old = np.sign(np.asarray(jax.grad(naive)(jnp.asarray(x)))).reshape(B, D)
    assert np.mean(old[clear] != np.sign(want)[clear]) > 0.1

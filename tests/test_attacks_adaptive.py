"""Adaptive attacks, APGD, Square, DeepFool, CW on small models, including a deliberately
gradient-masked one (a step function before a linear classifier).

The toy models live here and are reused by tests/test_diagnostics.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kwta_jax import attacks
from kwta_jax.attacks import projections

H, W, C, CLASSES = 8, 8, 1, 4


def toy_data(n, seed=0):
    """Images ``[n, 8, 8, 1]`` near one of 4 binary prototypes: pixels 0.2 / 0.8 +- 0.05."""
    rng = np.random.default_rng(1234)
    protos = rng.integers(0, 2, size=(CLASSES, H * W))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    x = np.where(protos[y] == 1, 0.8, 0.2) + rng.uniform(-0.05, 0.05, size=(n, H * W))
    return x.reshape(n, H, W, C).astype(np.float32), y.astype(np.int32), protos


def masked_model(bpda=False):
    """Step function (binarise at 0.5) then template matching: the input gradient is exactly
    zero everywhere. ``bpda=True``: same forward, identity on the backward pass."""
    _, _, protos = toy_data(1)
    templates = jnp.asarray(2.0 * protos - 1.0, jnp.float32).T  # [64, 4]

    def logits_fn(x):
        v = x.reshape(x.shape[0], -1)
        h = (v > 0.5).astype(v.dtype)
        if bpda:
            h = v + jax.lax.stop_gradient(h - v)
        return (2.0 * h - 1.0) @ templates / 4.0

    return logits_fn


@functools.cache
def relu_model():
    """A small ReLU MLP trained (full batch Adam) on the toy data: smooth, masks nothing."""
    x, y, _ = toy_data(512, seed=1)
    key = jax.random.key(0)
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, (H * W, 32)) / 8.0,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, CLASSES)) / 6.0,
        "b2": jnp.zeros(CLASSES),
    }

    def apply(p, x_):
        h = jax.nn.relu(x_.reshape(x_.shape[0], -1) @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]

    opt = optax.adam(1e-2)

    @jax.jit
    def train(p):
        def step(carry, _):
            p, s = carry
            g = jax.grad(lambda q: attacks.cross_entropy(apply(q, x), y).mean())(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, opt.init(p)), None, length=200)[0][0]

    params = train(params)
    return functools.partial(apply, params)


def accuracy(f, x, y):
    return float(np.mean(np.asarray(jnp.argmax(f(x), -1)) == np.asarray(y)))


EPS = 0.4  # every pixel can cross the 0.5 threshold, but a random start rarely flips many


@pytest.fixture(scope="module")
def toy():
    x, y, _ = toy_data(64, seed=2)
    return jnp.asarray(x), jnp.asarray(y)


def test_masked_model_has_zero_gradient_and_pgd_fails(toy):
    x, y = toy
    f = masked_model()
    assert accuracy(f, x, y) == 1.0
    _, g, _ = attacks.losses.loss_and_grad(f, attacks.margin, x, y)
    assert float(jnp.abs(g).max()) == 0.0
    key = jax.random.key(0)
    assert accuracy(f, attacks.fgsm(f, x, y, eps=EPS), y) == 1.0
    assert accuracy(f, attacks.pgd(f, x, y, key, eps=EPS, steps=10), y) >= 0.9
    assert accuracy(f, attacks.apgd(f, x, y, key, eps=EPS, steps=10), y) >= 0.9


def test_bpda_gradient_free_and_square_break_the_masked_model(toy):
    x, y = toy
    f, f_bpda = masked_model(), masked_model(bpda=True)
    key = jax.random.key(0)
    runs = {
        "bpda": attacks.bpda(f, x, y, key, eps=EPS, bpda_logits_fn=f_bpda, steps=10),
        "gradient_free": attacks.gradient_free(
            f, x, y, key, eps=EPS, samples=32, sigma=0.3, steps=10
        ),
        "square": attacks.square(f, x, y, key, eps=EPS, queries=100),
    }
    for name, x_adv in runs.items():
        projections.check_threat_model(x_adv, x, EPS, "linf", name=name)
        assert accuracy(f, x_adv, y) <= 0.1, name


def test_transfer_from_smooth_surrogate_breaks_masked_model(toy):
    x, y = toy
    f = masked_model()
    x_adv = attacks.transfer(
        f, x, y, jax.random.key(0), eps=EPS, source_logits_fn=relu_model(), steps=10
    )
    projections.check_threat_model(x_adv, x, EPS, "linf")
    assert accuracy(f, x_adv, y) <= 0.2


def test_eot_smooths_the_step_function(toy):
    # With noise of the scale of the distance to the threshold, the averaged gradient of the
    # step model is informative even though each sample's gradient is zero... for the
    # straight-through BPDA copy; on the raw step model EOT of zero gradients stays zero.
    x, y = toy
    f = masked_model()
    x_adv = attacks.eot_pgd(f, x, y, jax.random.key(0), eps=EPS, samples=4, sigma=0.3, steps=5)
    assert accuracy(f, x_adv, y) >= 0.9  # zero-gradient samples average to zero
    projections.check_threat_model(x_adv, x, EPS, "linf")


def test_apgd_dlr_square_deepfool_cw_on_relu_model():
    x, y, _ = toy_data(64, seed=3)
    x, y = jnp.asarray(x), jnp.asarray(y)
    f = relu_model()
    assert accuracy(f, x, y) >= 0.95
    key = jax.random.key(0)
    eps = 0.3  # prototypes are ~32 pixels apart: below ~0.3 the toy ReLU model is robust
    pgd_acc = accuracy(f, attacks.pgd(f, x, y, key, eps=eps, steps=20), y)
    out = {
        "apgd-ce": attacks.apgd(f, x, y, key, eps=eps, steps=20),
        "apgd-dlr": attacks.apgd(f, x, y, key, eps=eps, steps=20, loss="dlr"),
        "square": attacks.square(f, x, y, key, eps=eps, queries=200),
        "deepfool": attacks.deepfool(f, x, y, eps=eps, norm="linf", steps=20),
        "cw-pgd": attacks.cw_pgd(f, x, y, key, eps=eps, steps=20),
    }
    for name, x_adv in out.items():
        projections.check_threat_model(x_adv, x, eps, "linf", name=name)
        # Each attack is a real attack: gradient ones break nearly everything; Square with
        # only 200 queries at least half.
        assert accuracy(f, x_adv, y) <= (0.6 if name == "square" else 0.05), name
    # APGD should be at least as strong as PGD with the same budget (up to one example).
    assert accuracy(f, out["apgd-ce"], y) <= pgd_acc + 1 / 64
    x_l2 = attacks.cw_l2(f, x, y, eps=2.0, steps=100, c=10.0, learning_rate=0.05)
    projections.check_threat_model(x_l2, x, 2.0, "l2")
    assert accuracy(f, x_l2, y) < 0.5


def test_deepfool_l2_on_binary_linear_is_the_exact_minimal_perturbation():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(H * W, 2)), jnp.float32)
    f = lambda x: x.reshape(x.shape[0], -1) @ w
    x = jnp.asarray(rng.uniform(0.4, 0.6, size=(16, H, W, C)), jnp.float32)
    y = jnp.argmax(f(x), -1)
    x_adv = attacks.deepfool(f, x, y, eps=10.0, steps=5, overshoot=0.0, norm="l2")
    logits = np.asarray(f(x))
    wd = np.asarray(w[:, 0] - w[:, 1])
    dist = np.abs(logits[:, 0] - logits[:, 1]) / np.linalg.norm(wd)
    got = np.asarray(attacks.lp_norm(x_adv - x, "l2"))
    np.testing.assert_allclose(got, dist, rtol=1e-3, atol=1e-4)  # + the 1e-4 overshoot
    assert np.all(np.asarray(jnp.argmax(f(x_adv), -1)) != np.asarray(y))
    # Within a smaller ball DeepFool's point is projected and the prediction survives.
    small = attacks.deepfool(f, x, y, eps=float(dist.min()) / 2, steps=5, norm="l2")
    assert np.all(np.asarray(jnp.argmax(f(small), -1)) == np.asarray(y))


def test_square_is_deterministic_and_stops_on_success(toy):
    x, y = toy
    f = relu_model()
    run = jax.jit(functools.partial(attacks.square, f, eps=0.3, queries=50))
    a, b = run(x, y, jax.random.key(1)), run(x, y, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="linf"):
        attacks.square(f, x, y, jax.random.key(0), eps=0.3, norm="l2")


def test_square_restarts_keep_the_first_success_and_break_at_least_as_many(toy):
    x, y = toy
    f = masked_model()
    key = jax.random.key(2)
    run = functools.partial(attacks.square, f, x, y, eps=EPS, queries=2)
    broken = lambda xa: np.asarray(jnp.argmax(f(xa), -1)) != np.asarray(y)
    three = run(key, restarts=3)
    singles = [run(jax.random.fold_in(key, r)) for r in range(3)]
    hits = np.stack([broken(s) for s in singles])
    np.testing.assert_array_equal(broken(three), hits.any(0))
    assert hits.any(0).sum() > hits[0].sum()  # the later runs add examples
    # Each example keeps the first run that broke it (else the last run's point).
    first = np.where(hits.any(0), hits.argmax(0), 2)
    want = np.stack([np.asarray(s) for s in singles])[first, np.arange(len(first))]
    np.testing.assert_array_equal(np.asarray(three), want)
    assert float(jnp.abs(three - x).max()) <= EPS + 1e-6
    with pytest.raises(ValueError, match="restarts"):
        run(key, restarts=0)


def test_apgd_checkpoints_follow_the_paper_schedule():
    is_ck, window = attacks.apgd.__globals__["apgd_checkpoints"](100)
    where = np.flatnonzero(is_ck)
    # p_1 = 0.22, then windows shrink by 0.03 down to 0.06 of the budget.
    assert list(where[:4] + 1) == [22, 41, 57, 70]
    assert list(window[where][:4]) == [22, 19, 16, 13] and window[where].min() == 6

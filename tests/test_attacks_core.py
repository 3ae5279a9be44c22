"""FGSM / PGD / MIM: exact values on linear models, threat-model invariants, determinism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kwta_jax import attacks
from kwta_jax.attacks import projections

SHAPE = (4, 4, 1)  # tiny H, W, C
D = int(np.prod(SHAPE))


def linear_model(num_classes, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(D, num_classes)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(num_classes,)) * 0.1, jnp.float32)
    return (lambda x: x.reshape(x.shape[0], -1) @ w + b), w, b


def images(n, seed=0, lo=0.0, hi=1.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(lo, hi, size=(n, *SHAPE)), jnp.float32)


def test_fgsm_equals_signed_gradient_step_clipped():
    f, _, _ = linear_model(5)
    x = images(16)
    y = jnp.arange(16) % 5
    eps = 0.1
    grad = jax.grad(lambda x_: attacks.cross_entropy(f(x_), y).sum())(x)
    expected = np.clip(np.asarray(x) + eps * np.sign(np.asarray(grad)), 0.0, 1.0)
    got = jax.jit(functools.partial(attacks.fgsm, f, eps=eps))(x, y)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)
    # Not a no-op: some pixels moved by eps, some hit the box.
    moved = np.abs(np.asarray(got) - np.asarray(x))
    assert np.isclose(moved.max(), eps, atol=1e-6) and (expected == 0.0).any()


def test_fgm_l2_has_norm_eps_inside_box():
    f, _, _ = linear_model(3)
    x = images(8, lo=0.3, hi=0.7)
    y = jnp.zeros(8, jnp.int32)
    x_adv = attacks.fgm_l2(f, x, y, eps=0.5)
    np.testing.assert_allclose(np.asarray(attacks.lp_norm(x_adv - x, "l2")), 0.5, rtol=1e-5)


@pytest.mark.parametrize("norm, dual", [("linf", 1), ("l2", 2)])
def test_pgd_reaches_analytic_worst_case_binary_linear(norm, dual):
    f, w, b = linear_model(2)
    x = images(32, lo=0.35, hi=0.65)  # far enough from the box that it never binds
    y = jnp.asarray(np.arange(32) % 2, jnp.int32)
    eps = 0.05 if norm == "linf" else 0.3
    x_adv = jax.jit(
        functools.partial(attacks.pgd, f, eps=eps, steps=60, step_size=eps / 4, norm=norm)
    )(x, y, jax.random.key(0))
    w = np.asarray(w)
    wd = w[:, 0] - w[:, 1]
    sign = np.where(np.asarray(y) == 0, 1.0, -1.0)
    margin_clean = sign * (np.asarray(f(x))[:, 0] - np.asarray(f(x))[:, 1])
    margin_adv = sign * (np.asarray(f(x_adv))[:, 0] - np.asarray(f(x_adv))[:, 1])
    expected = margin_clean - eps * np.linalg.norm(wd, ord=dual)
    np.testing.assert_allclose(margin_adv, expected, atol=1e-4)


def test_pgd_multiclass_linear_never_beats_and_mostly_reaches_the_bound():
    f, w, _ = linear_model(4, seed=1)
    x = images(64, seed=1, lo=0.3, hi=0.7)
    logits = np.asarray(f(x))
    y = jnp.asarray(logits.argmax(-1), jnp.int32)
    eps = 0.03
    x_adv = attacks.pgd(f, x, y, jax.random.key(1), eps=eps, steps=30, loss="margin", restarts=3)
    w = np.asarray(w)
    yy = np.asarray(y)
    # Analytic worst-case margin z_y - z_j over the ball: min_j (z_y - z_j - eps ||w_y - w_j||_1).
    bound = np.full(64, np.inf)
    for j in range(4):
        gap = logits[np.arange(64), yy] - logits[:, j] - eps * np.abs(w[:, yy].T - w[:, j]).sum(-1)
        bound = np.where(yy == j, bound, np.minimum(bound, gap))
    adv = np.asarray(f(x_adv))
    others = np.where(np.eye(4, dtype=bool)[yy], -np.inf, adv)
    got = adv[np.arange(64), yy] - others.max(-1)
    assert np.all(got >= bound - 1e-4)
    assert np.mean(np.abs(got - bound) < 1e-3) > 0.9


_INVARIANT_ATTACKS = {
    "fgsm": functools.partial(attacks.fgsm),
    "pgd": functools.partial(attacks.pgd, steps=3, restarts=2),
    "mim": functools.partial(attacks.mim, steps=3),
    "pgd_margin_cosine": functools.partial(attacks.pgd, steps=3, loss="margin", schedule="cosine"),
}


@functools.cache
def _jitted_attack(name, norm):
    # eps and the model weights are traced arguments, so hypothesis examples reuse one compile.
    def run(w, b, x, y, key, eps):
        f = lambda x_: x_.reshape(x_.shape[0], -1) @ w + b
        return _INVARIANT_ATTACKS[name](f, x, y, key, eps=eps, norm=norm)

    return jax.jit(run)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    eps=st.floats(1e-3, 2.0),
    norm=st.sampled_from(["linf", "l2"]),
    attack=st.sampled_from(sorted(_INVARIANT_ATTACKS)),
)
def test_invariants_ball_box_over_random_inputs(seed, eps, norm, attack):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(D, 3)) * rng.uniform(0.1, 100), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    x = images(6, seed=seed)
    y = jnp.asarray(np.arange(6) % 3, jnp.int32)
    x_adv = _jitted_attack(attack, norm)(w, b, x, y, jax.random.key(seed), eps)
    projections.check_threat_model(x_adv, x, eps, norm)  # raises on violation
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype


def test_check_threat_model_rejects_violations():
    x = images(3)
    with pytest.raises(projections.AttackInvariantError, match="outside the linf ball"):
        projections.check_threat_model(jnp.clip(x + 0.2, 0, 1), x, 0.1, "linf")
    with pytest.raises(projections.AttackInvariantError, match="outside \\[0, 1\\]"):
        projections.check_threat_model(x.at[0, 0, 0, 0].set(-0.05), x, 1.0, "linf")
    # No example (a cascade radius where nothing was left to attack) is valid, not an error.
    none = np.zeros((0, 28, 28, 1), np.float32)
    assert projections.threat_model_violations(none, none, 0.1, "l2") == dict(
        ball=0, box=0, finite=0
    )
    projections.check_threat_model(none, none, 0.1, "linf")


def test_pgd_is_deterministic_for_a_key_and_depends_on_it():
    f, _, _ = linear_model(3)
    x = images(8)
    y = jnp.zeros(8, jnp.int32)
    run = jax.jit(functools.partial(attacks.pgd, f, eps=0.1, steps=2, step_size=0.01))
    a, b = run(x, y, jax.random.key(3)), run(x, y, jax.random.key(3))
    c = run(x, y, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_pgd_keeps_best_iterate_over_restarts():
    # With a huge cosine-free step, iterates bounce between corners; the returned point must be
    # at least as adversarial as every restart's final point (here: a misclassified one).
    f, _, _ = linear_model(2)
    x = images(16, lo=0.4, hi=0.6)
    y = jnp.asarray(np.asarray(f(x)).argmax(-1), jnp.int32)
    x_adv = attacks.pgd(f, x, y, jax.random.key(0), eps=0.5, steps=5, restarts=2)
    assert np.mean(np.asarray(f(x_adv)).argmax(-1) != np.asarray(y)) == 1.0


def test_pgd_is_a_valid_training_hook():
    f, _, _ = linear_model(3)
    perturb = functools.partial(attacks.pgd, eps=0.1, steps=2, step_size=0.05)
    x = images(4)
    y = jnp.zeros(4, jnp.int32)
    out = jax.jit(lambda x_, k: perturb(f, x_, y, k))(x, jax.random.key(0))
    assert out.shape == x.shape and float(jnp.abs(out - x).max()) > 0.0


def test_bad_arguments_raise():
    f, _, _ = linear_model(3)
    x, y = images(2), jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match="norm"):
        attacks.pgd(f, x, y, jax.random.key(0), eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="schedule"):
        attacks.pgd(f, x, y, jax.random.key(0), eps=0.1, schedule="nope")
    with pytest.raises(ValueError, match="loss"):
        attacks.pgd(f, x, y, jax.random.key(0), eps=0.1, loss="nope")

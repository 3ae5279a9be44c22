"""APGD-T, FAB-T and FMN: exact minimal perturbations of linear classifiers, the threat model
and determinism (`es` is tests/test_es.py's).

On a linear classifier ``z = W^T x + b`` with the box not binding, the smallest perturbation
that makes class ``j`` beat the label ``y`` is ``(z_y - z_j) / ||w_y - w_j||_dual`` (dual of
L-inf: L1; of L2: L2), and the minimal adversarial perturbation is the minimum over ``j``.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from kwta_jax import attacks
from kwta_jax.attacks import projections
from kwta_jax.attacks.fab import project_onto_hyperplane_in_box

SHAPE = (4, 4, 1)
D = int(np.prod(SHAPE))
CLASSES = 5
DUAL = {"linf": 1, "l2": 2}


def linear_problem(n=48, seed=0):
    """A 5-class linear classifier, inputs where the box never binds at the minimal distance
    (coordinates in [0.35, 0.65], distances below 0.15 L-inf / 0.45 L2), labels = clean
    predictions. Returns ``f, w, b, x, y`` (``f(x) = x.reshape(n, -1) @ w + b``)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, CLASSES)).astype(np.float32)
    b = (rng.normal(size=CLASSES) * 0.1).astype(np.float32)
    x = rng.uniform(0.35, 0.65, size=(n, *SHAPE)).astype(np.float32)
    w_j, b_j = jnp.asarray(w), jnp.asarray(b)
    f = lambda x_: x_.reshape(x_.shape[0], -1) @ w_j + b_j
    y = np.asarray(f(jnp.asarray(x))).argmax(-1).astype(np.int32)
    return f, w, b, jnp.asarray(x), jnp.asarray(y)


def distances_to_each_class(f, w, x, y, norm):
    """``[n, classes]``: closed-form distance to each class's boundary (inf for the label)."""
    logits = np.asarray(f(x), np.float64)
    y = np.asarray(y)
    rows = np.arange(len(y))
    gaps = logits[rows, y][:, None] - logits  # [n, classes]
    normals = w.T[y][:, None, :] - w.T[None, :, :]  # [n, classes, D]
    dual = np.linalg.norm(normals.astype(np.float64), ord=DUAL[norm], axis=-1)
    return np.where(np.eye(w.shape[1], dtype=bool)[y], np.inf, gaps / np.where(dual > 0, dual, 1))


def predictions(f, x):
    return np.asarray(jnp.argmax(f(x), -1))


# --- the closed-form projection of FAB --------------------------------------------------------


def _solver_projection(t, w, c, norm):
    """Reference minimal ``||d||`` with ``w . d = -c`` and ``0 <= t + d <= 1`` by a generic
    solver (LP for L-inf, SLSQP for L2); returns (norm, d)."""
    n = t.size
    if norm == "linf":
        # variables (d, r): minimise r s.t. w.d = -c, -r <= d_i <= r, -t_i <= d_i <= 1 - t_i.
        cost = np.r_[np.zeros(n), 1.0]
        a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
        res = scipy.optimize.linprog(
            cost, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.r_[w, 0.0][None], b_eq=[-c],
            bounds=[(-ti, 1 - ti) for ti in t] + [(0, None)], method="highs",
        )  # fmt: skip
        assert res.success
        return res.x[-1], res.x[:n]
    res = scipy.optimize.minimize(
        lambda d: 0.5 * d @ d, -c * w / (w @ w), jac=lambda d: d, method="SLSQP",
        bounds=[(-ti, 1 - ti) for ti in t],
        constraints=[{"type": "eq", "fun": lambda d: w @ d + c, "jac": lambda d: w}],
        options={"ftol": 1e-14, "maxiter": 500},
    )  # fmt: skip
    assert res.success
    return np.linalg.norm(res.x), res.x


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_projection_in_box_is_the_solvers_minimum(norm):
    rng = np.random.default_rng(1)
    n_rows, d = 24, 10
    t = rng.uniform(0, 1, (n_rows, d))
    t[:, :2] = rng.integers(0, 2, (n_rows, 2))  # points on the box faces
    w = rng.normal(size=(n_rows, d))
    w[:, 3] = 0.0  # a coordinate the hyperplane ignores
    # Both sides of the hyperplane, near (box irrelevant) to far (the box binds or is too small).
    c = rng.normal(size=n_rows) * rng.choice([0.05, 0.5, 2.0, 20.0], n_rows)
    got = np.asarray(
        project_onto_hyperplane_in_box(*(jnp.asarray(a, jnp.float32) for a in (t, w, c)), norm),
        np.float64,
    )
    assert np.all(t + got >= -1e-6) and np.all(t + got <= 1 + 1e-6)
    assert np.all(got[:, 3] == 0.0)
    # The most |w.d| the box allows: every coordinate to the far face.
    best_decrease = np.sum(np.abs(w) * np.where(w * np.sign(c)[:, None] > 0, t, 1 - t), -1)
    feasible = best_decrease >= np.abs(c)
    assert 0 < feasible.sum() < n_rows  # both cases occur
    for i in np.flatnonzero(feasible):
        np.testing.assert_allclose(w[i] @ got[i], -c[i], atol=1e-4 * (1 + abs(c[i])))
        ref_norm, ref_d = _solver_projection(t[i], w[i], c[i], norm)
        got_norm = np.abs(got[i]).max() if norm == "linf" else np.linalg.norm(got[i])
        np.testing.assert_allclose(got_norm, ref_norm, rtol=1e-4, atol=1e-6)
        if norm == "l2":  # strictly convex: the minimiser itself is unique
            np.testing.assert_allclose(got[i], ref_d, atol=1e-4)
    for i in np.flatnonzero(~feasible):  # the corner that gets closest
        np.testing.assert_allclose(w[i] @ got[i] * np.sign(c[i]), -best_decrease[i], rtol=1e-5)


# --- linear classifier: minimal perturbation in closed form -----------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_and_fmn_find_the_closed_form_minimal_perturbation(norm):
    f, w, _, x, y = linear_problem()
    to_class = distances_to_each_class(f, w, x, y, norm)
    closest = to_class.min(-1)
    runner_up = np.where(np.eye(CLASSES, dtype=bool)[np.asarray(y)], -np.inf, f(x)).argmax(-1)
    to_runner_up = to_class[np.arange(len(y)), runner_up]

    x_fab, d_fab = jax.jit(functools.partial(attacks.fab_t_min_norm, f, norm=norm))(
        x, y, jax.random.key(0)
    )
    x_fmn, d_fmn = jax.jit(functools.partial(attacks.fmn_min_norm, f, norm=norm))(x, y)
    for x_adv, dist in ((x_fab, d_fab), (x_fmn, d_fmn)):
        dist = np.asarray(dist)
        assert np.all(predictions(f, x_adv) != np.asarray(y))  # every example broken
        np.testing.assert_allclose(np.asarray(attacks.lp_norm(x_adv - x, norm)), dist, rtol=1e-6)
        assert np.all(dist >= closest * (1 - 1e-4))  # nothing closer than the minimum exists
    # FAB-T runs every other class as a target: the minimum over them, within its overshoot
    # (eta = 1.05 leaves a fixed ~0.5% on a linear model).
    np.testing.assert_array_less(np.asarray(d_fab), closest * 1.01)
    # With one target, FAB-T attacks the runner-up class only: its boundary, not the closest.
    _, d_fab_1 = attacks.fab_t_min_norm(f, x, y, jax.random.key(0), norm=norm, n_target_classes=1)
    assert np.all(np.asarray(d_fab_1) >= to_runner_up * (1 - 1e-4))
    np.testing.assert_array_less(np.asarray(d_fab_1), to_runner_up * 1.01)
    # FMN follows the runner-up class (the loss is z_y - max_j z_j): it reaches that class's
    # boundary exactly, which is the closest one for most but not all examples.
    np.testing.assert_allclose(np.asarray(d_fmn), to_runner_up, rtol=1e-3)
    nearest_is_runner_up = np.isclose(to_runner_up, closest)
    assert nearest_is_runner_up.mean() > 0.4
    np.testing.assert_allclose(
        np.asarray(d_fmn)[nearest_is_runner_up], closest[nearest_is_runner_up], rtol=1e-3
    )


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_break_exactly_the_examples_within_eps_on_a_linear_classifier(norm):
    f, w, _, x, y = linear_problem(seed=1)
    to_class = distances_to_each_class(f, w, x, y, norm)
    closest = to_class.min(-1)
    runner_up = np.where(np.eye(CLASSES, dtype=bool)[np.asarray(y)], -np.inf, f(x)).argmax(-1)
    eps = float(np.median(closest))
    within = closest <= eps / 1.02  # must be broken: the boundary is 2% inside the ball
    beyond = closest > eps  # cannot be broken by any point of the ball
    assert within.sum() >= 15 and beyond.sum() >= 15
    key = jax.random.key(0)
    runs = {
        "apgd_t": attacks.apgd_t(f, x, y, key, eps=eps, norm=norm),
        "fab_t": attacks.fab_t(f, x, y, key, eps=eps, norm=norm),
        "fmn": attacks.fmn(f, x, y, key, eps=eps, norm=norm),
    }
    # FMN follows the runner-up class only (see the test above): it must break the examples
    # whose runner-up boundary is inside the ball.
    runner_up_within = to_class[np.arange(len(y)), runner_up] <= eps / 1.02
    for name, x_adv in runs.items():
        projections.check_threat_model(x_adv, x, eps, norm, name=name)
        broken = predictions(f, x_adv) != np.asarray(y)
        assert not broken[beyond].any(), name
        must = runner_up_within if name == "fmn" else within
        assert broken[must].all(), (name, np.flatnonzero(must & ~broken))


def test_targets_are_the_other_classes_ranked_by_logit():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    y = jnp.asarray([1, 0])
    np.testing.assert_array_equal(
        np.asarray(attacks.losses.top_other_classes(logits, y, 3)), [[3, 2, 0], [1, 2, 3]]
    )
    # Targeted DLR: (z_t - z_y) / (z_(1) - (z_(3) + z_(4)) / 2).
    got = attacks.dlr_targeted(logits, y, jnp.asarray([3, 4]))
    np.testing.assert_allclose(np.asarray(got), [(2 - 3) / (3 - 0.5), (1 - 5) / (5 - 2.5)])


# --- APGD-T on a small network -----------------------------------------------------------------


def random_mlp(classes=10, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    w1 = jax.random.normal(k1, (64, 64)) / 8.0
    w2 = jax.random.normal(k2, (64, classes)) / 8.0
    return lambda x: jax.nn.relu(x.reshape(x.shape[0], -1) @ w1) @ w2


def test_apgd_t_is_at_least_as_strong_as_apgd_ce_on_a_random_mlp():
    f = random_mlp()
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (64, 8, 8, 1)), jnp.float32)
    y = jnp.argmax(f(x), -1)
    key, eps = jax.random.key(0), 0.02

    def accuracy(x_adv):
        projections.check_threat_model(x_adv, x, eps, "linf")
        return float(np.mean(predictions(f, x_adv) == np.asarray(y)))

    acc_ce = accuracy(attacks.apgd(f, x, y, key, eps=eps, steps=20))
    acc_t = accuracy(attacks.apgd_t(f, x, y, key, eps=eps, steps=20))
    assert 0.2 < acc_ce < 0.9  # an informative radius
    assert acc_t <= acc_ce


def random_mlp_problem(model_seed: int, data_seed: int, n: int):
    """A random 64-64-10 ReLU MLP, ``n`` inputs ``[n, 64]`` anywhere in [0, 1] and its own
    predictions as labels."""
    k1, k2 = jax.random.split(jax.random.key(model_seed))
    w1 = jax.random.normal(k1, (64, 64)) / 4.0
    w2 = jax.random.normal(k2, (64, 10)) / 4.0
    f = lambda x_: jax.nn.relu(x_.reshape(x_.shape[0], -1) @ w1) @ w2
    x = jnp.asarray(np.random.default_rng(data_seed).uniform(0, 1, (n, 64)), jnp.float32)
    return f, x, jnp.argmax(f(x), -1)


def test_fmn_breaks_every_example_of_a_random_mlp_where_the_box_clips_its_steps():
    # Inputs anywhere in [0, 1]: the box clips the L2 steps, and the paper's pre-success radius
    # rule (the linear estimate alone) stalls on an example of this batch.
    f, x, y = random_mlp_problem(1, 0, 128)
    x_adv, dist = attacks.fmn_min_norm(f, x, y, norm="l2")
    assert np.all(np.isfinite(np.asarray(dist)))
    assert np.all(predictions(f, x_adv) != np.asarray(y))


def test_fmn_with_several_initial_steps_keeps_each_examples_smallest_distance():
    f, x, y = random_mlp_problem(3, 1, 64)
    alphas = (10.0, 1.0, 0.1)
    singles = [attacks.fmn_min_norm(f, x, y, norm="linf", steps=30, alpha_init=a) for a in alphas]
    x_adv, dist = attacks.fmn_min_norm(f, x, y, norm="linf", steps=30, alpha_init=alphas)
    d = np.stack([np.asarray(s[1]) for s in singles])
    np.testing.assert_array_equal(np.asarray(dist), d.min(0))
    assert len({int(i) for i in d.argmin(0)}) > 1  # the runs differ: each wins somewhere
    np.testing.assert_allclose(
        np.abs(np.asarray(x_adv - x)).reshape(64, -1).max(-1), np.asarray(dist), rtol=1e-6
    )
    assert np.all(predictions(f, x_adv) != np.asarray(y))
    with pytest.raises(ValueError, match="alpha_init"):
        attacks.fmn_min_norm(f, x, y, alpha_init=())


# --- threat model, determinism, jit ------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_results_in_ball_and_box_deterministic_and_jittable(norm):
    # Large weights and inputs anywhere in [0, 1]: the box binds and iterates overshoot.
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(D, CLASSES)) * 30, jnp.float32)
    f = lambda x_: x_.reshape(x_.shape[0], -1) @ w
    x = jnp.asarray(rng.uniform(0, 1, (12, *SHAPE)), jnp.float32)
    y = jnp.asarray(np.arange(12) % CLASSES, jnp.int32)  # some already misclassified
    eps = 0.1 if norm == "linf" else 0.5
    runs = {
        "apgd_t": functools.partial(attacks.apgd_t, steps=5, n_target_classes=2),
        "fab_t": functools.partial(attacks.fab_t, steps=5, restarts=2, n_target_classes=2),
        "fmn": functools.partial(attacks.fmn, steps=5),
        "es": functools.partial(attacks.es, schedule=((2, 3), (1, 5)), block_size=2),
    }
    for name, attack in runs.items():
        run = jax.jit(functools.partial(attack, f, eps=eps, norm=norm))
        a, b = run(x, y, jax.random.key(0)), run(x, y, jax.random.key(0))
        projections.check_threat_model(a, x, eps, norm, name=name)
        assert a.shape == x.shape and a.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        if name in ("apgd_t", "es"):  # random starts / noise: the key matters
            c = run(x, y, jax.random.key(1))
            assert not np.array_equal(np.asarray(a), np.asarray(c)), name


def test_minimum_norm_attacks_leave_misclassified_inputs_alone():
    f, _, _, x, y = linear_problem(n=8)
    y_wrong = (y + 1) % CLASSES
    for attack in (attacks.fab_t_min_norm, attacks.fmn_min_norm):
        x_adv, dist = attack(f, x, y_wrong, jax.random.key(0), steps=3)
        np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(dist), 0.0)


def test_min_norm_reports_inf_and_the_eps_form_returns_clean_when_nothing_is_found():
    # A constant classifier cannot be fooled: nothing found, distance inf, clean input back.
    f = lambda x_: jnp.broadcast_to(jnp.arange(CLASSES, dtype=jnp.float32), (x_.shape[0], CLASSES))
    x = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (4, *SHAPE)), jnp.float32)
    y = jnp.full((4,), CLASSES - 1, jnp.int32)
    for attack in (attacks.fab_t_min_norm, attacks.fmn_min_norm):
        x_adv, dist = attack(f, x, y, jax.random.key(0), steps=3)
        assert np.all(np.isinf(np.asarray(dist)))
        # What fab_t / fmn return at a radius.
        x_eps = projections.keep_within_eps(x_adv, dist, x, 0.3, "linf")
        np.testing.assert_array_equal(np.asarray(x_eps), np.asarray(x))


# --- arguments, import side effects ------------------------------------------------------------


def test_bad_arguments_raise():
    f, _, _, x, y = linear_problem(n=2)
    key = jax.random.key(0)
    three = lambda x_: f(x_)[:, :3]
    with pytest.raises(ValueError, match="4 classes"):
        attacks.apgd_t(three, x, y % 3, key, eps=0.1)
    with pytest.raises(ValueError, match="schedule"):
        attacks.es(f, x, y, key, eps=0.1, schedule=((3, 0),))
    with pytest.raises(ValueError, match="norm"):
        attacks.fmn(f, x, y, key, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        attacks.fab_t(f, x, y, key, eps=0.1, steps=0)


def test_importing_the_attacks_does_not_start_the_jax_backend():
    code = (
        "import kwta_jax.attacks\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized(), 'backend started at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

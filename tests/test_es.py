"""`es` (Tramer et al. 2020's k-WTA attack) and its estimator: the exact antithetic estimate,
the stall-triggered sample ramp, computing only the examples left, determinism, the threat
model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attacks_adaptive import EPS, masked_model, toy_data
from test_attacks_minimum_norm import CLASSES, SHAPE, D, linear_problem

from kwta_jax import attacks, suites
from kwta_jax.attacks import gradients, projections
from kwta_jax.attacks.es import bucket_sizes, es_trace


def accuracy(f, x_adv, y):
    return float(np.mean(np.asarray(jnp.argmax(f(x_adv), -1)) == np.asarray(y)))


# --- the estimator ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(samples=st.integers(1, 5000), block_size=st.integers(1, 5000), batch=st.integers(1, 300))
def test_pairs_per_block_covers_every_pair_once_within_the_cap(samples, block_size, batch):
    block, n_blocks = gradients.pairs_per_block(samples, block_size, batch)
    cap = max(1, min(samples, block_size // batch))
    assert 1 <= block <= cap and 2 * block >= cap  # within memory, never much smaller
    full = samples // block
    assert n_blocks in (full, full + 1) and (n_blocks == full) == (samples % block == 0)
    assert full * block + (samples - full * block) == samples and full * block <= samples


@pytest.mark.parametrize("samples, block_size", [(7, 8), (7, 3), (12, 8), (1, 64)])
def test_blocked_estimate_is_the_exact_antithetic_sum_with_shared_noise(samples, block_size):
    # Pair i's noise is normal(fold_in(key, i)), shared by every example; 7 pairs in blocks of
    # 3 run two blocks and a remainder of 1: every pair counted exactly once.
    f, w, b, x, y = linear_problem(n=3)
    sigma, key = 0.05, jax.random.key(5)
    est = gradients.finite_differences_blocked(
        f, attacks.margin, samples=samples, sigma=sigma, block_size=block_size
    )
    loss, g, logits = est(x, y, key)
    assert logits is None and g.shape == x.shape
    u = np.stack(
        [np.asarray(jax.random.normal(jax.random.fold_in(key, i), SHAPE)) for i in range(samples)]
    ).reshape(samples, 1, D)
    x64 = np.asarray(x, np.float64).reshape(1, 3, D)

    def margin(v):  # [..., 3, D] -> [..., 3]
        z = v @ w.astype(np.float64) + b.astype(np.float64)
        rows = np.asarray(y)
        z_y = np.take_along_axis(z, np.broadcast_to(rows[:, None], z.shape[:-1] + (1,)), -1)
        others = np.where(np.eye(CLASSES, dtype=bool)[rows], -np.inf, z)
        return others.max(-1) - z_y[..., 0]

    plus, minus = margin(x64 + sigma * u), margin(x64 - sigma * u)  # [samples, 3]
    want = np.einsum("sb,sd->bd", plus - minus, u[:, 0]) / (2 * sigma * samples)
    np.testing.assert_allclose(np.asarray(g).reshape(3, D), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(loss), (plus + minus).mean(0) / 2, rtol=1e-5)


def test_blocked_estimate_of_an_example_does_not_depend_on_its_batch_or_blocking():
    f, _, _, x, y = linear_problem(n=6)
    key = jax.random.key(1)
    make = functools.partial(
        gradients.finite_differences_blocked, f, attacks.margin, samples=50, sigma=0.1
    )
    _, whole, _ = make(block_size=64)(x, y, key)
    _, alone, _ = make(block_size=7)(x[2:3], y[2:3], key)
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(whole[2]), rtol=1e-5, atol=1e-6)


def test_blocked_estimate_recovers_a_linear_gradient():
    f, _, _, x, y = linear_problem(n=4)
    exact = jax.grad(lambda v: attacks.margin(f(v), y).sum())(x)
    est = gradients.finite_differences_blocked(
        f, attacks.margin, samples=3000, sigma=0.01, block_size=512
    )
    _, g, _ = est(x, y, jax.random.key(0))
    g, exact = np.asarray(g).reshape(4, -1), np.asarray(exact).reshape(4, -1)
    cosine = np.sum(g * exact, -1) / np.linalg.norm(g, axis=-1) / np.linalg.norm(exact, axis=-1)
    assert np.all(cosine > 0.95)


# --- the attack ---------------------------------------------------------------------------------


def test_bucket_sizes_halve_from_the_batch_down_to_the_smallest():
    assert bucket_sizes(250) == (1, 2, 4, 8, 16, 32, 63, 125, 250)
    assert bucket_sizes(8, smallest=3) == (3, 4, 8)
    assert bucket_sizes(1) == (1,)


def test_es_breaks_a_gradient_masked_model_where_pgd_fails():
    x, y, _ = toy_data(64, seed=2)
    x, y = jnp.asarray(x), jnp.asarray(y)
    f = masked_model()  # binarise at 0.5, then template matching: zero input gradient
    key = jax.random.key(0)
    assert accuracy(f, x, y) == 1.0
    assert accuracy(f, attacks.pgd(f, x, y, key, eps=EPS, steps=10), y) >= 0.9
    es = functools.partial(attacks.es, schedule=((8, 3), (32, 3)), steps=10, smallest_bucket=16)
    run = jax.jit(functools.partial(es, f, eps=EPS))  # buckets 16, 32, 64: a lean compile
    x_es = run(x, y, key)
    projections.check_threat_model(x_es, x, EPS, "linf")
    assert accuracy(f, x_es, y) <= 0.2


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_es_is_in_the_threat_model_deterministic_and_depends_on_the_key(norm):
    # Large weights, inputs anywhere in [0, 1]: the box binds; some labels already wrong.
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(D, CLASSES)) * 30, jnp.float32)
    f = lambda x_: x_.reshape(x_.shape[0], -1) @ w
    x = jnp.asarray(rng.uniform(0, 1, (12, *SHAPE)), jnp.float32)
    y = jnp.asarray(np.arange(12) % CLASSES, jnp.int32)
    eps = 0.1 if norm == "linf" else 0.5
    run = jax.jit(
        functools.partial(
            attacks.es, f, eps=eps, norm=norm, schedule=((2, 2), (5, 2)), steps=6, block_size=4
        )
    )
    a, b, c = (
        run(x, y, jax.random.key(0)),
        run(x, y, jax.random.key(0)),
        run(x, y, jax.random.key(1)),
    )
    projections.check_threat_model(a, x, eps, norm)
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_es_freezes_misclassified_examples_and_moves_the_others():
    f, _, _, x, y = linear_problem(n=8)
    y = y.at[:4].set((y[:4] + 1) % CLASSES)  # the first four are misclassified from the start
    x_adv, trace = es_trace(f, x, y, jax.random.key(0), eps=0.1, schedule=((4, 3),), steps=3)
    np.testing.assert_array_equal(np.asarray(x_adv[:4]), np.asarray(x[:4]))
    np.testing.assert_array_equal(np.asarray(trace.pairs[:4]), 0)
    assert np.abs(np.asarray(x_adv[4:] - x[4:])).max() > 0


def test_es_of_an_example_does_not_depend_on_the_rest_of_its_batch():
    # The noise is a function of the key and the step only; the other examples, the bucket an
    # example is padded into and the block size leave its trajectory alone.
    f, _, _, x, y = linear_problem(n=8, seed=3)
    run = functools.partial(
        es_trace, f, key=jax.random.key(2), eps=0.05, schedule=((3, 2), (9, 2)), steps=8
    )
    whole, t_whole = run(x, y, block_size=64)
    for i in (0, 5):
        alone, t_alone = run(x[i : i + 1], y[i : i + 1], block_size=5)
        np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(whole[i]), atol=1e-6)
        assert int(t_alone.pairs[0]) == int(t_whole.pairs[i])


class CountingModel:
    """A linear model that records the batch size of every forward call (a host callback:
    only the calls that run count, not the branches that are compiled)."""

    def __init__(self, f):
        self.f, self.rows = f, []

    def __call__(self, x):
        jax.debug.callback(lambda n: self.rows.append(int(n)), jnp.int32(x.shape[0]))
        return self.f(x)


def test_a_stalled_example_climbs_the_levels_then_stops_and_only_running_ones_cost():
    # A constant classifier: the margin never improves, so every correct example spends
    # `patience` steps at each level and stops after the last; the wrong ones cost nothing.
    n, levels = 8, ((3, 2), (5, 3), (7, 1))
    logits = jnp.arange(CLASSES, dtype=jnp.float32)
    model = CountingModel(lambda x_: jnp.broadcast_to(logits, (x_.shape[0], CLASSES)))
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (n, *SHAPE)), jnp.float32)
    y = jnp.asarray([CLASSES - 1] * 5 + [0] * 3, jnp.int32)  # 5 correct, 3 wrong
    steps = 10  # more than the 2 + 3 + 1 moves the ramp allows
    x_adv, trace = jax.jit(
        functools.partial(es_trace, model, eps=0.1, schedule=levels, steps=steps, block_size=16)
    )(x, y, jax.random.key(0))
    jax.effects_barrier()
    correct = np.arange(n) < 5
    np.testing.assert_array_equal(np.asarray(trace.level), np.where(correct, 2, 0))
    np.testing.assert_array_equal(np.asarray(trace.gave_up), correct)
    np.testing.assert_array_equal(np.asarray(trace.steps), np.where(correct, 2 + 3 + 1, 0))
    want_pairs = 3 * 2 + 5 * 3 + 7 * 1
    np.testing.assert_array_equal(np.asarray(trace.pairs), np.where(correct, want_pairs, 0))
    np.testing.assert_array_equal(np.asarray(trace.broken), ~correct)  # wrong from the start
    projections.check_threat_model(x_adv, x, 0.1, "linf")
    # Forward passes: one batch of n per step for the iterate (plus the final check), and per
    # move of the 5 running examples (padded to the bucket of 8), 2 * pairs * 8 in blocks of
    # at most 16 (pair, example) evaluations.
    iterate = n * (steps + 1)
    estimates = 2 * 8 * want_pairs
    assert sum(model.rows) == iterate + estimates
    assert max(model.rows) <= 2 * 16


def test_es_computes_a_lone_running_example_at_bucket_one():
    # Class 0 scores pixel 0, the others score 0: with pixel 0 at 0.9 every example predicts 0,
    # so only example 0 (label 0) is correct and eps = 0.05 cannot flip it in two steps.
    n = 8
    w = np.zeros((D, CLASSES), np.float32)
    w[0, 0] = 1.0
    model = CountingModel(lambda x_: x_.reshape(x_.shape[0], -1) @ jnp.asarray(w))
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (n, *SHAPE)), jnp.float32)
    x = x.at[:, 0, 0, 0].set(0.9)
    y = jnp.asarray([0] + [1] * (n - 1), jnp.int32)
    _, trace = es_trace(
        model, x, y, jax.random.key(0), eps=0.05, schedule=((4, 100),), steps=2, block_size=64
    )
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(trace.pairs), [8] + [0] * (n - 1))
    assert sum(model.rows) == n * 3 + 2 * (2 * 4 * 1)  # 2 moves of 4 pairs at bucket size 1


def test_bad_schedules_raise():
    f, _, _, x, y = linear_problem(n=2)
    key = jax.random.key(0)
    for bad in [(), ((3, 0),), ((0, 3),), ((3,),), "abc"]:
        with pytest.raises(ValueError, match="schedule"):
            attacks.es(f, x, y, key, eps=0.1, schedule=bad)
    with pytest.raises(ValueError, match="steps"):
        attacks.es(f, x, y, key, eps=0.1, steps=0)
    # A suite refuses a bad schedule when it is built, not when `es` first runs.
    with pytest.raises(ValueError, match="schedule"):
        suites.build_suite(["es"], budget={"es_schedule": ((100, 0),)})
    built = suites.build_suite(["es"], budget={"es_schedule": [[100, 5], [2000, 5]]})  # JSON
    assert built[0].fn.keywords["schedule"] == ((100, 5), (2000, 5))
    with pytest.raises(ValueError, match="norm"):
        attacks.es(f, x, y, key, eps=0.1, norm="l1")

"""Suite runner: worst case <= every attack, chunking does not change results, reporting."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attacks_adaptive import masked_model, relu_model, toy_data

from kwta_jax import attacks, evaluation, reports, suites
from kwta_jax.adapters import from_logits_fn
from kwta_jax.attacks import AttackInvariantError


def toy_models(logits_fn, *, name="model", **auxiliary) -> evaluation.Models:
    """`evaluation.Models` of closures ``x -> logits``: the attacked one and auxiliary ones
    (``bpda=``, ``source=``)."""
    return evaluation.Models(
        from_logits_fn(logits_fn, name=name),
        {k: from_logits_fn(f, name=k) for k, f in auxiliary.items()},
    )


@pytest.fixture(scope="module")
def relu_result():
    x, y, _ = toy_data(40, seed=5)
    suite = evaluation.build_suite(["fgsm", "pgd", "square", "transfer"], budget="quick")
    models = toy_models(relu_model(), source=masked_model(bpda=True), name="r")
    res = evaluation.run_suite(
        models, x, y, suite=suite, eps_values=[0.2, 0.3], batch_size=16, progress=False, keep=4
    )
    return res, x, y, models, suite


def test_worst_case_is_at_most_every_attack_and_is_the_per_example_and(relu_result):
    res, *_ = relu_result
    for e in res.eps_values:
        w = res.worst_accuracy(e)
        assert all(w <= res.accuracy(a, e) for a in res.pred)
        expected = res.clean_correct.copy()
        for a in res.pred:
            expected &= res.pred[a][e] == res.labels
        np.testing.assert_array_equal(res.worst_correct(e), expected)
    # Attacks do something here (otherwise the inequality would be trivially tight).
    assert res.worst_accuracy(0.3) < res.clean_correct.mean()


def test_chunking_and_padding_do_not_change_results(relu_result):
    res, x, y, models, suite = relu_result
    # 40 examples: chunks of 16 (last one padded) vs one chunk of 40; same keys per chunk
    # differ, so compare a deterministic attack (FGSM) exactly and the clean predictions.
    other = evaluation.run_suite(
        models, x, y, suite=suite[:1], eps_values=[0.2, 0.3], batch_size=40, progress=False
    )
    np.testing.assert_array_equal(other.pred["fgsm"][0.3], res.pred["fgsm"][0.3])
    np.testing.assert_array_equal(other.clean_pred, res.clean_pred)
    assert res.pred["pgd"][0.3].shape == (40,)


def test_same_seed_same_result(relu_result):
    res, x, y, models, suite = relu_result
    again = evaluation.run_suite(
        models, x, y, suite=suite[1:2], eps_values=[0.2, 0.3], batch_size=16, progress=False
    )
    np.testing.assert_array_equal(again.pred["pgd"][0.2], res.pred["pgd"][0.2])


def test_skips_attacks_without_their_model_and_reports(relu_result, tmp_path):
    res, x, y, _, _ = relu_result
    skipped = evaluation.run_suite(
        toy_models(relu_model(), name="plain"), x[:8], y[:8],
        suite=evaluation.build_suite(["fgsm", "bpda", "transfer"], budget="quick"),
        eps_values=[0.1], progress=False,
    )  # fmt: skip
    assert set(skipped.skipped) == {"bpda", "transfer"} and list(skipped.pred) == ["fgsm"]
    table = reports.format_table(res)
    assert "worst case" in table and "transfer" in table and "ex/s" in table
    payload = res.to_dict()
    reports.save_json(payload, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["worst_case_accuracy"]["0.3"] == pytest.approx(res.worst_accuracy(0.3))
    assert loaded["attacks"]["pgd"]["examples_per_second"] > 0
    reports.plot_accuracy_vs_eps([res, res], tmp_path / "acc.png")
    reports.plot_examples(res, tmp_path / "ex.png", rows=3)
    assert (tmp_path / "acc.png").stat().st_size > 1000
    assert (tmp_path / "ex.png").stat().st_size > 1000


def test_invariant_violation_is_caught():
    x, y, _ = toy_data(8)
    bad = evaluation.AttackSpec(
        "bad", "white-box", lambda f, x, y, key, *, eps: jnp.clip(x + 2 * eps, 0.0, 1.0)
    )
    with pytest.raises(AttackInvariantError, match="bad: .* outside the linf ball"):
        evaluation.run_suite(
            toy_models(relu_model()), x, y, suite=[bad], eps_values=[0.1],
            progress=False,
        )  # fmt: skip


def test_validation_errors():
    x, y, _ = toy_data(4)
    with pytest.raises(ValueError, match="unknown attack"):
        evaluation.build_suite(["pgd", "nope"])
    with pytest.raises(ValueError, match="budget"):
        evaluation.build_suite(["pgd"], budget="huge")
    with pytest.raises(ValueError, match="eps: values must be > 0"):
        evaluation.run_suite(
            toy_models(relu_model()), x, y, suite=[], eps_values=[0.0], progress=False
        )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluation.run_suite(
            toy_models(relu_model()), x + 2, y, suite=[], eps_values=[0.1],
            progress=False,
        )  # fmt: skip
    assert len(evaluation.build_suite(["all"])) == len(evaluation.ATTACKS)
    assert evaluation.default_eps("mnist5k") == (0.1, 0.15, 0.2, 0.3)


def test_models_from_nnx_builds_bpda_copy_only_for_kwta():
    from flax import nnx

    from kwta_jax.layers import KWTA

    class MLP(nnx.Module):
        def __init__(self, act, rngs):
            self.l1, self.act = nnx.Linear(64, 16, rngs=rngs), act
            self.l2 = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.act(self.l1(x.reshape(x.shape[0], -1))))

    kw = MLP(KWTA(0.25), nnx.Rngs(0))
    assert isinstance(kw.act, KWTA)
    m = evaluation.models_from_nnx(kw)
    x = jnp.asarray(toy_data(4)[0])
    exact, bpda = m.model.logits_fn(), m.auxiliary["bpda"].logits_fn()
    np.testing.assert_allclose(bpda(x), exact(x), rtol=1e-6)
    g_exact = jax.grad(lambda v: exact(v).sum())(x)
    g_bpda = jax.grad(lambda v: bpda(v).sum())(x)
    assert not np.allclose(g_exact, g_bpda)  # identity backward differs from the mask
    assert m.model.count_kwta(x) == 1
    assert evaluation.models_from_nnx(MLP(jax.nn.relu, nnx.Rngs(0))).model.count_kwta(x) == 0


# --------------------------------------------------------------------------------------------
# Cascade, minimum-norm distances, per-image results, the AutoAttack preset.
# --------------------------------------------------------------------------------------------

# Deterministic attacks (no random start, key unused or unused with one restart): an
# example's result does not depend on which other examples share its chunk, so the cascade
# must give exactly the full table's worst case, example by example.
DETERMINISTIC = ["fgsm", "deepfool", "fmn", "fab-t"]


@pytest.fixture(scope="module")
def full_and_cascade():
    x, y, _ = toy_data(40, seed=5)
    suite = evaluation.build_suite(DETERMINISTIC, budget="quick")
    models = toy_models(relu_model(), name="r")
    kw = dict(suite=suite, eps_values=[0.245, 0.25, 0.3], batch_size=16, progress=False, keep=4)
    full = evaluation.run_suite(models, x, y, mode="full", **kw)
    cascade = evaluation.run_suite(models, x, y, mode="cascade", **kw)
    return full, cascade


def test_cascade_equals_full_table_worst_case(full_and_cascade):
    full, cascade = full_and_cascade
    assert full.mode == "full" and cascade.mode == "cascade"
    for e in full.eps_values:
        np.testing.assert_array_equal(cascade.worst_correct(e), full.worst_correct(e))
        np.testing.assert_array_equal(cascade.breaker(e), full.breaker(e))
        assert cascade.broken_by(e) == full.broken_by(e)
    # The case is not trivial: some examples are broken, some survive, by several attacks.
    assert 0 < cascade.worst_accuracy(0.245) < cascade.clean_correct.mean()
    assert sum(v > 0 for v in cascade.broken_by(0.245).values()) >= 2
    # Each stage attacks only what every earlier stage failed on; stage accuracy is
    # cumulative (non-increasing) and the last stage is the worst case.
    names = list(cascade.pred)
    for e in cascade.eps_values:
        accs = [cascade.accuracy(a, e) for a in names]
        assert accs == sorted(accs, reverse=True)
        assert accs[-1] == cascade.worst_accuracy(e)
        for prev, nxt in zip(names, names[1:], strict=False):
            assert not (cascade.attacked[nxt][e] & ~cascade.correct(prev, e)).any()
    assert cascade.attacked[names[-1]][0.3].sum() < full.n
    # The first minimum-norm attack runs on every clean-correct example in both modes (same
    # distances, same median); a later one only on what is unbroken at some radius, where
    # its distances are those of the full table.
    np.testing.assert_array_equal(cascade.min_norm_dist["fmn"], full.min_norm_dist["fmn"])
    assert cascade.median_min_norm("fmn") == full.median_min_norm("fmn")
    fab = cascade.min_norm_dist["fab-t"]
    ran = ~np.isnan(fab)
    left = np.logical_or.reduce([cascade.correct("fmn", e) for e in cascade.eps_values])
    np.testing.assert_array_equal(ran, left)
    for e in cascade.eps_values:  # at each radius FAB-T attacked exactly what FMN left
        np.testing.assert_array_equal(cascade.attacked["fab-t"][e], cascade.correct("fmn", e))
    assert 0 < cascade.attacked["fab-t"][0.245].sum() < cascade.clean_correct.sum()
    np.testing.assert_array_equal(fab[ran], full.min_norm_dist["fab-t"][ran])
    assert cascade.median_min_norm("fab-t") is None
    assert cascade.to_dict()["attacks"]["fab-t"]["median_min_norm"] is None
    assert cascade.median_min_norm() >= full.median_min_norm()
    # Without the attack that saw every example (the AutoAttack preset: FAB-T late) there is
    # no median at all, not ``inf`` for the examples FAB-T never saw.
    late_only = dataclasses.replace(cascade, min_norm_dist={"fab-t": fab})
    assert late_only.median_min_norm() is None and late_only.to_dict()["median_min_norm"] is None
    assert "median min-norm distance: none" in reports.format_table(late_only)
    assert "inf" not in reports.format_table(late_only).split("median min-norm")[1]


def test_min_norm_distance_agrees_with_the_eps_results(full_and_cascade):
    full, _ = full_and_cascade
    d = full.min_norm_dist["fmn"]
    cc = full.clean_correct
    assert np.isfinite(d[cc]).any()
    for e in full.eps_values:
        # An example FMN broke at eps has a distance <= eps, and vice versa.
        broke = cc & (full.pred["fmn"][e] != full.labels)
        np.testing.assert_array_equal(broke, cc & (d <= e))
    med = full.median_min_norm()
    best = np.minimum(d, full.min_norm_dist["fab-t"])
    assert med == pytest.approx(float(np.median(np.where(np.isnan(best), np.inf, best)[cc])))
    assert full.to_dict()["median_min_norm"] == med
    assert full.to_dict()["attacks"]["fmn"]["median_min_norm"] == full.median_min_norm("fmn")


def test_per_image_flags_are_consistent_with_accuracies(full_and_cascade, tmp_path):
    for res in full_and_cascade:
        arrays = res.per_image()
        assert list(arrays["attacks"]) == list(res.pred)
        np.testing.assert_array_equal(arrays["clean_pred"], res.clean_pred)
        payload = res.to_dict()
        for e in res.eps_values:
            assert arrays[f"worst_robust/{e}"].mean() == payload["worst_case_accuracy"][str(e)]
            for a in res.pred:
                robust = arrays[f"robust/{a}/{e}"]
                assert robust.mean() == payload["attacks"][a]["accuracy"][str(e)]
                assert not (robust & ~arrays[f"attacked/{a}/{e}"]).any()
            b = arrays[f"breaker/{e}"]
            np.testing.assert_array_equal(b == -1, arrays[f"worst_robust/{e}"])
            np.testing.assert_array_equal(b == -2, ~res.clean_correct)
            for i, a in enumerate(res.pred):
                assert payload["broken_by"][str(e)][a] == int((b == i).sum())
    full, cascade = full_and_cascade
    path = tmp_path / "results_per_image.npz"
    reports.save_per_image([full, cascade], path)
    with np.load(path) as z:
        assert list(z["models"]) == ["r", "r#1"]
        np.testing.assert_array_equal(z["r/worst_robust/0.245"], full.worst_correct(0.245))
        np.testing.assert_array_equal(z["r#1/breaker/0.3"], cascade.breaker(0.3))
        np.testing.assert_array_equal(z["r/labels"], full.labels)
        np.testing.assert_array_equal(z["r/min_norm/fmn"], full.min_norm_dist["fmn"])
    table = reports.format_table(cascade)
    assert "cascade" in table and "median min-norm" in table and "broke" in table


def test_autoattack_preset_contents():
    linf = evaluation.autoattack_suite("linf")
    assert [s.name for s in linf] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    kw = {s.name: s.fn.keywords for s in linf}
    assert kw["apgd-ce"]["steps"] == 100 and kw["apgd-ce"]["restarts"] == 1
    assert kw["apgd-ce"].get("loss", "ce") == "ce"
    assert kw["apgd-t"]["steps"] == 100 and kw["apgd-t"]["n_target_classes"] == 9
    assert kw["fab-t"]["steps"] == 100 and kw["fab-t"]["n_target_classes"] == 9
    assert kw["square"]["queries"] == 5000
    assert all(k["norm"] == "linf" for k in kw.values())
    assert [s.min_norm for s in linf] == [False, False, True, False]
    l2 = evaluation.autoattack_suite("l2")
    assert [s.name for s in l2] == ["apgd-ce", "apgd-t", "fab-t"]
    assert all(s.fn.keywords["norm"] == "l2" for s in l2)
    quick = evaluation.autoattack_suite("linf", apgd_steps=5, square_queries=20)
    assert quick[0].fn.keywords["steps"] == 5 and quick[3].fn.keywords["queries"] == 20


def test_strong_suite_has_min_norm_and_es():
    assert {"fmn", "apgd-t", "fab-t", "es"} <= set(evaluation.STRONG_SUITE)
    assert evaluation.default_suite("strong") == evaluation.STRONG_SUITE
    es = {s.name: s for s in evaluation.build_suite(evaluation.STRONG_SUITE, budget="strong")}
    assert es["es"].fn.keywords["schedule"] == suites.ES_SCHEDULE_CPU
    full = evaluation.build_suite(["es"], budget={"es_schedule": attacks.ES_SCHEDULE})
    assert full[0].fn.keywords["schedule"] == attacks.ES_SCHEDULE
    with pytest.raises(ValueError, match="mode"):
        x, y, _ = toy_data(4)
        evaluation.run_suite(toy_models(relu_model()), x, y, suite=[], eps_values=[0.1],
                             mode="fast", progress=False)  # fmt: skip


def test_cascade_stage_with_nothing_left_is_not_run():
    # At eps = 1 PGD breaks every example: the next stage has nothing to attack.
    x, y, _ = toy_data(16, seed=2)
    res = evaluation.run_suite(
        toy_models(relu_model(), name="r"), x, y,
        suite=evaluation.build_suite(["pgd", "fgsm", "fmn"], budget="quick"), eps_values=[1.0],
        batch_size=8, progress=False, mode="cascade",
    )  # fmt: skip
    assert res.worst_accuracy(1.0) == 0.0 and res.accuracy("pgd", 1.0) == 0.0
    assert res.compile_s["fgsm"] == 0.0 and not res.attacked["fgsm"][1.0].any()
    assert (res.pred["fgsm"][1.0] == -1).all()
    # The minimum-norm attack still runs on every clean-correct example (its distances).
    assert res.compile_s["fmn"] > 0 and np.isfinite(res.min_norm_dist["fmn"]).all()
    assert res.broken_by(1.0) == {"pgd": int(res.clean_correct.sum()), "fgsm": 0, "fmn": 0}


def test_every_attack_runs_in_the_suite_with_traced_eps():
    # The suite compiles each attack once with eps a traced argument: every attack of the
    # table must trace that way (es sets its smoothing sigma to eps).
    x, y, _ = toy_data(8, seed=4)
    models = toy_models(masked_model(), bpda=masked_model(bpda=True), source=relu_model(),
                        name="step")  # fmt: skip
    res = evaluation.run_suite(
        models, x, y, suite=evaluation.build_suite(["all"], budget="quick"),
        eps_values=[0.4], batch_size=8, progress=False, mode="cascade",
    )  # fmt: skip
    assert set(res.pred) == set(evaluation.ATTACKS) and not res.skipped
    # The masked model: white-box PGD fails, and es (a forward-only attack) breaks it.
    es_alone = evaluation.run_suite(
        models, x, y, suite=evaluation.build_suite(
            ["pgd", "es"], budget={"pgd_steps": 10, "es_schedule": ((5, 8), (5, 32))}),
        eps_values=[0.4], batch_size=8, progress=False, mode="full",
    )  # fmt: skip
    assert es_alone.accuracy("pgd", 0.4) >= 0.9
    assert es_alone.accuracy("es", 0.4) <= 0.25

"""Suite runner: worst case <= every attack, chunking does not change results, reporting."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attacks_adaptive import masked_model, relu_model, toy_data

from kwta_jax import evaluation, reports
from kwta_jax.attacks import AttackInvariantError


@pytest.fixture(scope="module")
def relu_result():
    x, y, _ = toy_data(40, seed=5)
    suite = evaluation.build_suite(["fgsm", "pgd", "square", "transfer"], budget="quick")
    models = evaluation.Models(relu_model(), source_logits_fn=masked_model(bpda=True), name="r")
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
        evaluation.Models(relu_model(), name="plain"), x[:8], y[:8],
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
            evaluation.Models(relu_model()), x, y, suite=[bad], eps_values=[0.1],
            progress=False,
        )  # fmt: skip


def test_validation_errors():
    x, y, _ = toy_data(4)
    with pytest.raises(ValueError, match="unknown attack"):
        evaluation.build_suite(["pgd", "nope"])
    with pytest.raises(ValueError, match="budget"):
        evaluation.build_suite(["pgd"], budget="huge")
    with pytest.raises(ValueError, match="eps values must be > 0"):
        evaluation.run_suite(
            evaluation.Models(relu_model()), x, y, suite=[], eps_values=[0.0], progress=False
        )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluation.run_suite(
            evaluation.Models(relu_model()), x + 2, y, suite=[], eps_values=[0.1],
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
    np.testing.assert_allclose(m.bpda_logits_fn(x), m.logits_fn(x), rtol=1e-6)
    g_exact = jax.grad(lambda v: m.logits_fn(v).sum())(x)
    g_bpda = jax.grad(lambda v: m.bpda_logits_fn(v).sum())(x)
    assert not np.allclose(g_exact, g_bpda)  # identity backward differs from the mask
    assert evaluation.models_from_nnx(MLP(jax.nn.relu, nnx.Rngs(0))).bpda_logits_fn is None

"""Gradient-masking diagnostics fire on a step-function model and stay quiet on a ReLU MLP,
in full mode and in cascade mode (comparisons on a sample); a check that did not run is never
reported as "no sign of masking"."""

import numpy as np
import pytest
from test_attacks_adaptive import masked_model, relu_model, toy_data
from test_evaluation import toy_models

from kwta_jax import attacks, diagnostics, evaluation, reports

SUITE = ["fgsm", "pgd", "square", "bpda", "transfer"]
BUDGET = {**evaluation.BUDGETS["quick"], "pgd_steps": 10}


def _run(models, mode="full", n=32, names=SUITE):
    x, y, _ = toy_data(n, seed=7)
    suite = evaluation.build_suite(names, budget=BUDGET)
    res = evaluation.run_suite(
        models, x, y, suite=suite, eps_values=[0.3, 0.4], batch_size=32, mode=mode
    )
    diagnosis = diagnostics.run_diagnostics(
        models, res, x, y, suite=suite, n_large=32, n_compare=32, batch_size=32
    )
    return res, diagnosis


def _masked():
    return toy_models(masked_model(), bpda=masked_model(bpda=True), source=relu_model(),
                      name="step")  # fmt: skip


@pytest.fixture(scope="module")
def masked():
    return _run(_masked())


def test_masked_model_is_flagged(masked):
    res, diagnosis = masked
    # White-box gradient attacks see a zero gradient and fail; adaptive ones succeed.
    assert res.accuracy("pgd", 0.4) >= 0.9 and res.accuracy("fgsm", 0.4) >= 0.9
    assert res.accuracy("bpda", 0.4) <= 0.1 and res.accuracy("square", 0.4) <= 0.3
    assert res.worst_accuracy(0.4) <= 0.1
    assert diagnosis["zero_input_gradient"].fired
    assert diagnosis["zero_input_gradient"].value == 1.0
    assert diagnosis["flat_loss_along_gradient"].fired
    assert diagnosis["bpda_beats_pgd"].fired
    assert diagnosis["square_beats_pgd"].fired
    assert diagnosis["transfer_beats_pgd"].fired
    assert diagnosis["large_eps_not_broken"].fired
    assert diagnosis.complete
    text = reports.format_flags(diagnosis, "step")
    assert "[FLAG] zero_input_gradient" in text and "gradient masking likely" in text


def test_cascade_runs_the_comparisons_on_a_sample_and_flags_the_same():
    res, diagnosis = _run(_masked(), mode="cascade")
    assert res.mode == "cascade" and diagnosis.complete
    assert diagnosis["square_beats_pgd"].fired and diagnosis["bpda_beats_pgd"].fired
    assert any("full mode at eps=0.3 on a stratified sample of 32" in n for n in diagnosis.notes)
    assert "no sign" not in reports.format_flags(diagnosis)


@pytest.mark.parametrize("mode", ["full", "cascade"])
def test_plain_relu_model_is_not_flagged(mode):
    models = toy_models(relu_model(), source=masked_model(bpda=True), name="r")
    res, diagnosis = _run(models, mode=mode)
    assert res.accuracy("pgd", 0.4) <= 0.05  # attacks work on it
    assert [f.name for f in diagnosis.fired] == []
    # BPDA is skipped (no k-WTA), but square and transfer make the comparison possible.
    assert diagnosis.complete, diagnosis.skipped
    assert "every check ran: no sign of gradient masking" in reports.format_flags(diagnosis)


def test_a_custom_attack_takes_part_by_its_kind():
    # A gradient-free attack the library does not know: a plain random search.
    def random_search(logits_fn, x, y, key, *, eps):
        return attacks.square(logits_fn, x, y, key, eps=eps, queries=20)

    custom = evaluation.AttackSpec("my-search", "gradient-free", random_search)
    x, y, _ = toy_data(16, seed=7)
    suite = evaluation.build_suite(["fgsm", "pgd"], budget=BUDGET) + [custom]
    res = evaluation.run_suite(
        toy_models(masked_model()), x, y, suite=suite, eps_values=[0.4], mode="full"
    )
    diagnosis = diagnostics.gradient_masking_flags(res)
    assert diagnosis["my-search_beats_pgd"].fired


def test_skipped_checks_are_never_called_no_sign():
    models = toy_models(relu_model(), name="r")
    _, diagnosis = _run(models, names=["fgsm", "pgd"])  # nothing that avoids the gradient
    assert not diagnosis.fired and not diagnosis.complete
    assert "non_gradient_beats_white_box" in diagnosis.skipped
    text = reports.format_flags(diagnosis)
    assert "no sign" not in text and "no evidence against gradient masking" in text
    assert "[skip] non_gradient_beats_white_box" in text


def _synthetic_result(mode: str = "full") -> evaluation.EvalResult:
    """FGSM breaks half at 0.1 and all at 0.2; PGD half at 0.1 and none at 0.2."""
    labels = np.zeros(10, np.int64)
    right, wrong = np.zeros(10, np.int64), np.ones(10, np.int64)
    half = np.r_[np.zeros(5), np.ones(5)].astype(np.int64)
    return evaluation.EvalResult(
        name="m", norm="linf", eps_values=[0.1, 0.2], labels=labels, clean_pred=right,
        pred={"fgsm": {0.1: half, 0.2: wrong}, "pgd": {0.1: half, 0.2: right}},
        seconds={}, compile_s={}, kinds={"fgsm": "single-step", "pgd": "white-box"},
        skipped={}, examples={}, clean_examples=np.zeros((0, 1, 1, 1)), mode=mode,
    )  # fmt: skip


def test_flag_logic_on_synthetic_results():
    # Accuracy rising with eps and PGD weaker than FGSM must both fire.
    diagnosis = diagnostics.gradient_masking_flags(_synthetic_result())
    assert diagnosis["iterative_weaker_than_single_step"].fired
    assert diagnosis["iterative_weaker_than_single_step"].value == pytest.approx(1.0)
    assert diagnosis["accuracy_not_decreasing_with_eps"].fired
    assert diagnosis["accuracy_not_decreasing_with_eps"].value == pytest.approx(0.5)


def test_a_cascade_alone_reports_its_comparison_checks_as_skipped():
    # The synthetic result above read as a cascade, with no comparison table: the eps check
    # reads the worst case (which falls with eps here), and the comparisons are skipped.
    diagnosis = diagnostics.gradient_masking_flags(_synthetic_result(mode="cascade"))
    assert [f.name for f in diagnosis.flags] == ["accuracy_not_decreasing_with_eps"]
    assert not diagnosis.flags[0].fired
    assert set(diagnosis.skipped) == {
        "iterative_weaker_than_single_step", "non_gradient_beats_white_box",
        "large_eps_not_broken", "zero_input_gradient", "flat_loss_along_gradient",
        "discontinuous_loss",
    }  # fmt: skip


def test_a_discontinuous_model_is_flagged_and_a_continuous_one_not():
    """A jump across a threshold that the data straddle (k-WTA-like), against the same model
    made continuous: only the first jumps over small steps."""
    x, y, protos = toy_data(64, seed=9)
    templates = np.asarray(2.0 * protos - 1.0, np.float32).T

    def make(step):
        def logits_fn(v):
            v = v.reshape(v.shape[0], -1)
            h = v + 0.5 * (v > 0.5 + 0.01 * np.arange(64)) if step else v
            return h @ templates

        return toy_models(logits_fn)

    for step in (True, False):
        stats = diagnostics.gradient_statistics(make(step), x, y, eps=0.5, key=0)
        assert (stats["jump_share"] > 0.05) == step, stats

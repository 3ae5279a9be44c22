"""Gradient-masking diagnostics fire on a step-function model and stay quiet on a ReLU MLP."""

import numpy as np
import pytest
from test_attacks_adaptive import masked_model, relu_model, toy_data

from kwta_jax import diagnostics, evaluation, reports

SUITE = ["fgsm", "pgd", "square", "bpda", "transfer"]


def _run(models, n=32):
    x, y, _ = toy_data(n, seed=7)
    suite = evaluation.build_suite(SUITE, budget={**evaluation.BUDGETS["quick"], "pgd_steps": 10})
    res = evaluation.run_suite(
        models, x, y, suite=suite, eps_values=[0.3, 0.4], batch_size=32, progress=False
    )
    flags = diagnostics.run_diagnostics(models, res, x, y, n_large=32, batch_size=32)
    return res, {f.name: f for f in flags}


@pytest.fixture(scope="module")
def masked():
    models = evaluation.Models(
        masked_model(), bpda_logits_fn=masked_model(bpda=True), source_logits_fn=relu_model(),
        name="step",
    )  # fmt: skip
    return _run(models)


def test_masked_model_is_flagged(masked):
    res, flags = masked
    # White-box gradient attacks see a zero gradient and fail; adaptive ones succeed.
    assert res.accuracy("pgd", 0.4) >= 0.9 and res.accuracy("fgsm", 0.4) >= 0.9
    assert res.accuracy("bpda", 0.4) <= 0.1 and res.accuracy("square", 0.4) <= 0.3
    assert res.worst_accuracy(0.4) <= 0.1
    assert flags["zero_input_gradient"].fired and flags["zero_input_gradient"].value == 1.0
    assert flags["flat_loss_along_gradient"].fired
    assert flags["bpda_beats_pgd"].fired
    assert flags["square_beats_pgd"].fired
    assert flags["transfer_beats_pgd"].fired
    assert flags["large_eps_not_broken"].fired
    text = reports.format_flags(list(flags.values()), "step")
    assert "[FLAG] zero_input_gradient" in text and "gradient masking likely" in text


def test_plain_relu_model_is_not_flagged():
    models = evaluation.Models(relu_model(), source_logits_fn=masked_model(bpda=True), name="r")
    res, flags = _run(models)
    assert res.accuracy("pgd", 0.4) <= 0.05  # attacks work on it
    fired = [f.name for f in flags.values() if f.fired]
    assert fired == [], fired
    assert len(flags) >= 7  # every check ran
    text = reports.format_flags(list(flags.values()))
    assert "no flag fired" in text


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
    res = _synthetic_result()
    flags = {f.name: f for f in diagnostics.gradient_masking_flags(res)}
    assert flags["iterative_weaker_than_single_step"].fired
    assert flags["iterative_weaker_than_single_step"].value == pytest.approx(1.0)
    assert flags["accuracy_not_decreasing_with_eps"].fired
    assert flags["accuracy_not_decreasing_with_eps"].value == pytest.approx(0.5)


def test_cascade_result_gets_only_the_flags_that_do_not_compare_attacks():
    # The synthetic result above read as a cascade: no attack-ordering flag, and the eps
    # check reads the worst case (which falls with eps here), so nothing fires.
    res = _synthetic_result(mode="cascade")
    flags = {f.name: f for f in diagnostics.gradient_masking_flags(res)}
    assert set(flags) == {"accuracy_not_decreasing_with_eps"}
    assert not flags["accuracy_not_decreasing_with_eps"].fired

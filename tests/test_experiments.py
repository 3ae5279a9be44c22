"""The write-up's experiment presets, and experiment 6 end to end at reduced size."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kwta_jax import experiment_workflow, experiments


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_presets_are_valid_training_configs(name):
    exp = experiments.get_experiment(name)
    for act in exp.acts:
        dataclasses.replace(exp.config, act=act).validate()
    assert set(exp.fgsm_eps) <= set(exp.eps)
    assert "clean" in exp.writeup and all(f"fgsm {e:g}" in exp.writeup for e in exp.fgsm_eps)
    for relu, kwta in exp.writeup.values():
        assert 0 <= relu <= 1 and 0 <= kwta <= 1


def test_unknown_experiment_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown experiment 'seed-9'.*seed-1"):
        experiments.get_experiment("seed-9")


def test_overrides_keep_unset_fields():
    exp = experiments.get_experiment("seed-3").with_overrides(epochs=2, data_dir=None)
    assert exp.config.epochs == 2 and exp.config.conv_ratio == 0.7


@pytest.mark.slow
def test_experiment_6_end_to_end_at_reduced_size(tmp_path):
    exp = experiments.get_experiment("seed-6").with_overrides(epochs=1, max_train=300)
    attacks = ("fgsm", "pgd", "bpda", "transfer")
    report = experiment_workflow.run_experiment(
        exp, tmp_path, attacks=attacks, budget="quick", n_examples=64, progress=False,
        log=lambda _: None,
    )  # fmt: skip

    for name in ("table.md", "experiment.json", "accuracy_vs_eps.png", "relu", "kwta"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "experiment.json").read_text())["experiment"] == "seed-6"

    labels = [row["label"] for row in report["rows"]]
    assert labels[:4] == ["clean", "FGSM eps=0.1", "FGSM eps=0.15", "FGSM eps=0.2"]
    assert {f"worst case eps={e:g}" for e in exp.eps} <= set(labels)
    for row in report["rows"]:
        for acc in row["ours"]:
            assert acc is None or 0.0 <= acc <= 1.0
    assert report["rows"][1]["writeup"] == (0.8358, 0.9581)

    payload = json.loads((tmp_path / "attack" / "results.json").read_text())
    for run in payload["runs"]:
        for eps, worst in run["worst_case_accuracy"].items():
            assert worst <= run["clean_accuracy"]
            for attack in run["attacks"].values():
                assert worst <= attack["accuracy"][eps]
    worst_rows = [r for r in report["rows"] if r["metric"] == "worst"]
    pgd_rows = [r for r in report["rows"] if r["metric"] == "pgd"]
    for worst, pgd in zip(worst_rows, pgd_rows, strict=True):
        assert all(w <= p for w, p in zip(worst["ours"], pgd["ours"], strict=True))

    table = (tmp_path / "table.md").read_text()
    assert "| FGSM eps=0.1 | 0.8358 | 0.9581 |" in table
    assert "Gradient-masking flags (kwta):" in table

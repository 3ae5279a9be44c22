"""Messages of issue 13 item 5 outside train.py: the benchmark's help names its default shapes,
and the masking diagnostic does not claim that EOT ignores the model's gradient."""

from __future__ import annotations

import numpy as np
import pytest

from kwta_jax import benchmark, diagnostics


def test_benchmark_help_lists_the_default_shapes(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "issue" not in text
    shapes = " ".join("x".join(map(str, s)) for s in benchmark.DEFAULT_SHAPES)
    assert len(benchmark.DEFAULT_SHAPES) >= 5 and f"(default: {shapes})" in text


class _Result:
    """The part of an EvalResult the adaptive flags read: EOT beats PGD."""

    pred = {"pgd": None, "eot": None, "transfer": None}
    kinds = {"pgd": "gradient", "eot": "eot", "transfer": "transfer"}
    eps_values = [0.1]

    def accuracy(self, attack, eps):
        return {"pgd": 0.8, "eot": 0.2, "transfer": 0.3}[attack]

    def worst_correct(self, eps, names):
        return np.ones(4, bool)

    def correct(self, attack, eps):
        return np.zeros(4, bool)


def test_the_eot_masking_flag_says_eot_uses_the_model_gradient():
    flags = {f.name: f for f in diagnostics._non_gradient_flags(_Result(), ["pgd"], 0.05)}
    eot, transfer = flags["eot_beats_pgd"], flags["transfer_beats_pgd"]
    assert "does not use the model's own gradient" not in eot.explanation
    assert "averages the model's gradient" in eot.explanation
    assert "does not use the model's own gradient" in transfer.explanation

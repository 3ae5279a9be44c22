"""The README's "Evaluate your own model" example runs exactly as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(heading: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_evaluate_your_own_model_first_example_runs(capsys):
    blocks = _section_blocks("Evaluate your own model")
    assert len(blocks) >= 2
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    result = namespace["result"]
    out = capsys.readouterr().out
    assert re.search(r"clean 0\.\d{3}, AutoAttack 0\.\d{3}", out), out[-500:]
    assert result.clean_accuracy > 0.8  # the example trains a real model
    assert result.worst_accuracy(0.1) < result.clean_accuracy
    assert list(result.pred) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert result.x_adv[0.1].shape == (100, 28, 28, 1)

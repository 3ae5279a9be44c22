"""The documentation's examples run exactly as written: the README's "Evaluate your own
model" example and docs/attacks.md's custom attack."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path, heading: str) -> list[str]:
    """The ```python blocks of the section under ``heading`` (any level) of a Markdown file."""
    text = path.read_text()
    match = re.search(rf"^(#+) {re.escape(heading)}\n", text, flags=re.M)
    assert match, f"{path.name}: no section {heading!r}"
    level = len(match.group(1))
    section = re.split(rf"^#{{1,{level}}} ", text[match.end() :], flags=re.M)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _run(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "example", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.slow
def test_readme_evaluate_your_own_model_first_example_runs(capsys):
    blocks = _python_blocks(ROOT / "README.md", "Evaluate your own model")
    assert len(blocks) >= 2
    result = _run(blocks[0])["result"]
    out = capsys.readouterr().out
    assert re.search(r"clean 0\.\d{3}, AutoAttack 0\.\d{3}", out), out[-500:]
    assert result.clean_accuracy > 0.8  # the example trains a real model
    assert result.worst_accuracy(0.1) < result.clean_accuracy
    assert list(result.pred) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert result.x_adv[0.1].shape == (100, 28, 28, 1)


def test_attacks_md_custom_attack_example_runs():
    (block,) = _python_blocks(ROOT / "docs" / "attacks.md", "A custom attack")
    result = _run(block)["result"]
    assert list(result.pred) == ["fgsm", "pgd-dlr-cosine", "square"]
    assert result.kinds["pgd-dlr-cosine"] == "white-box"
    assert result.worst_accuracy(0.05) < 1.0  # the attacks break something

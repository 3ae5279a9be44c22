"""attack.py: argument validation without tracebacks, and an end-to-end run."""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attack  # noqa: E402
from kwta_jax import attack_workflow, suites  # noqa: E402
from kwta_jax.results import EvalResult  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}", "--attacks", "pgd", "nope"], "unknown attack(s) ['nope']"),
        (["{tmp}", "--eps", "0.1", "0"], "--eps values must be > 0"),
        (["{tmp}/missing"], "does not exist"),
        (["{tmp}", "--n-examples", "0"], "must be positive"),
        (["{tmp}", "--norm", "l2", "--attacks", "square"], "square is L-inf only"),
        (["{tmp}", "--preset", "autoattack", "--attacks", "pgd"], "are exclusive"),
        (["{tmp}", "--mode", "fast"], "invalid choice: 'fast'"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        # As the shell runs it: the run directory is probed at start-up, not in parse_args.
        sys.exit(attack.main([a.format(tmp=tmp_path) for a in argv]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_dir_without_loadedis_a_clean_error(tmp_path, capsys):
    assert attack.main([str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def _fake_training_modules(monkeypatch, tmp_path):
    """Stand-ins for kwta_jax.runs.load_trained_model / kwta_jax.data.load_dataset with the
    contract's signatures: a ReLU and a k-WTA MLP on toy 8x8 images, so the CLI path is
    tested without train.py."""
    from flax import nnx
    from test_attacks_adaptive import toy_data

    from kwta_jax import data, runs
    from kwta_jax.layers import KWTA

    class MLP(nnx.Module):
        def __init__(self, act):
            rngs = nnx.Rngs(0)
            self.l1, self.act, self.l2 = (
                nnx.Linear(64, 32, rngs=rngs),
                act,
                nnx.Linear(32, 4, rngs=rngs),
            )

        def __call__(self, x):
            return self.l2(self.act(self.l1(x.reshape(x.shape[0], -1))))

    loaded = {}
    for act in ("relu", "kwta"):
        run = tmp_path / "runs" / act
        run.mkdir(parents=True)
        config = {"dataset": "mnist-toy", "model": "mlp", "act": act, "ratio": 0.25, "seed": 0,
                  "data_dir": None}  # fmt: skip
        (run / "config.json").write_text(json.dumps(config))
        loaded[run.name] = (MLP(nnx.relu if act == "relu" else KWTA(0.25)), config)

    x, y, _ = toy_data(32, seed=3)
    monkeypatch.setattr(runs, "load_trained_model", lambda run_dir: loaded[Path(run_dir).name])
    monkeypatch.setattr(
        data,
        "load_dataset",
        lambda name, *, data_dir=None, seed=0: types.SimpleNamespace(
            test_images=x, test_labels=y, num_classes=4, name=name
        ),
    )
    return tmp_path / "runs"


def test_cli_end_to_end_on_stand_in_runs(monkeypatch, tmp_path, capsys):
    runs = _fake_training_modules(monkeypatch, tmp_path)
    out = tmp_path / "out"
    argv = [str(runs), "--quick", "--attacks", "fgsm", "bpda", "transfer", "--eps",
            "0.1", "0.3", "--batch-size", "16", "--out", str(out), "--no-progress"]  # fmt: skip
    assert attack.main(argv) == 0
    text = capsys.readouterr().out
    assert "worst case (all attacks)" in text and "gradient-masking diagnostics" in text
    payload = json.loads((out / "results.json").read_text())
    by_act = {r["config"]["act"]: r for r in payload["runs"]}
    # The ReLU run is the transfer surrogate of the k-WTA run, and has no BPDA copy.
    assert set(by_act["kwta"]["attacks"]) == {"fgsm", "bpda", "transfer"}
    assert set(by_act["relu"]["skipped"]) == {"bpda", "transfer"}
    for r in payload["runs"]:
        worst = r["worst_case_accuracy"]["0.3"]
        assert all(worst <= a["accuracy"]["0.3"] for a in r["attacks"].values())
        flags = r["diagnostics"]["flags"]
        assert flags and all("explanation" in f for f in flags)
        # The default subset is class-balanced, and results.json says which examples.
        assert payload["subset"] == "stratified" and len(r["indices"]) == r["n_examples"]
    assert (out / "accuracy_vs_eps.png").is_file() and (out / "examples_kwta.png").is_file()
    # Every result is saved whole, the worst-case adversarials included.
    res = EvalResult.load(out / "kwta.result.npz")
    assert res.to_dict()["worst_case_accuracy"] == by_act["kwta"]["worst_case_accuracy"]
    assert res.x_adv[0.3].shape == (by_act["kwta"]["n_examples"], 8, 8, 1)


def test_cli_cascade_full_per_image_and_preset(monkeypatch, tmp_path, capsys):
    runs = _fake_training_modules(monkeypatch, tmp_path)
    common = ["--quick", "--eps", "0.1", "0.3", "--batch-size", "16", "--no-progress",
              "--no-diagnostics"]  # fmt: skip
    payloads = {}
    for mode in ("full", "cascade"):
        out = tmp_path / mode
        argv = [str(runs), "--attacks", "fgsm", "fmn", "--mode", mode, "--out", str(out)]
        assert attack.main(argv + common) == 0
        payloads[mode] = json.loads((out / "results.json").read_text())
        assert payloads[mode]["mode"] == mode and payloads[mode]["devices"] >= 1
        with np.load(out / "results_per_image.npz") as z:
            names = list(z["models"])
            assert len(names) == 2
            for name, r in zip(names, payloads[mode]["runs"], strict=True):
                assert r["mode"] == mode and r["median_min_norm"] is not None
                for e in ("0.1", "0.3"):
                    worst = z[f"{name}/worst_robust/{e}"]
                    assert worst.mean() == pytest.approx(r["worst_case_accuracy"][e])
                    breaker = z[f"{name}/breaker/{e}"]
                    assert int((breaker == 0).sum()) == r["broken_by"][e]["fgsm"]
                assert np.isfinite(z[f"{name}/min_norm/fmn"]).any()
    text = capsys.readouterr().out
    assert "mode cascade" in text and "median min-norm distance" in text
    # FGSM and FMN are deterministic: the cascade's worst case is the full table's.
    for rf, rc in zip(payloads["full"]["runs"], payloads["cascade"]["runs"], strict=True):
        assert rf["worst_case_accuracy"] == rc["worst_case_accuracy"]
        assert rf["median_min_norm"] == rc["median_min_norm"]

    out = tmp_path / "aa"
    argv = [str(runs), "--preset", "autoattack", "--out", str(out)] + common
    assert attack.main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["preset"] == "autoattack" and payload["mode"] == "cascade"
    assert payload["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(payload["runs"][0]["attacks"]) == payload["attacks"]


@pytest.mark.slow
def test_cli_end_to_end_on_a_real_train_py_run(tmp_path):
    train = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "runs"), "--epochs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    res = subprocess.run(
        [sys.executable, str(ROOT / "attack.py"), str(tmp_path / "runs"), "--quick",
         "--n-examples", "64", "--attacks", "fgsm", "pgd", "bpda", "transfer", "square",
         "--no-progress", "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "worst case (all attacks)" in res.stdout
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(payload["runs"]) == 2
    assert np.isfinite([r["clean_accuracy"] for r in payload["runs"]]).all()
    # The default (cascade) run flags gradient masking on k-WTA, and on ReLU every check runs
    # and none fires.
    diagnosis = {r["config"]["act"]: r["diagnostics"] for r in payload["runs"]}
    fired = {act: [f["name"] for f in d["flags"] if f["fired"]] for act, d in diagnosis.items()}
    assert "discontinuous_loss" in fired["kwta"], fired
    assert fired["relu"] == [] and diagnosis["relu"]["complete"], diagnosis["relu"]
    assert "gradient masking likely" in res.stdout and "no sign of gradient masking" in res.stdout
    # This suite has no es: the flagged model's worst case is called an upper bound, once.
    notes = [line for line in res.stdout.splitlines() if line.startswith("note: gradient masking")]
    assert len(notes) == 1 and "kwta" in notes[0] and "relu" not in notes[0], notes
    assert "--budget strong" in notes[0]


@pytest.mark.parametrize("with_es", [False, True])
def test_the_upper_bound_note_names_flagged_runs_only_without_es(with_es):
    def run(name, fired):
        return types.SimpleNamespace(name=name, diagnostics={"flags": [{"fired": fired}]})

    names = ["fgsm", "pgd", "es"] if with_es else ["fgsm", "pgd"]
    suite = suites.resolve_suite(names, norm="linf", budget="quick")
    note = attack_workflow._without_es_note([run("masked", True), run("plain", False)], suite)
    assert (note == "") == with_es
    if not with_es:
        assert "masked" in note and "plain" not in note and "upper bound" in note
    assert attack_workflow._without_es_note([run("plain", False)], suite) == ""

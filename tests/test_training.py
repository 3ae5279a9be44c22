"""Training: config validation, schedules, the jitted step (padding, perturbation hook),
annealing, the run directory, the ReLU-vs-k-WTA comparison and the train.py CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kwta_jax import data
from kwta_jax.experiment_workflow import plan_experiments
from kwta_jax.layers import KWTA, iter_kwta_layers
from kwta_jax.models import build_model_from_config, split_model
from kwta_jax.reports import format_comparison
from kwta_jax.runs import RunDirError, check_run_dir, load_trained_model, read_config
from kwta_jax.train_workflow import make_pgd_perturb, run_comparison, train_and_evaluate
from kwta_jax.training import TrainConfig, TrainState, anneal_ratio, create_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def tiny_data():
    return data.load_dataset("mnist5k", max_train=512, max_test=128)


# --------------------------------------------------------------------------------------------
# Config, schedules, optimizers.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dataset", "imagenet", "unknown dataset"),
        ("model", "vgg", "unknown model"),
        ("act", "tanh", "unknown activation"),
        ("ratio", 0.0, r"ratio must be in \(0, 1\]"),
        ("ratio", 1.5, r"ratio must be in \(0, 1\]"),
        ("batch_size", 0, "batch size must be >= 1"),
        ("epochs", 0, "epochs must be >= 1"),
        ("lr", -1.0, "learning rate"),
        ("optimizer", "rmsprop", "unknown optimizer"),
        ("anneal", (0.2, 0.0, 1), "anneal ratios"),
        ("adv_eps", -0.1, "eps must be >= 0"),
    ],
)  # fmt: skip
def test_validate_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value}).resolved().validate()


def test_resolved_defaults_per_model():
    mlp = TrainConfig(model="mlp").resolved()
    assert (mlp.optimizer, mlp.lr, mlp.weight_decay) == ("adam", 1e-3, 0.0)
    res = TrainConfig(model="resnet18", dataset="cifar10").resolved()
    assert (res.optimizer, res.lr, res.weight_decay) == ("sgd", 0.1, 5e-4)
    annealed = TrainConfig(anneal=(0.2, 0.1, 2)).resolved()
    assert annealed.ratio == 0.1
    adv = TrainConfig(adv_eps=0.3, adv_steps=10).resolved()
    assert adv.adv_step_size == pytest.approx(0.075)
    assert TrainConfig.from_dict(annealed.to_dict()) == annealed


def test_anneal_schedule_steps_every_n_epochs_to_the_end_ratio():
    cfg = TrainConfig(epochs=10, anneal=(0.2, 0.1, 2)).resolved()
    assert [anneal_ratio(cfg, e) for e in range(10)] == [
        0.2, 0.2, 0.175, 0.175, 0.15, 0.15, 0.125, 0.125, 0.1, 0.1
    ]  # fmt: skip
    assert anneal_ratio(TrainConfig(ratio=0.3), 7) == 0.3
    one_stage = TrainConfig(epochs=2, anneal=(0.5, 0.1, 5)).resolved()
    assert anneal_ratio(one_stage, 0) == 0.1


def test_sgd_uses_the_piecewise_schedule_and_weight_decay():
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, epochs=4)
    tx = create_optimizer(cfg, steps_per_epoch=10)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    seen = []
    for _ in range(40):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        seen.append(float(updates["w"]))
    np.testing.assert_allclose(seen[0], -0.1, rtol=1e-6)
    np.testing.assert_allclose(seen[20], -0.01, rtol=1e-5)  # x0.1 at 50%
    np.testing.assert_allclose(seen[30], -0.001, rtol=1e-4)  # x0.1 again at 75%
    wd = create_optimizer(dataclasses_replace(cfg, weight_decay=0.5), 10)
    updates, _ = wd.update({"w": jnp.zeros(())}, wd.init({"w": jnp.ones(())}), {"w": jnp.ones(())})
    np.testing.assert_allclose(float(updates["w"]), -0.05, rtol=1e-6)  # -lr * wd * w


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# --------------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------------


def _state(act="relu", ratio=0.1):
    kwargs = dict(act=act, ratio=ratio, num_classes=10, input_shape=[28, 28, 1])
    cfg = {"model": "mlp", "seed": 0, "model_kwargs": kwargs}
    model = build_model_from_config(cfg)
    graphdef, params, rest = split_model(model)
    tx = optax.adam(1e-3)
    state = TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), jax.random.key(0))
    return graphdef, tx, state


def _batch(x, y, w=None):
    w = np.ones(len(y), np.float32) if w is None else w
    return {"image": jnp.asarray(x), "label": jnp.asarray(y), "weight": jnp.asarray(w)}


def test_padding_with_zero_weight_does_not_change_the_step(tiny_data):
    graphdef, tx, state = _state()
    step = jax.jit(lambda s, b: train_step(graphdef, tx, s, b))
    x, y = tiny_data.train_images[:6], tiny_data.train_labels[:6]
    junk = np.random.default_rng(0).random((4, 28, 28, 1), np.float32)
    padded = _batch(np.concatenate([x, junk]), np.concatenate([y, y[:4]]),
                    np.array([1] * 6 + [0] * 4, np.float32))  # fmt: skip
    s_real, m_real = step(state, _batch(x, y))
    s_pad, m_pad = step(state, padded)
    assert float(m_pad["count"]) == 6.0
    np.testing.assert_allclose(m_pad["loss_sum"], m_real["loss_sum"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_real.params), jax.tree.leaves(s_pad.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(s_pad.step) == 1


def test_perturbation_hook_trains_on_the_perturbed_batch(tiny_data):
    graphdef, tx, state = _state()
    x, y = tiny_data.train_images[:8], tiny_data.train_labels[:8]

    def to_zero(logits_fn, x, y, key):
        # Uses logits_fn (it must be callable inside the step) but returns black images.
        return jnp.zeros_like(x) + 0.0 * jnp.sum(logits_fn(x))

    hooked = jax.jit(lambda s, b: train_step(graphdef, tx, s, b, perturb_fn=to_zero))
    plain = jax.jit(lambda s, b: train_step(graphdef, tx, s, b))
    s_hook, m_hook = hooked(state, _batch(x, y))
    s_zero, m_zero = plain(state, _batch(np.zeros_like(x), y))
    np.testing.assert_array_equal(m_hook["loss_sum"], m_zero["loss_sum"])
    for a, b in zip(jax.tree.leaves(s_hook.params), jax.tree.leaves(s_zero.params), strict=True):
        np.testing.assert_array_equal(a, b)

    def noise(logits_fn, x, y, key):  # key = fold_in(state.key, step): new each step
        return jnp.clip(x + 0.1 * jax.random.normal(key, x.shape), 0, 1)

    noisy = jax.jit(lambda s, b: train_step(graphdef, tx, s, b, perturb_fn=noise))
    a1 = noisy(state, _batch(x, y))[1]["loss_sum"]
    a2 = noisy(state, _batch(x, y))[1]["loss_sum"]
    b1 = noisy(state.replace(step=state.step + 1), _batch(x, y))[1]["loss_sum"]
    assert float(a1) == float(a2) and float(a1) != float(b1)


class _TinyBNDropout(nnx.Module):
    """Conv - BatchNorm - k-WTA - Dropout - Dense: every kind of mutable state a model has."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.act = KWTA(0.5)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(4 * 6 * 6, 10, rngs=rngs)

    def __call__(self, x):
        x = self.drop(self.act(self.bn(self.conv(x))))
        return self.head(x.reshape(x.shape[0], -1))


def test_step_updates_batchnorm_statistics_and_dropout_rng(tiny_data):
    model = _TinyBNDropout(nnx.Rngs(jax.random.key(0, impl="rbg")))
    graphdef, params, rest = split_model(model)
    tx = optax.adam(1e-3)
    state = TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), jax.random.key(0))
    x = jax.image.resize(jnp.asarray(tiny_data.train_images[:8]), (8, 6, 6, 1), "linear")
    batch = _batch(np.asarray(x), tiny_data.train_labels[:8])

    def attack(logits_fn, x, y, key):  # runs the train-mode model inside the hook too
        return jnp.clip(x + 0.0 * jax.grad(lambda v: logits_fn(v).sum())(x), 0, 1)

    step = jax.jit(lambda s, b: train_step(graphdef, tx, s, b, perturb_fn=attack))
    s1, m1 = step(state, batch)
    s2, m2 = step(s1, batch)
    old, new = nnx.to_pure_dict(state.rest), nnx.to_pure_dict(s1.rest)
    assert not np.allclose(new["bn"]["mean"], old["bn"]["mean"])  # batch statistics moved
    assert int(new["drop"]["rngs"]["count"]) == int(old["drop"]["rngs"]["count"]) + 1
    assert float(m1["loss_sum"]) != float(m2["loss_sum"])  # new dropout mask, new params


def test_pgd_perturb_stays_in_the_eps_ball(tiny_data):
    graphdef, _, state = _state()
    model = nnx.merge(graphdef, state.params, state.rest)
    perturb = make_pgd_perturb(eps=0.1, steps=2, step_size=0.05)
    x, y = jnp.asarray(tiny_data.test_images[:8]), jnp.asarray(tiny_data.test_labels[:8])
    x_adv = jax.jit(lambda x, y: perturb(model, x, y, jax.random.key(1)))(x, y)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.1 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float(jnp.max(jnp.abs(x_adv - x))) > 0.05


# --------------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("cmp")
    # k-WTA anneals 0.2 -> 0.1 after two epochs (one run covers annealing too).
    cfg = TrainConfig(epochs=3, batch_size=64, max_train=512, max_test=128, anneal=(0.2, 0.1, 2))
    summary = run_comparison(cfg, out, eps_values=(0.1, 0.2), **QUIET)
    return out, summary


def test_comparison_writes_the_run_directories(comparison):
    out, summary = comparison
    assert json.loads((out / "summary.json").read_text()) == summary
    for act in ("relu", "kwta"):
        run = out / act
        config = json.loads((run / "config.json").read_text())
        for key in ("dataset", "model", "act", "ratio", "groups", "seed", "data_dir"):
            assert key in config
        assert config["act"] == act
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in lines] == [1, 2, 3]
        assert {"train_loss", "train_accuracy", "test_accuracy", "epoch_seconds"} <= set(lines[0])
        assert lines[-1]["train_loss"] < lines[0]["train_loss"]
        assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", "3"]
    assert not (out / "config.json").exists()  # attack.py DIR finds the runs below it


def test_comparison_summary_and_table(comparison):
    _, summary = comparison
    for act, r in summary["runs"].items():
        assert r["clean_accuracy"] > 0.6, act  # 512 images, 3 epochs
        for eps in ("0.1", "0.2"):
            assert 0.0 <= r["fgsm_accuracy"][eps] <= r["clean_accuracy"]
        assert r["fgsm_accuracy"]["0.2"] <= r["fgsm_accuracy"]["0.1"] + 0.05
    assert summary["runs"]["kwta"]["ratio"] == 0.1 and summary["runs"]["relu"]["ratio"] is None
    # config.json agrees with summary.json: a ReLU run has no ratio.
    for act, r in summary["runs"].items():
        assert read_config(r["run_dir"])["ratio"] == r["ratio"], act
    table = format_comparison(summary)
    assert "FGSM 0.1" in table and "FGSM 0.2" in table
    assert any(line.strip().startswith("kwta") for line in table.splitlines())


def test_load_trained_model_matches_the_trained_weights(comparison, tiny_data):
    out, summary = comparison
    model, config = load_trained_model(out / "kwta")
    assert config["act"] == "kwta" and config["restored_epoch"] == 3
    assert [layer.ratio for layer in iter_kwta_layers(model)] == [0.1, 0.1]
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tiny_data.test_images))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == tiny_data.test_labels))
    assert acc == pytest.approx(summary["runs"]["kwta"]["clean_accuracy"])


def test_existing_run_needs_resume_or_overwrite(comparison):
    out, _ = comparison
    cfg = TrainConfig(epochs=3, batch_size=64, max_train=512, max_test=128, act="relu",
                      anneal=(0.2, 0.1, 2))  # fmt: skip
    with pytest.raises(RunDirError, match="--resume"):
        check_run_dir(out / "relu", cfg, resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="ratio"):
        check_run_dir(out / "kwta", dataclasses_replace(cfg, act="kwta", anneal=None, ratio=0.3),
                      resume=True, overwrite=False)  # fmt: skip
    assert check_run_dir(out / "relu", cfg, resume=True, overwrite=False) == "resume"
    longer = dataclasses_replace(cfg, epochs=5)  # training longer on resume is allowed
    assert check_run_dir(out / "relu", longer, resume=True, overwrite=False) == "resume"


def test_annealing_changes_the_ratio_in_place(comparison):
    out, _ = comparison
    history = [json.loads(x) for x in (out / "kwta" / "metrics.jsonl").read_text().splitlines()]
    assert [h["kwta_ratio"] for h in history] == [0.2, 0.2, 0.1]
    model, config = load_trained_model(out / "kwta")
    assert config["kwta_ratio"] == 0.1 and config["ratio"] == 0.1
    assert config["anneal"] == [0.2, 0.1, 2]
    assert [layer.ratio for layer in iter_kwta_layers(model)] == [0.1, 0.1]
    # The optimizer state carried over the ratio change: the loss kept falling.
    assert history[2]["train_loss"] < history[1]["train_loss"]


def test_adversarial_training_runs_with_the_pgd_hook(tmp_path, tiny_data):
    small = data.Dataset("mnist5k", tiny_data.train_images[:128], tiny_data.train_labels[:128],
                         tiny_data.test_images[:64], tiny_data.test_labels[:64], 10)  # fmt: skip
    cfg = TrainConfig(act="relu", epochs=1, batch_size=64, adv_eps=0.1, adv_steps=2)
    result = train_and_evaluate(cfg, tmp_path / "adv", dataset=small, **QUIET)
    assert result.config["adv_eps"] == 0.1 and result.config["adv_step_size"] == 0.125
    assert np.isfinite(result.final["train_loss"])


# --------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------


def _cli_error(capsys, *argv):
    sys.path.insert(0, str(REPO))
    try:
        import train
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as info:
        # As the shell runs it: start-up checks (run directories, data) live past parse_args.
        sys.exit(train.main(list(argv)))
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratio", "0"], r"--ratio: must be in \(0, 1\]"),
        (["--ratio", "1.01"], r"must be in \(0, 1\]"),
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--model", "vgg"], "invalid choice: 'vgg'"),
        (["--act", "tanh"], "invalid choice: 'tanh'"),
        (["--anneal", "0.2:0.1"], "START:END:EVERY"),
        (["--epochs", "-1"], "--epochs: must be >= 1"),
        (["--resume", "--overwrite"], "exclude each other"),
        (["--anneal", "0.2:0.1:2", "--ratio", "0.3"], "differs from the --anneal end"),
        (["--model", "mlp", "--groups", "channel"], "mlp has none"),
    ],
)  # fmt: skip
def test_cli_rejects_bad_options_before_any_work(capsys, argv, message, tmp_path):
    err = _cli_error(capsys, *argv, "--out", str(tmp_path / "never"))
    assert "train.py: error:" in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "never").exists()


def test_cli_refuses_to_clobber_an_existing_run(capsys, comparison):
    out, _ = comparison
    err = _cli_error(capsys, "--out", str(out))
    assert "already holds a run" in err and "--resume" in err


@pytest.mark.slow
def test_cli_missing_dataset_is_a_one_line_error_without_traceback(tmp_path):
    (tmp_path / "tfds").mkdir()  # there, but without the dataset (a missing one: test_data)
    proc = subprocess.run(
        [sys.executable, "train.py", "--dataset", "svhn_cropped", "--data-dir",
         str(tmp_path / "tfds"), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train.py: error: dataset 'svhn_cropped' is not available offline" in proc.stderr
    assert "--data-dir" in proc.stderr


def _train_module():
    sys.path.insert(0, str(REPO))
    try:
        import train
    finally:
        sys.path.pop(0)
    return train


def test_cli_experiment_options_override_only_what_is_allowed(tmp_path):
    train = _train_module()
    args = train.parse_args(
        ["--experiment", "seed-6", "--epochs", "2", "--max-train", "300", "--out", str(tmp_path)]
    )
    [(experiment, out)] = args.experiments
    assert experiment.name == "seed-6" and out == str(tmp_path)
    assert experiment.config.epochs == 2 and experiment.config.max_train == 300
    assert experiment.config.ratio == train.EXPERIMENTS["seed-6"].config.ratio


def test_cli_experiment_rejects_options_the_preset_fixes(capsys, tmp_path):
    err = _cli_error(capsys, "--experiment", "seed-6", "--model", "cnn", "--act", "relu",
                     "--out", str(tmp_path / "never"))  # fmt: skip
    assert "--act, --model: fixed by the --experiment preset" in err and "--epochs" in err


def test_cli_experiment_without_its_data_stops_at_start_up(capsys, tmp_path):
    err = _cli_error(capsys, "--experiment", "seed-3", "--data-dir", str(tmp_path / "empty"))
    assert "train.py: error: dataset 'cifar10': --data-dir" in err
    assert "directory does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _cli_error(capsys, "--experiment", "seed-3", "--data-dir", str(tmp_path / "empty"))
    assert "train.py: error: dataset 'cifar10' is not available offline" in err


def test_cli_all_experiments_skip_those_without_data(tmp_path):
    train = _train_module()
    args = train.parse_args(
        ["--experiment", "all", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path)]
    )
    # The data check is the workflow's start-up (parse_args probes no disk).
    runnable, unavailable = plan_experiments(args.experiments)
    assert [(e.name, out) for e, out in runnable] == [("seed-6", f"{tmp_path}/seed-6")]
    assert sorted(unavailable) == ["seed-1", "seed-2", "seed-3", "seed-4", "seed-5"]
    assert all("cifar10" in message for message in unavailable.values())


def test_cli_lists_the_experiments(capsys):
    assert _train_module().main(["--list-experiments"]) == 0
    out = capsys.readouterr().out
    assert all(f"seed-{i}" in out for i in range(1, 7)) and "mnist5k, mlp" in out

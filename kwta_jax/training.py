"""Training: config dataclass, optimisers, jitted train/eval steps, the epoch loop with
checkpoints and resume, sparsity annealing, adversarial training and the ReLU-vs-k-WTA
comparison that ``train.py`` runs.

Design (flax-examples style, functional core):

* The model is split once into ``(graphdef, params, rest)`` (`split_model`); the step
  functions are pure ``jax.jit`` functions of a `TrainState` pytree, so there is no Python
  graph traversal per step. ``rest`` holds BatchNorm statistics and dropout RNG counters.
* The k-WTA ratio is a static attribute of the graph: sparsity annealing calls
  `kwta_jax.layers.set_kwta_ratio` on the template model and re-splits it, which re-traces the
  steps once per ratio (cached) and leaves parameters and optimizer state untouched.
* Determinism: the data order of epoch ``e`` is a pure function of ``(seed, e)``
  (`kwta_jax.data.batch_indices`), the perturbation key of step ``t`` is
  ``fold_in(key, t)``, and dropout RNG counters live in the checkpointed state, so a run
  resumed from the checkpoint of epoch ``e`` ends bit-identical (on CPU) to an uninterrupted
  one.
* Data parallelism: a 1-D `jax.sharding.Mesh` over all devices (axis ``"batch"``); batches are
  sharded over it and the state is replicated; XLA inserts the gradient all-reduce. With
  several processes (`initialize_distributed`) each process feeds its slice of the global
  batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kwta_jax import data as data_lib
from kwta_jax import reports, runs
from kwta_jax.checkpointing import Checkpointer
from kwta_jax.config import OPTIMIZERS, TrainConfig
from kwta_jax.layers import iter_kwta_layers, set_kwta_ratio
from kwta_jax.models import (
    ModelSpec,
    build_model,
    build_model_from_config,
    split_model,
)
from kwta_jax.runs import RunDirError, check_run_dir

__all__ = [
    "DEFAULT_FGSM_EPS",
    "OPTIMIZERS",
    "PerturbFn",
    "RunDirError",
    "RunResult",
    "StepFns",
    "TrainConfig",
    "TrainState",
    "anneal_ratio",
    "check_run_dir",
    "create_optimizer",
    "eval_step",
    "evaluate_dataset",
    "fgsm_comparison",
    "initialize_distributed",
    "make_mesh",
    "make_pgd_perturb",
    "run_comparison",
    "time_train_step",
    "train_and_evaluate",
    "train_step",
]

DEFAULT_FGSM_EPS: tuple[float, ...] = (0.1, 0.15, 0.2)

# perturb_fn(logits_fn, x [B,H,W,C], y [B], key) -> x_adv [B,H,W,C] (the attack signature of
# kwta_jax.attacks with eps etc. bound).
PerturbFn = Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array, jax.Array], jax.Array]


def anneal_ratio(config: TrainConfig, epoch: int) -> float:
    """k-WTA ratio for 0-based ``epoch``: ``config.ratio`` or the annealing schedule."""
    if config.anneal is None:
        return float(config.ratio)
    start, end, every = config.anneal
    stages = -(-config.epochs // int(every))
    stage = min(epoch // int(every), stages - 1)
    frac = 1.0 if stages == 1 else stage / (stages - 1)
    # Rounded: the ratio is a static attribute (part of the jit cache key) and goes to JSON.
    return round(start + (end - start) * frac, 6)


def create_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (AdamW if ``weight_decay > 0``) at a constant ``lr``, or SGD with momentum, weight
    decay and the piecewise-constant schedule (x0.1 at 50% and 75% of training) used for
    ResNets on CIFAR-10."""
    config = config.resolved()
    if config.optimizer == "adam":
        if config.weight_decay > 0:
            return optax.adamw(config.lr, weight_decay=config.weight_decay)
        return optax.adam(config.lr)
    total = config.epochs * steps_per_epoch
    schedule = optax.piecewise_constant_schedule(
        config.lr, {int(total * 0.5): 0.1, int(total * 0.75): 0.1}
    )
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum),
    )


# --------------------------------------------------------------------------------------------
# Model and state.
# --------------------------------------------------------------------------------------------


def model_spec(config: TrainConfig, dataset: data_lib.Dataset) -> ModelSpec:
    """The `ModelSpec` of ``config`` on ``dataset`` (initial k-WTA ratio, the dataset's shape,
    classes and normalisation)."""
    mean, std = data_lib.NORMALIZATION[dataset.name]
    return ModelSpec(
        name=config.model, act=config.act, ratio=anneal_ratio(config, 0), groups=config.groups,
        num_classes=int(dataset.num_classes), input_shape=tuple(dataset.input_shape),
        kwta_scope=config.kwta_scope, conv_ratio=config.conv_ratio, mean=tuple(mean),
        std=tuple(std),
    )  # fmt: skip


@struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; replicated over devices).

    ``step``: int32 scalar, optimizer steps taken. ``key``: PRNG key of the perturbation
    (adversarial training); step ``t`` uses ``fold_in(key, t)``.
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    key: jax.Array


def _weighted_ce(logits, labels, weights):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(weights * losses), jnp.sum(weights * correct), jnp.sum(weights)


def _fresh(tree):
    """A copy of an NNX state with new Variable objects owned by the current trace.

    Dropout increments its RNG counter and BatchNorm writes its statistics in place; NNX only
    allows that for Variables created at the current trace level (inside `jax.grad` or an
    attack's loop), not for the ones the outer `jax.jit` built.
    """
    return jax.tree.map(lambda x: x, tree)


def train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict[str, jax.Array],
    perturb_fn: PerturbFn | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` (pure; jit it with ``graphdef``/``tx`` bound).

    Args:
      graphdef: train-mode graph of the model (`split_model`).
      tx: the optax transformation.
      state: current `TrainState`.
      batch: ``image [B, H, W, C]`` float32 in [0, 1], ``label [B]`` int32, ``weight [B]``
        float32 (0 for padding).
      perturb_fn: optional ``perturb_fn(logits_fn, x, y, key) -> x_adv`` (adversarial
        training): the loss is taken on ``x_adv``. ``logits_fn`` sees the current parameters
        (no gradient flows into them) and the model's current mode; state updates made while
        attacking (BatchNorm statistics) are discarded.

    Returns:
      ``(new_state, metrics)`` with metrics ``loss_sum``, ``correct``, ``count`` (weighted
      sums over the batch, so epochs aggregate exactly).
    """
    images, labels, weights = batch["image"], batch["label"], batch["weight"]
    if perturb_fn is not None:
        frozen = jax.lax.stop_gradient(state.params)

        def logits_fn(x):
            return nnx.merge(graphdef, frozen, _fresh(state.rest))(x)

        key = jax.random.fold_in(state.key, state.step)
        images = jax.lax.stop_gradient(perturb_fn(logits_fn, images, labels, key))

    def loss_fn(params):
        model = nnx.merge(graphdef, params, _fresh(state.rest))
        logits = model(images)
        loss_sum, correct, count = _weighted_ce(logits, labels, weights)
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        return loss_sum / jnp.maximum(count, 1.0), (loss_sum, correct, count, new_rest)

    grads, (loss_sum, correct, count, new_rest) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, rest=new_rest, opt_state=opt_state
    )
    return new_state, {"loss_sum": loss_sum, "correct": correct, "count": count}


def eval_step(
    graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: dict[str, jax.Array]
) -> dict[str, jax.Array]:
    """Weighted ``loss_sum``, ``correct``, ``count`` of an eval-mode ``graphdef`` on ``batch``."""
    logits = nnx.merge(graphdef, params, rest)(batch["image"])
    loss_sum, correct, count = _weighted_ce(logits, batch["label"], batch["weight"])
    return {"loss_sum": loss_sum, "correct": correct, "count": count}


# --------------------------------------------------------------------------------------------
# Devices.
# --------------------------------------------------------------------------------------------


def initialize_distributed(**kwargs) -> None:
    """Multi-host: `jax.distributed.initialize` (coordinator etc. from ``kwargs`` or the
    cluster environment). Call before any other JAX work."""
    jax.distributed.initialize(**kwargs)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("batch",))


def _put_batch(batch: data_lib.Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global batch (identical on every process) -> arrays sharded over the batch axis; each
    process contributes its contiguous slice."""
    n_proc, p = jax.process_count(), jax.process_index()

    def put(a):
        per = a.shape[0] // n_proc
        return jax.make_array_from_process_local_data(sharding, a[p * per : (p + 1) * per], a.shape)

    return {"image": put(batch.images), "label": put(batch.labels), "weight": put(batch.weights)}


class StepFns:
    """Jitted train/eval steps for one model graph (one k-WTA ratio) on a mesh."""

    def __init__(self, model: nnx.Module, tx, mesh: Mesh, perturb_fn: PerturbFn | None = None):
        model.train()
        self.graphdef_train = nnx.graphdef(model)
        model.eval()
        self.graphdef_eval = nnx.graphdef(model)
        model.train()
        self.replicated = NamedSharding(mesh, P())
        self.data = NamedSharding(mesh, P("batch"))
        r, d = self.replicated, self.data
        # Donation saves a copy of the state per step on accelerators; XLA:CPU ignores it
        # with a warning, so only donate elsewhere.
        donate = (0,) if jax.default_backend() != "cpu" else ()
        self.train = jax.jit(
            functools.partial(train_step, self.graphdef_train, tx, perturb_fn=perturb_fn),
            in_shardings=(r, d), out_shardings=(r, r), donate_argnums=donate,
        )  # fmt: skip
        self.eval = jax.jit(
            functools.partial(eval_step, self.graphdef_eval), in_shardings=(r, r, d),
            out_shardings=r,
        )  # fmt: skip


def _sum_metrics(acc, m):
    return m if acc is None else jax.tree.map(jnp.add, acc, m)


def evaluate_dataset(
    steps: StepFns, params, rest, images: np.ndarray, labels: np.ndarray, batch_size: int
) -> dict[str, float]:
    """Loss and accuracy over every example (the last batch padded, padding weighted 0)."""
    acc = None
    for batch in data_lib.iterate_batches(images, labels, batch_size):
        acc = _sum_metrics(acc, steps.eval(params, rest, _put_batch(batch, steps.data)))
    acc = jax.device_get(acc)
    n = max(float(acc["count"]), 1.0)
    return {"loss": float(acc["loss_sum"]) / n, "accuracy": float(acc["correct"]) / n}


def make_pgd_perturb(eps: float, steps: int, step_size: float) -> PerturbFn:
    """PGD (L-inf, random start) of `kwta_jax.attacks.pgd` as a ``perturb_fn``."""
    from kwta_jax.attacks import pgd

    return functools.partial(pgd, eps=eps, steps=steps, step_size=step_size)


@dataclasses.dataclass
class RunResult:
    """Outcome of `train_and_evaluate`.

    ``model``: trained ``nnx.Module`` in eval mode. ``config``: the ``config.json`` dict.
    ``history``: one dict per epoch (as in ``metrics.jsonl``). ``resumed_from``: epoch the run
    resumed after (``None`` for a fresh run).
    """

    model: nnx.Module
    config: dict
    history: list[dict]
    run_dir: Path
    resumed_from: int | None = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def _log_default(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)


def train_and_evaluate(
    config: TrainConfig,
    run_dir,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dataset: data_lib.Dataset | None = None,
    perturb_fn: PerturbFn | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stop_after_epochs: int | None = None,
) -> RunResult:
    """Trains one model into ``run_dir`` with a checkpoint after every epoch.

    Args:
      config: the run's `TrainConfig` (validated here).
      run_dir: output directory (``config.json``, ``metrics.jsonl``, ``checkpoints/``,
        ``curves.png``).
      resume: continue from the newest good checkpoint in ``run_dir`` (a fresh start if there
        is none). Corrupt newer steps are moved aside and reported.
      overwrite: delete a previous run's files in ``run_dir`` first.
      dataset: a loaded dataset (default: `load_dataset` of the config).
      perturb_fn: adversarial-training perturbation; default: PGD from ``config.adv_*`` when
        ``config.adv_eps > 0``, else none.
      mesh: device mesh (default: all devices, `make_mesh`).
      progress: show tqdm bars.
      log: one-line messages (default: ``tqdm.write``).
      stop_after_epochs: stop (as if killed) after this many epochs of this call (tests).

    Returns:
      `RunResult` with the trained eval-mode model.
    """
    from tqdm.auto import tqdm

    log = log or _log_default
    config = config.resolved()
    config.validate()
    run_dir = Path(run_dir)
    mode = check_run_dir(run_dir, config, resume=resume, overwrite=overwrite)
    mesh = mesh or make_mesh()
    if config.batch_size % mesh.size:
        raise ValueError(
            f"batch size {config.batch_size} must be a multiple of the {mesh.size} devices "
            "(data parallelism splits every batch evenly)."
        )
    if dataset is None:
        dataset = data_lib.load_dataset(
            config.dataset, data_dir=config.data_dir, seed=config.seed,
            test_size=config.test_size, max_train=config.max_train, max_test=config.max_test,
        )  # fmt: skip
    if mode == "overwrite":
        runs.clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    config_dict = runs.make_run_config(config, model_spec(config, dataset))
    model = build_model_from_config(config_dict)
    has_kwta = any(True for _ in iter_kwta_layers(model))
    n_train = len(dataset.train_labels)
    steps_per_epoch = data_lib.num_batches(n_train, config.batch_size)
    tx = create_optimizer(config, steps_per_epoch)
    _, params, rest = split_model(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
        key=jax.random.key(config.seed),
    )  # fmt: skip
    if perturb_fn is None and config.adv_eps > 0:
        perturb_fn = make_pgd_perturb(config.adv_eps, config.adv_steps, config.adv_step_size)

    ckpt = Checkpointer(run_dir)
    start_epoch, history, resumed_from = 0, [], None
    try:
        if mode == "resume" and ckpt.steps():
            state, start_epoch, history = runs.restore_training_state(ckpt, state, log=log)
            resumed_from = start_epoch
            log(f"{run_dir}: resumed after epoch {start_epoch} (step {int(state.step)}).")
        elif mode == "resume":
            log(f"{run_dir}: no finished checkpoint to resume; starting from scratch.")

        runs.write_config(run_dir, config_dict)
        runs.write_metrics(run_dir, history)
        state = jax.device_put(state, NamedSharding(mesh, P()))
        step_cache: dict[float, StepFns] = {}
        epochs_done = 0
        ratio = anneal_ratio(config, start_epoch)
        for epoch in range(start_epoch, config.epochs):
            ratio = anneal_ratio(config, epoch)
            if has_kwta:
                set_kwta_ratio(model, ratio)
            if ratio not in step_cache:
                step_cache[ratio] = StepFns(model, tx, mesh, perturb_fn)
            steps = step_cache[ratio]

            t0 = time.perf_counter()
            bar = tqdm(
                total=steps_per_epoch, desc=f"{config.act} {epoch + 1}/{config.epochs}",
                unit="step", disable=not progress, leave=False, dynamic_ncols=True,
            )  # fmt: skip
            acc = None
            batches = data_lib.iterate_batches(
                dataset.train_images, dataset.train_labels, config.batch_size, shuffle=True,
                seed=config.seed, epoch=epoch,
            )  # fmt: skip
            for i, batch in enumerate(batches):
                state, m = steps.train(state, _put_batch(batch, steps.data))
                acc = _sum_metrics(acc, m)
                if progress and (i % 10 == 0 or i == steps_per_epoch - 1):
                    bar.set_postfix(loss=f"{float(m['loss_sum'] / m['count']):.4f}")
                bar.update()
            acc = jax.device_get(acc)
            train_time = time.perf_counter() - t0
            bar.close()
            test = evaluate_dataset(
                steps, state.params, state.rest, dataset.test_images, dataset.test_labels,
                config.batch_size,
            )  # fmt: skip
            n = max(float(acc["count"]), 1.0)
            record = {
                "epoch": epoch + 1,
                "step": int(state.step),
                "kwta_ratio": ratio if has_kwta else None,
                "train_loss": float(acc["loss_sum"]) / n,
                "train_accuracy": float(acc["correct"]) / n,
                "test_loss": test["loss"],
                "test_accuracy": test["accuracy"],
                "train_seconds": train_time,
                "step_ms": 1000 * train_time / steps_per_epoch,
                "epoch_seconds": time.perf_counter() - t0,
            }
            history.append(record)
            runs.save_training_state(ckpt, state, epoch=epoch + 1, ratio=ratio,
                                     run_config=config_dict, history=history)  # fmt: skip
            runs.append_metrics(run_dir, record)
            log(
                f"{config.model}/{config.act} epoch {epoch + 1}/{config.epochs}: "
                f"loss {record['train_loss']:.4f}, train acc {record['train_accuracy']:.4f}, "
                f"test acc {record['test_accuracy']:.4f} ({record['epoch_seconds']:.1f} s)"
            )
            epochs_done += 1
            if stop_after_epochs is not None and epochs_done >= stop_after_epochs:
                break
    finally:
        ckpt.close()

    if history:
        reports.plot_learning_curves(
            history, run_dir / "curves.png", title=f"{config.dataset} {config.model} {config.act}"
        )
    model.eval()
    graphdef_eval = nnx.graphdef(model)
    params, rest = jax.device_get((state.params, state.rest))
    final = nnx.merge(graphdef_eval, params, rest)
    final.eval()
    return RunResult(final, config_dict, history, run_dir, resumed_from)


# --------------------------------------------------------------------------------------------
# ReLU vs k-WTA comparison (what train.py runs).
# --------------------------------------------------------------------------------------------


def fgsm_comparison(
    model: nnx.Module,
    images: np.ndarray,
    labels: np.ndarray,
    eps_values: Sequence[float] = DEFAULT_FGSM_EPS,
    *,
    batch_size: int = 500,
) -> dict:
    """Clean and FGSM (L-inf) accuracy of an eval-mode ``model`` on ``images [N, H, W, C]``.

    Uses `kwta_jax.evaluation.run_suite` with `kwta_jax.attacks.fgsm` (compiled once, eps
    traced). Returns ``{"clean": float, "fgsm": {eps: float}}``.
    """
    from kwta_jax.evaluation import build_suite, models_from_nnx, run_suite

    res = run_suite(
        models_from_nnx(model), images, labels, suite=build_suite(["fgsm"]),
        eps_values=list(eps_values), batch_size=batch_size,
    )  # fmt: skip
    return {
        "clean": float(res.clean_correct.mean()),
        "fgsm": {float(e): res.accuracy("fgsm", e) for e in res.eps_values},
    }


def run_comparison(
    config: TrainConfig,
    out,
    *,
    acts: Sequence[str] = ("relu", "kwta"),
    eps_values: Sequence[float] = DEFAULT_FGSM_EPS,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Trains ``config`` once per activation into ``out/<act>/``, evaluates clean and FGSM
    accuracy on the test set, writes ``out/summary.json`` and returns it.

    Every run directory is checked (`check_run_dir`) and the dataset loaded before any
    training starts, so bad options or a missing dataset fail fast.
    """
    log = log or _log_default
    config = config.resolved()
    out = Path(out)
    configs = {act: dataclasses.replace(config, act=act) for act in acts}
    for act, cfg in configs.items():
        cfg.validate()
        check_run_dir(out / act, cfg, resume=resume, overwrite=overwrite)
    dataset = data_lib.load_dataset(
        config.dataset, data_dir=config.data_dir, seed=config.seed, test_size=config.test_size,
        max_train=config.max_train, max_test=config.max_test,
    )  # fmt: skip
    log(f"{dataset!r} on {jax.device_count()} {jax.default_backend()} device(s)")
    summary: dict[str, Any] = {
        "dataset": config.dataset, "model": config.model, "eps": list(eps_values),
        "devices": jax.device_count(), "backend": jax.default_backend(), "runs": {},
    }  # fmt: skip
    t_all = time.perf_counter()
    for act, cfg in configs.items():
        t0 = time.perf_counter()
        result = train_and_evaluate(
            cfg, out / act, resume=resume, overwrite=overwrite, dataset=dataset,
            progress=progress, log=log,
        )  # fmt: skip
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        robust = fgsm_comparison(result.model, dataset.test_images, dataset.test_labels,
                                 eps_values)  # fmt: skip
        later = [h["step_ms"] for h in result.history[1:]] or [h["step_ms"] for h in result.history]
        summary["runs"][act] = {
            "run_dir": str(out / act),
            "act": act,
            "ratio": result.final.get("kwta_ratio"),
            "epochs": len(result.history),
            "clean_accuracy": robust["clean"],
            "fgsm_accuracy": {str(e): a for e, a in robust["fgsm"].items()},
            "final_train_loss": result.final.get("train_loss"),
            "train_seconds": train_s,
            "attack_seconds": time.perf_counter() - t1,
            # Median over epochs after the first (which includes compilation).
            "step_ms": float(np.median(later)) if later else None,
        }
    summary["total_seconds"] = time.perf_counter() - t_all
    runs.write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def time_train_step(config: TrainConfig, *, n_steps: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of one jitted train step of ``config`` (compilation excluded),
    on random data of the dataset's shape. For the k-WTA / ReLU cost ratio."""
    config = config.resolved()
    shapes = {"mnist5k": (28, 28, 1), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1)}
    shape = shapes.get(config.dataset, (32, 32, 3))
    spec = ModelSpec(
        name=config.model, act=config.act, ratio=config.ratio, groups=config.groups,
        num_classes=10, input_shape=shape, kwta_scope=config.kwta_scope,
        conv_ratio=config.conv_ratio,
    )  # fmt: skip
    model = build_model(spec, seed=0)
    tx = create_optimizer(config, 100)
    _, params, rest = split_model(model)
    state = TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), jax.random.key(0))
    mesh = make_mesh()
    steps = StepFns(model, tx, mesh)
    rng = np.random.default_rng(0)
    b = config.batch_size
    batch = data_lib.Batch(
        rng.random((b, *shape), np.float32),
        rng.integers(0, 10, b).astype(np.int32),
        np.ones(b, np.float32),
    )
    dev_batch = _put_batch(batch, steps.data)
    state = jax.device_put(state, steps.replicated)
    for _ in range(warmup):
        state, m = steps.train(state, dev_batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        state, m = steps.train(state, dev_batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))

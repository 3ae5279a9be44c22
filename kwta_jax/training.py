"""Training: the optimiser, the jitted train/eval steps on a device mesh, sparsity annealing
and the epoch loop.

Design (flax-examples style, functional core):

* The model is split once into ``(graphdef, params, rest)`` (`kwta_jax.models.split_model`);
  the step functions are pure ``jax.jit`` functions of a `TrainState` pytree, so there is no
  Python graph traversal per step. ``rest`` holds BatchNorm statistics and dropout RNG
  counters.
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
* The loop (`train_epochs`) yields after every epoch and writes nothing: run directories,
  checkpoints, datasets and the adversarial perturbation (a ``perturb_fn`` it receives) are
  composed around it by `kwta_jax.train_workflow.train_and_evaluate`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kwta_jax import data as data_lib
from kwta_jax.config import OPTIMIZERS, ConfigError, TrainConfig
from kwta_jax.layers import iter_kwta_layers, set_kwta_ratio
from kwta_jax.models import ModelSpec, build_model, split_model
from kwta_jax.progress import Bar, MakeBar, open_bar
from kwta_jax.sharding import make_mesh, put_global

__all__ = [
    "OPTIMIZERS",
    "PerturbFn",
    "StepFns",
    "TrainConfig",
    "TrainState",
    "anneal_ratio",
    "check_mesh_fits",
    "create_optimizer",
    "eval_step",
    "evaluate_dataset",
    "init_train_state",
    "initialize_distributed",
    "model_spec",
    "time_train_step",
    "train_epochs",
    "train_step",
    "trained_model",
]

# perturb_fn(logits_fn, x [B,H,W,C], y [B], key) -> x_adv [B,H,W,C]: the attack signature of
# kwta_jax.attacks with eps etc. bound (the caller binds one; training imports no attack).
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


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0 of training ``model`` with ``tx``: its parameters and other state, a fresh
    optimizer state and the perturbation key of ``seed``."""
    _, params, rest = split_model(model)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
        key=jax.random.key(seed),
    )  # fmt: skip


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


def check_mesh_fits(batch_size: int, mesh: Mesh) -> None:
    """Raises `kwta_jax.config.ConfigError` (a ValueError) unless ``batch_size`` splits
    evenly over the ``mesh`` devices."""
    if batch_size % mesh.size:
        raise ConfigError(
            f"batch size {batch_size} must be a multiple of the {mesh.size} devices "
            "(data parallelism splits every batch evenly)."
        )


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


# --------------------------------------------------------------------------------------------
# The epoch loop.
# --------------------------------------------------------------------------------------------


def _train_epoch(
    steps: StepFns, state: TrainState, dataset: data_lib.Dataset, config: TrainConfig,
    epoch: int, bar: Bar, *, show_loss: bool,
) -> tuple[TrainState, dict[str, np.ndarray], float]:  # fmt: skip
    """One pass over the training set in the order of ``(config.seed, epoch)``; returns the
    new state, the epoch's summed ``loss_sum``, ``correct``, ``count`` (host) and the
    `time.perf_counter` when the first step had finished (it includes any compilation)."""
    n_batches = data_lib.num_batches(len(dataset.train_labels), config.batch_size)
    batches = data_lib.iterate_batches(
        dataset.train_images, dataset.train_labels, config.batch_size, shuffle=True,
        seed=config.seed, epoch=epoch,
    )  # fmt: skip
    sums, first_done = None, time.perf_counter()
    for i, batch in enumerate(batches):
        state, m = steps.train(state, _put_batch(batch, steps.data))
        if i == 0:
            jax.block_until_ready(m)
            first_done = time.perf_counter()
        sums = _sum_metrics(sums, m)
        # Reading the loss waits for the device: only for a bar someone sees, every 10 steps.
        if show_loss and (i % 10 == 0 or i == n_batches - 1):
            bar.set_postfix(loss=f"{float(m['loss_sum'] / m['count']):.4f}")
        bar.update()
    return state, jax.device_get(sums), first_done


def train_epochs(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    state: TrainState,
    dataset: data_lib.Dataset,
    config: TrainConfig,
    *,
    mesh: Mesh,
    perturb_fn: PerturbFn | None = None,
    start_epoch: int = 0,
    progress: MakeBar | None = None,
) -> Iterator[tuple[TrainState, dict]]:
    """Trains the epochs ``start_epoch .. config.epochs - 1`` and yields ``(state, record)``
    after each; the caller checkpoints, logs, or stops by leaving the loop.

    Args:
      model: the train-mode template of ``state`` (its k-WTA ratio is set per epoch:
        annealing).
      tx, state: the optimizer and the `TrainState` to start from (replicated over ``mesh``
        here).
      dataset: training and test arrays; the test set is evaluated after every epoch.
      config: the resolved `TrainConfig` (batch size, seed, epochs, annealing).
      mesh: the devices (`make_mesh`); ``config.batch_size`` must split over them.
      perturb_fn: adversarial-training perturbation, see `train_step`.
      progress: a bar factory for each epoch's steps (`kwta_jax.progress`).

    Yields:
      The state after the epoch and its ``metrics.jsonl`` record: ``epoch`` (1-based),
      ``step``, ``kwta_ratio`` (``None`` without k-WTA), train/test loss and accuracy,
      ``train_seconds``, ``step_ms`` (mean over the epoch's steps after the first, so
      compilation is left out; ``None`` for a one-step epoch), ``epoch_seconds``.
    """
    has_kwta = any(True for _ in iter_kwta_layers(model))
    n_batches = data_lib.num_batches(len(dataset.train_labels), config.batch_size)
    state = put_global(state, NamedSharding(mesh, P()))
    step_fns: dict[float, StepFns] = {}  # one compilation per k-WTA ratio
    for epoch in range(start_epoch, config.epochs):
        ratio = anneal_ratio(config, epoch)
        if has_kwta:
            set_kwta_ratio(model, ratio)
        if ratio not in step_fns:
            step_fns[ratio] = StepFns(model, tx, mesh, perturb_fn)
        steps = step_fns[ratio]
        t0 = time.perf_counter()
        bar = open_bar(progress, total=n_batches, desc=f"{config.act} {epoch + 1}/{config.epochs}",
                       unit="step")  # fmt: skip
        state, sums, first_done = _train_epoch(steps, state, dataset, config, epoch, bar,
                                               show_loss=bool(progress))  # fmt: skip
        jax.block_until_ready(state.step)
        t_end = time.perf_counter()
        train_time = t_end - t0
        bar.close()
        test = evaluate_dataset(steps, state.params, state.rest, dataset.test_images,
                                dataset.test_labels, config.batch_size)  # fmt: skip
        n = max(float(sums["count"]), 1.0)
        yield (
            state,
            {
                "epoch": epoch + 1,
                "step": int(state.step),
                "kwta_ratio": ratio if has_kwta else None,
                "train_loss": float(sums["loss_sum"]) / n,
                "train_accuracy": float(sums["correct"]) / n,
                "test_loss": test["loss"],
                "test_accuracy": test["accuracy"],
                "train_seconds": train_time,
                # The steps after the first (which compiles, once per k-WTA ratio).
                "step_ms": (
                    1000 * (t_end - first_done) / (n_batches - 1) if n_batches > 1 else None
                ),
                "epoch_seconds": time.perf_counter() - t0,
            },
        )


def trained_model(model: nnx.Module, state: TrainState) -> nnx.Module:
    """The eval-mode model of template ``model`` with ``state``'s parameters (host arrays)."""
    model.eval()
    params, rest = jax.device_get((state.params, state.rest))
    final = nnx.merge(nnx.graphdef(model), params, rest)
    final.eval()
    return final


# --------------------------------------------------------------------------------------------
# Step time.
# --------------------------------------------------------------------------------------------


def time_train_step(
    configs: TrainConfig | Sequence[TrainConfig],
    *,
    n_steps: int = 50,
    warmup: int = 5,
    trials: int = 5,
    impl: str = "auto",
) -> list[list[float]]:
    """Milliseconds per jitted train step of each config, trial by trial (compilation
    excluded), on random data of each config's dataset shape. For k-WTA / ReLU cost ratios.

    Each trial times ``n_steps`` back-to-back steps per config with one wait at the end (the
    device stays busy, as in training), and the trials interleave the configs, so a change in
    the machine's speed during the measurement hits every config alike: compare configs trial
    by trial (e.g. the median and spread of ``kwta[t] / relu[t]``).

    Args:
      configs: one `TrainConfig` or several.
      n_steps: steps per timing (>= 1). warmup: untimed steps per config first.
      trials: timings per config (>= 1). impl: the ``impl`` of every k-WTA layer.

    Returns:
      ``times[i][t]``: config ``i``'s mean milliseconds per step in trial ``t``.
    """
    if isinstance(configs, TrainConfig):
        configs = [configs]
    if n_steps < 1 or trials < 1 or warmup < 0:
        raise ValueError(
            f"time_train_step: n_steps and trials must be >= 1 and warmup >= 0; got "
            f"n_steps={n_steps}, trials={trials}, warmup={warmup}."
        )
    mesh = make_mesh()
    shapes = {"mnist5k": (28, 28, 1), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1)}
    runs = []  # per config: [step functions, device batch, state (replaced every step)]
    for config in configs:
        config = config.resolved()
        shape = shapes.get(config.dataset, (32, 32, 3))
        spec = ModelSpec(
            name=config.model, act=config.act, ratio=config.ratio, groups=config.groups,
            num_classes=10, input_shape=shape, kwta_scope=config.kwta_scope,
            conv_ratio=config.conv_ratio,
        )  # fmt: skip
        model = build_model(spec, seed=0)
        for layer in iter_kwta_layers(model):
            layer.impl = impl
        tx = create_optimizer(config, 100)
        steps = StepFns(model, tx, mesh)
        rng = np.random.default_rng(0)
        b = config.batch_size
        batch = data_lib.Batch(
            rng.random((b, *shape), np.float32),
            rng.integers(0, 10, b).astype(np.int32),
            np.ones(b, np.float32),
        )
        state = jax.device_put(init_train_state(model, tx, seed=0), steps.replicated)
        runs.append([steps, _put_batch(batch, steps.data), state])

    def run(entry, count):
        steps, batch, state = entry
        for _ in range(count):
            state, m = steps.train(state, batch)  # the state is donated: keep the new one
        jax.block_until_ready(m)
        entry[2] = state

    for entry in runs:
        run(entry, max(1, warmup))  # compiles
    times = [[] for _ in runs]
    for _ in range(trials):
        for entry, out in zip(runs, times, strict=True):
            t0 = time.perf_counter()
            run(entry, n_steps)
            out.append(1000 * (time.perf_counter() - t0) / n_steps)
    return times

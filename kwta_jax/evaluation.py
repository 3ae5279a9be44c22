"""Robustness evaluation: run an attack suite on already loaded models, over chunked batches
at several radii, giving per-attack accuracy, the per-example worst case and throughput.

`run_suite` (RobustBench's ``benchmark(model, ...)``, AutoAttack's ``run_standard_evaluation``)
takes `Models` (pure ``x -> logits`` functions) and arrays; it knows nothing of checkpoints,
run directories or datasets (`kwta_jax.attack_workflow.evaluate_run_dirs` composes those), and
reports are written by `kwta_jax.reports`.

Robust accuracy of an attack at ``eps`` is the share of examples that are classified
correctly *and* stay correct on the attack's adversarial example. The worst case counts an
example as robust only if it is correct clean and under *every* attack (AutoAttack's rule),
so it is at most every single attack's accuracy.

Each attack is compiled once (``eps`` is a traced argument; the last chunk is padded to the
chunk size) and run chunk by chunk, so memory is bounded by ``batch_size`` whatever the number
of examples; every adversarial chunk is checked against the threat model on the host.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kwta_jax.attacks.losses import LogitsFn
from kwta_jax.attacks.projections import check_norm, check_threat_model
from kwta_jax.layers import iter_kwta_layers, set_kwta_backward
from kwta_jax.progress import MakeBar, open_bar
from kwta_jax.results import EvalResult  # run_suite's result, importable from here too
from kwta_jax.sharding import make_mesh, put_global
from kwta_jax.suites import (  # the suites' names stay importable from here
    ATTACKS,
    BUDGETS,
    DEFAULT_EPS,
    DEFAULT_SUITE,
    MODES,
    STRONG_SUITE,
    AttackSpec,
    autoattack_suite,
    build_suite,
    default_eps,
    default_suite,
)

__all__ = [
    "ATTACKS",
    "BUDGETS",
    "DEFAULT_EPS",
    "DEFAULT_SUITE",
    "AttackSpec",
    "EvalResult",
    "Models",
    "MODES",
    "STRONG_SUITE",
    "autoattack_suite",
    "build_suite",
    "default_eps",
    "default_suite",
    "local_mesh",
    "models_from_nnx",
    "nnx_logits_fn",
    "predict",
    "run_attack",
    "run_suite",
    "skip_reason",
]

# --------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    """The attacked model and the extra models adaptive attacks take gradients from.

    ``bpda_logits_fn``: same forward pass, smooth backward (``None`` when the model has no
    k-WTA layer: BPDA would be plain PGD). ``source_logits_fn``: transfer surrogate.
    """

    logits_fn: LogitsFn
    bpda_logits_fn: LogitsFn | None = None
    source_logits_fn: LogitsFn | None = None
    name: str = "model"


def nnx_logits_fn(model) -> LogitsFn:
    """A pure ``x -> logits`` of an NNX model (its state is captured as constants)."""
    graphdef, state = nnx.split(model)
    return lambda x: nnx.merge(graphdef, state)(x)


def models_from_nnx(model, *, source=None, surrogate: str = "identity", name="model") -> Models:
    """`Models` for an NNX ``model`` in eval mode: a BPDA copy (k-WTA backward replaced by
    ``surrogate``) if it has k-WTA layers, and the transfer ``source`` model if given."""
    bpda_fn = None
    if any(True for _ in iter_kwta_layers(model)):
        bpda_model = nnx.clone(model)
        set_kwta_backward(bpda_model, surrogate)
        bpda_fn = nnx_logits_fn(bpda_model)
    return Models(
        logits_fn=nnx_logits_fn(model),
        bpda_logits_fn=bpda_fn,
        source_logits_fn=None if source is None else nnx_logits_fn(source),
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------


def _chunks(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pads the example axis to ``size`` by repeating the first example (fixed shapes: one
    compilation per attack)."""
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.repeat(a[:1], size - a.shape[0], axis=0)])


def predict(logits_fn: LogitsFn, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """Predicted labels ``[N]`` int, computed in chunks."""
    fn = jax.jit(lambda x_: jnp.argmax(logits_fn(x_), -1))
    bs = min(batch_size, len(x))
    out = [np.asarray(fn(_pad(x[a:b], bs)))[: b - a] for a, b in _chunks(len(x), bs)]
    return np.concatenate(out).astype(np.int64)


def _bind(spec: AttackSpec, models: Models) -> Callable | None:
    extra = {}
    if spec.needs == "bpda":
        if models.bpda_logits_fn is None:
            return None
        extra["bpda_logits_fn"] = models.bpda_logits_fn
    elif spec.needs == "source":
        if models.source_logits_fn is None:
            return None
        extra["source_logits_fn"] = models.source_logits_fn

    if spec.min_norm:

        def run_min_norm(x, y, key):
            x_adv, dist = spec.fn(models.logits_fn, x, y, key, **extra)
            pred = jnp.argmax(models.logits_fn(x_adv), -1)
            return x_adv, pred, jnp.argmax(models.logits_fn(x), -1), dist

        return run_min_norm

    def run(x, y, key, eps):
        x_adv = spec.fn(models.logits_fn, x, y, key, eps=eps, **extra)
        return x_adv, jnp.argmax(models.logits_fn(x_adv), -1)

    return run


def skip_reason(spec: AttackSpec, models: Models) -> str | None:
    """Why ``spec`` cannot run on ``models`` (``None`` if it can)."""
    if spec.needs == "bpda" and models.bpda_logits_fn is None:
        return "no k-WTA layer: BPDA would be plain PGD"
    if spec.needs == "source" and models.source_logits_fn is None:
        return "no transfer surrogate model"
    return None


def local_mesh() -> Mesh:
    """`kwta_jax.sharding.make_mesh` over this host's devices (`kwta_jax.attack_workflow` passes
    in the mesh of every host's devices)."""
    return make_mesh(jax.local_devices())


class _Sharder:
    """Puts a chunk's examples on the ``mesh`` split along axis ``"batch"`` (keys and eps
    replicated) and brings results back to the host; a no-op on one device.

    Multi-host (a mesh over the devices of several processes, `jax.distributed`): every
    process holds the whole chunk (all load the same test images) and contributes the rows
    its own devices hold; results are gathered, so every process gets every prediction.
    """

    def __init__(self, mesh: Mesh | None):
        self.size = 1 if mesh is None else mesh.size
        self.batch = None if self.size == 1 else NamedSharding(mesh, PartitionSpec("batch"))
        self.rep = None if self.size == 1 else NamedSharding(mesh, PartitionSpec())

    def chunk_size(self, batch_size: int, n: int) -> int:
        """``min(batch_size, n)`` rounded up to a multiple of 8 and of the device count: with
        1, 2, 4 or 8 devices the chunks (hence the keys and random draws) are the same."""
        q = math.lcm(8, self.size)
        return -(-min(batch_size, n) // q) * q

    def examples(self, a):
        return jnp.asarray(a) if self.batch is None else put_global(a, self.batch)

    def replicated(self, a):
        return a if self.rep is None else put_global(a, self.rep)

    def host(self, a) -> np.ndarray:
        if getattr(a, "is_fully_addressable", True):
            return np.asarray(a)
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def run_attack(
    spec: AttackSpec,
    models: Models,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps_values: Sequence[float],
    norm: str,
    key: jax.Array,
    batch_size: int = 250,
    keep: int = 0,
    progress: MakeBar | None = None,
    active: dict[float, np.ndarray] | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Runs one attack at every radius over ``x [N, H, W, C]``, ``y [N]`` in chunks.

    ``active``: per radius, an ``[N]`` bool mask of the examples to attack (the cascade);
    ``None``: all. The attacked examples are packed into chunks of ``batch_size`` (at most the
    most examples attacked at one radius; rounded up to a multiple of 8 and of the devices of
    ``mesh``, over which each chunk is split; the last chunk padded); chunk ``c`` at the
    ``i``-th radius gets key ``fold_in(fold_in(key, i), c)``. A minimum-norm attack
    (``spec.min_norm``) runs once, on the union of the masks, with key ``fold_in(key, 0)``.

    Returns ``{"pred": {eps: [N] int}, "seconds": {eps: float}, "compile_s": float,
    "examples": {eps: x_adv[:keep]}, "attacked": {eps: [N] bool}, "dist": [N] float or
    None}``: ``pred`` is -1 where the example was not attacked; ``dist`` (minimum-norm attacks)
    the distance found, ``inf`` where none, ``nan`` where not attacked. Raises
    `AttackInvariantError` if an adversarial example leaves its ball or the box.
    """
    run = _bind(spec, models)
    n = len(x)
    eps_values = [float(e) for e in eps_values]
    if active is None:
        active = {e: np.ones(n, bool) for e in eps_values}
    attacked = {e: np.asarray(active[e], bool) for e in eps_values}
    if not any(m.any() for m in attacked.values()):
        # Nothing left to attack (a late cascade stage): not even compiled.
        return {"pred": {e: np.full(n, -1, np.int64) for e in eps_values},
                "seconds": {e: 0.0 for e in eps_values}, "compile_s": 0.0,
                "examples": {e: np.array(x[:keep]) for e in eps_values}, "attacked": attacked,
                "dist": np.full(n, np.nan, np.float32) if spec.min_norm else None}  # fmt: skip
    sharder = _Sharder(mesh)
    # Chunks no larger than the most examples attacked at one radius (a late cascade stage
    # attacks few): one compilation for every radius.
    most = int(max(m.sum() for m in attacked.values()))
    if spec.min_norm:
        most = int(np.logical_or.reduce(list(attacked.values())).sum())
    bs = sharder.chunk_size(batch_size, most)
    t0 = time.perf_counter()
    args = [sharder.examples(_pad(x[:1], bs)), sharder.examples(_pad(y[:1], bs)),
            sharder.replicated(key)]  # fmt: skip
    if not spec.min_norm:
        args.append(sharder.replicated(np.float32(eps_values[0])))
    compiled = jax.jit(run).lower(*args).compile()
    out = {"pred": {}, "seconds": {}, "examples": {}, "compile_s": time.perf_counter() - t0,
           "attacked": attacked, "dist": None}  # fmt: skip
    bar = open_bar(progress, total=sum(int(m.sum()) for m in out["attacked"].values()),
                   desc=f"{models.name}:{spec.name}", unit="ex")  # fmt: skip

    def chunks(idx, k_eps):
        for ic, a in enumerate(range(0, len(idx), bs)):
            sel = idx[a : a + bs]
            xc = sharder.examples(_pad(x[sel], bs))
            yc = sharder.examples(_pad(y[sel], bs))
            yield sel, xc, yc, sharder.replicated(jax.random.fold_in(k_eps, ic))

    if spec.min_norm:
        union = np.zeros(n, bool)
        for m in out["attacked"].values():
            union |= m
        idx = np.flatnonzero(union)
        x_adv_all = np.array(x)
        pred_adv = np.full(n, -1, np.int64)
        pred_x = np.full(n, -1, np.int64)
        dist = np.full(n, np.nan, np.float32)
        t0 = time.perf_counter()
        for sel, xc, yc, k in chunks(idx, jax.random.fold_in(key, 0)):
            xa, pa, px, d = map(sharder.host, compiled(xc, yc, k))
            m = len(sel)
            x_adv_all[sel] = xa[:m]
            pred_adv[sel], pred_x[sel] = pa[:m], px[:m]
            dist[sel] = d[:m]
        run_s = time.perf_counter() - t0
        out["dist"] = dist
        for eps in eps_values:
            t0 = time.perf_counter()
            att = out["attacked"][eps]
            within = att & (dist <= eps)
            x_eps = np.where(within.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv_all, x)
            check_threat_model(x_eps[att], x[att], eps, norm, name=spec.name)
            out["pred"][eps] = np.where(att, np.where(within, pred_adv, pred_x), -1)
            out["examples"][eps] = x_eps[:keep]
            # The one run serves every radius: its time is shared evenly.
            out["seconds"][eps] = run_s / len(eps_values) + time.perf_counter() - t0
            bar.update(int(att.sum()))
        bar.close()
        return out

    for ie, eps in enumerate(eps_values):
        pred = np.full(n, -1, np.int64)
        x_eps = np.array(x[:keep])
        t0 = time.perf_counter()
        idx = np.flatnonzero(out["attacked"][eps])
        for sel, xc, yc, k in chunks(idx, jax.random.fold_in(key, ie)):
            xa, pa = map(sharder.host, compiled(xc, yc, k, sharder.replicated(np.float32(eps))))
            m = len(sel)
            xa = xa[:m]
            check_threat_model(xa, x[sel], eps, norm, name=spec.name)
            pred[sel] = pa[:m]
            shown = sel < keep
            x_eps[sel[shown]] = xa[shown]
            bar.update(m)
        out["seconds"][eps] = time.perf_counter() - t0
        out["pred"][eps] = pred
        out["examples"][eps] = x_eps
    bar.close()
    return out


def run_suite(
    models: Models,
    x: np.ndarray,
    y: np.ndarray,
    *,
    suite: Sequence[AttackSpec],
    eps_values: Sequence[float],
    norm: str = "linf",
    batch_size: int = 250,
    seed: int = 0,
    keep: int = 8,
    progress: MakeBar | None = None,
    mode: str = "full",
    mesh: Mesh | None = None,
) -> EvalResult:
    """Runs ``suite`` on ``x [N, H, W, C]`` float32 in [0, 1], ``y [N]`` at each radius.

    ``mode="full"``: every attack on every example (the per-attack table).
    ``mode="cascade"`` (AutoAttack's rule): the attacks run in suite order, each at radius
    ``eps`` only on the clean-correct examples every earlier attack failed on at ``eps``. A
    minimum-norm attack (``spec.min_norm``) runs once for all radii: the suite's first one on
    every clean-correct example, so every example gets a distance and
    `EvalResult.median_min_norm` does not depend on the cascade; later ones on the examples
    still unbroken at some radius (their distances are ``nan`` elsewhere). The worst
    case counts the same examples as robust in both modes up to the randomness of the attacks
    (an example's chunk, hence its random draws, differs when earlier attacks removed others).

    Attack ``i`` gets key ``fold_in(key(seed), i)`` (chunks and radii: see `run_attack`), so
    results are reproducible for a seed. ``mesh``: a 1-D mesh (axis ``"batch"``) whose
    devices split every chunk; default `local_mesh` (all local devices). Attacks whose extra
    model is missing are skipped (listed in ``result.skipped``). Each attack shows a bar from
    ``progress`` (a factory, see `kwta_jax.progress`; ``None``: none).
    """
    check_norm(norm)
    if mode not in MODES:
        raise ValueError(f"run_suite: mode must be one of {MODES}; got {mode!r}.")
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    if x.ndim != 4 or y.shape != (len(x),):
        raise ValueError(f"run_suite: need x [N, H, W, C] and y [N]; got {x.shape}, {y.shape}.")
    if len(x) == 0:
        raise ValueError("run_suite: no examples.")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError("run_suite: images must lie in [0, 1].")
    eps_values = [float(e) for e in eps_values]
    if not eps_values or min(eps_values) <= 0:
        raise ValueError(f"run_suite: eps values must be > 0; got {eps_values}.")
    mesh = local_mesh() if mesh is None else mesh
    key = jax.random.key(seed)
    res = EvalResult(
        name=models.name, norm=norm, eps_values=eps_values, labels=y.astype(np.int64),
        clean_pred=predict(models.logits_fn, x, batch_size=batch_size), pred={}, seconds={},
        compile_s={}, kinds={}, skipped={}, examples={}, clean_examples=x[:keep], mode=mode,
        devices=mesh.size,
    )  # fmt: skip
    # Cascade: per radius, the clean-correct examples no attack has broken yet.
    remaining = {e: res.clean_correct.copy() for e in eps_values}
    for i, spec in enumerate(suite):
        reason = skip_reason(spec, models)
        if reason:
            res.skipped[spec.name] = reason
            continue
        if mode == "full":
            active = None
        elif spec.min_norm and not res.min_norm_dist:
            # The first minimum-norm attack measures every example's distance (the median
            # min-norm is a number of the model, not of the cascade); later ones, like any
            # stage, only what is still unbroken at some radius.
            active = {e: res.clean_correct.copy() for e in eps_values}
        else:
            active = {e: m.copy() for e, m in remaining.items()}
        out = run_attack(
            spec, models, x, y, eps_values=eps_values, norm=norm,
            key=jax.random.fold_in(key, i), batch_size=batch_size, keep=keep, progress=progress,
            active=active, mesh=mesh,
        )  # fmt: skip
        if mode == "cascade":
            for e in eps_values:
                if spec.min_norm:  # it ran on every clean-correct example: keep the stage's own
                    out["attacked"][e] = remaining[e].copy()
                    out["pred"][e] = np.where(remaining[e], out["pred"][e], -1)
                remaining[e] &= out["pred"][e] == res.labels
        res.pred[spec.name] = out["pred"]
        res.seconds[spec.name] = out["seconds"]
        res.compile_s[spec.name] = out["compile_s"]
        res.kinds[spec.name] = spec.kind
        res.examples[spec.name] = out["examples"]
        res.attacked[spec.name] = out["attacked"]
        if out["dist"] is not None:
            res.min_norm_dist[spec.name] = out["dist"]
    return res

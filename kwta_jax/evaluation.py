"""Robustness evaluation: run an attack suite on already loaded models, over chunked batches
at several radii, giving per-attack accuracy, the per-example worst case, the worst-case
adversarial of every example, and throughput.

`run_suite` (RobustBench's ``benchmark(model, ...)``, AutoAttack's ``run_standard_evaluation``)
takes `Models` (`kwta_jax.adapters.Model`: ``apply(params, x)`` and its params) and arrays; it
knows nothing of checkpoints, run directories or datasets (`kwta_jax.attack_workflow`
composes those), and reports are written by `kwta_jax.reports`. `kwta_jax.robustness.evaluate`
is the front door for a user's own model.

Robust accuracy of an attack at ``eps`` is the share of examples that are classified
correctly *and* stay correct on the attack's adversarial example. The worst case counts an
example as robust only if it is correct clean and under *every* attack (AutoAttack's rule),
so it is at most every single attack's accuracy.

Each attack is compiled once (``eps`` and the model parameters are traced arguments; the last
chunk is padded to the chunk size) and run chunk by chunk, so memory is bounded by
``batch_size`` whatever the number of examples; every adversarial is checked against the
threat model on the host.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kwta_jax.adapters import Model, Models, make_models, models_from_nnx
from kwta_jax.attacks.projections import check_norm, check_threat_model
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
    "AttackOutcome",
    "AttackSpec",
    "EvalResult",
    "Models",
    "MODES",
    "STRONG_SUITE",
    "as_key",
    "as_eps_values",
    "autoattack_suite",
    "build_suite",
    "default_eps",
    "default_suite",
    "local_mesh",
    "make_models",
    "models_from_nnx",
    "predict",
    "run_attack",
    "run_suite",
]

# --------------------------------------------------------------------------------------------
# Arguments users pass in many forms.
# --------------------------------------------------------------------------------------------


def as_key(key) -> jax.Array:
    """A PRNG key from a typed key, a raw ``uint32[2]`` key or an int seed."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array | np.ndarray):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == np.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(jnp.asarray(key))
    raise TypeError(
        f"key: expected a PRNG key (jax.random.key(seed)) or an int seed; got {key!r:.80}."
    )


def as_eps_values(eps) -> list[float]:
    """Radii as a list of positive finite floats (a scalar is one radius)."""
    values = [eps] if isinstance(eps, numbers.Real) else list(np.ravel(np.asarray(eps)))
    try:
        values = [float(e) for e in values]
    except (TypeError, ValueError):
        raise TypeError(f"eps: expected a number or a sequence of numbers; got {eps!r}.") from None
    if not values or not all(math.isfinite(e) and e > 0 for e in values):
        raise ValueError(f"eps: values must be > 0 and finite; got {values}.")
    if len(set(values)) != len(values):
        raise ValueError(f"eps: values repeat: {values}.")
    return values


# --------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pads the example axis to ``size`` by repeating the first example (fixed shapes: one
    compilation per attack)."""
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.repeat(a[:1], size - a.shape[0], axis=0)])


def predict(model: Model, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """Predicted labels ``[N]`` int of a `Model`, computed in chunks."""
    fn = jax.jit(lambda params, x_: jnp.argmax(model.apply(params, x_), -1))
    bs = min(batch_size, len(x))
    out = [
        np.asarray(fn(model.params, _pad(x[a : a + bs], bs)))[: min(bs, len(x) - a)]
        for a in range(0, len(x), bs)
    ]
    return np.concatenate(out).astype(np.int64)


def local_mesh() -> Mesh:
    """`kwta_jax.sharding.make_mesh` over this host's devices (`kwta_jax.attack_workflow`
    passes in the mesh of every host's devices)."""
    return make_mesh(jax.local_devices())


class _Sharder:
    """Puts a chunk's examples on the ``mesh`` split along axis ``"batch"`` (parameters,
    keys and eps replicated) and brings results back to the host; a no-op on one device.

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


@dataclasses.dataclass
class AttackOutcome:
    """What one attack did at every radius (arrays over the ``N`` examples).

    ``pred[eps]``: prediction on the adversarial, -1 where the example was not attacked.
    ``x_adv[eps]``: the adversarial (the clean example where not attacked).
    ``attacked[eps]``: which examples the attack ran on. ``seconds[eps]``: run time
    (compilation excluded). ``dist``: a minimum-norm attack's distance per example (``inf``
    none found, ``nan`` not attacked); ``None`` for other attacks.
    """

    pred: dict[float, np.ndarray]
    x_adv: dict[float, np.ndarray]
    attacked: dict[float, np.ndarray]
    seconds: dict[float, float]
    compile_s: float = 0.0
    dist: np.ndarray | None = None


def _bind(spec: AttackSpec, models: Models):
    """``(run, params)``: the attack as a pure function of (params, x, y, key, eps) ->
    (x_adv, adversarial prediction, clean prediction, distance), and its params (the attacked
    model's, and the auxiliary model's when it has its own)."""
    model = models.model
    aux = models.auxiliary.get(spec.needs) if spec.needs else None
    params = {"model": model.params}
    if aux is not None and aux.params is not model.params:  # a BPDA twin shares them
        params["aux"] = aux.params

    def run(p, x, y, key, eps):
        logits_fn = model.logits_fn(p["model"])
        extra = {}
        if aux is not None:
            extra[f"{spec.needs}_logits_fn"] = aux.logits_fn(p.get("aux", p["model"]))
        clean = jnp.argmax(logits_fn(x), -1)
        if spec.min_norm:
            x_adv, dist = spec.fn(logits_fn, x, y, key, **extra)
        else:
            x_adv = spec.fn(logits_fn, x, y, key, eps=eps, **extra)
            dist = jnp.full(y.shape, jnp.nan, jnp.float32)
        return x_adv, jnp.argmax(logits_fn(x_adv), -1), clean, dist

    return run, params


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
    progress: MakeBar | None = None,
    active: dict[float, np.ndarray] | None = None,
    mesh: Mesh | None = None,
) -> AttackOutcome:
    """Runs one attack at every radius over ``x [N, ...]``, ``y [N]`` in chunks.

    ``active``: per radius, an ``[N]`` bool mask of the examples to attack (the cascade);
    ``None``: all. The attacked examples are packed into chunks of ``batch_size`` (at most the
    most examples one run attacks; rounded up to a multiple of 8 and of the devices of
    ``mesh``, over which each chunk is split; the last chunk padded). An ordinary attack runs
    once per radius, the ``i``-th with key ``fold_in(key, i)``; a minimum-norm attack
    (``spec.min_norm``) runs once for all radii, on the union of the masks, with key
    ``fold_in(key, 0)``, and its point counts at radius ``eps`` where its distance is
    ``<= eps``. Chunk ``c`` of a run gets ``fold_in(run key, c)``.

    Raises:
      AttackInvariantError: an adversarial example outside its ball or the box.
    """
    n = len(x)
    eps_values = [float(e) for e in eps_values]
    attacked = {
        e: np.ones(n, bool) if active is None else np.asarray(active[e], bool) for e in eps_values
    }
    out = AttackOutcome(
        pred={e: np.full(n, -1, np.int64) for e in eps_values},
        x_adv={e: x for e in eps_values},
        attacked=attacked,
        seconds={e: 0.0 for e in eps_values},
        dist=np.full(n, np.nan, np.float32) if spec.min_norm else None,
    )
    # One run serves every radius for a minimum-norm attack, one run per radius otherwise.
    if spec.min_norm:
        runs = [(eps_values, np.logical_or.reduce(list(attacked.values())), 0)]
    else:
        runs = [([e], attacked[e], i) for i, e in enumerate(eps_values)]
    most = max(int(mask.sum()) for _, mask, _ in runs)
    if most == 0:  # nothing left to attack (a late cascade stage): not even compiled
        return out
    sharder = _Sharder(mesh)
    bs = sharder.chunk_size(batch_size, most)
    run, params = _bind(spec, models)
    params = sharder.replicated(params)
    t0 = time.perf_counter()
    compiled = (
        jax.jit(run)
        .lower(
            params,
            sharder.examples(_pad(x[:1], bs)),
            sharder.examples(_pad(y[:1], bs)),
            sharder.replicated(key),
            sharder.replicated(np.float32(eps_values[0])),
        )
        .compile()
    )
    out.compile_s = time.perf_counter() - t0
    bar = open_bar(
        progress,
        total=sum(int(mask.sum()) * len(r) for r, mask, _ in runs),
        desc=f"{models.name}:{spec.name}",
        unit="ex",
    )
    for run_eps, mask, i in runs:
        t0 = time.perf_counter()
        idx = np.flatnonzero(mask)
        x_run = np.array(x)
        pred_adv, pred_clean = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        k_run = jax.random.fold_in(key, i)
        eps_arg = sharder.replicated(np.float32(run_eps[0]))
        for c, a in enumerate(range(0, len(idx), bs)):
            sel = idx[a : a + bs]
            xa, pa, pc, d = map(
                sharder.host,
                compiled(
                    params,
                    sharder.examples(_pad(x[sel], bs)),
                    sharder.examples(_pad(y[sel], bs)),
                    sharder.replicated(jax.random.fold_in(k_run, c)),
                    eps_arg,
                ),
            )
            m = len(sel)
            x_run[sel], pred_adv[sel], pred_clean[sel] = xa[:m], pa[:m], pc[:m]
            if out.dist is not None:
                out.dist[sel] = d[:m]
            bar.update(m * len(run_eps))
        run_s = time.perf_counter() - t0
        for e in run_eps:
            t0 = time.perf_counter()
            att = attacked[e]
            if spec.min_norm:  # the point counts at this radius only within it
                within = att & (out.dist <= e)
                x_e = np.where(within.reshape((-1,) + (1,) * (x.ndim - 1)), x_run, x)
                out.pred[e] = np.where(att, np.where(within, pred_adv, pred_clean), -1)
            else:
                x_e, out.pred[e] = x_run, pred_adv
            check_threat_model(x_e[att], x[att], e, norm, name=spec.name)
            out.x_adv[e] = x_e
            out.seconds[e] = run_s / len(run_eps) + time.perf_counter() - t0
    bar.close()
    return out


def _check_inputs(models: Models, x, y, eps_values, norm: str, mode: str):
    check_norm(norm)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    if not isinstance(models, Models):
        raise TypeError(
            f"models: expected evaluation.Models (see make_models); got {type(models).__name__}."
        )
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.ndim < 2:
        raise ValueError(f"x: expected [N, ...] inputs (rank >= 2); got shape {x.shape}.")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"y: expected [N] integer labels for x of shape {x.shape}; got {y.dtype} {y.shape}."
        )
    if len(x) == 0:
        raise ValueError("x: no examples.")
    if not np.isfinite(x).all() or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError(
            f"x: inputs must lie in [0, 1] (found [{float(np.nanmin(x)):.4g}, "
            f"{float(np.nanmax(x)):.4g}]); rescale them, or pass bounds= to "
            "kwta_jax.robustness.evaluate."
        )
    return x, y.astype(np.int32), as_eps_values(eps_values)


def run_suite(
    models: Models,
    x: np.ndarray,
    y: np.ndarray,
    *,
    suite: Sequence[AttackSpec],
    eps_values: Sequence[float] | float,
    key: jax.Array | int = 0,
    norm: str = "linf",
    batch_size: int = 250,
    keep: int = 8,
    progress: MakeBar | None = None,
    mode: str = "cascade",
    mesh: Mesh | None = None,
) -> EvalResult:
    """Runs ``suite`` on ``x [N, ...]`` float32 in [0, 1], ``y [N]`` at each radius.

    ``mode="cascade"`` (AutoAttack's rule, the default): the attacks run in suite order, each
    at radius ``eps`` only on the clean-correct examples every earlier attack failed on at
    ``eps``. A minimum-norm attack (``spec.min_norm``) runs once for all radii: with
    ``spec.measure_all`` (FMN) on every clean-correct example, so every example gets a
    distance and `EvalResult.median_min_norm` does not depend on the cascade; otherwise on
    the examples still unbroken at some radius (its distances are ``nan`` elsewhere).
    ``mode="full"``: every attack on every example (the per-attack table). The worst case
    counts the same examples as robust in both modes up to the randomness of the attacks (an
    example's chunk, hence its random draws, differs when earlier attacks removed others).

    Attack ``i`` gets key ``fold_in(key, i)`` (radii and chunks: see `run_attack`), so
    results are reproducible for a key (an int is a seed). ``mesh``: a 1-D mesh (axis
    ``"batch"``) whose devices split every chunk; default `local_mesh` (all local devices).
    Attacks whose auxiliary model is missing are skipped (``result.skipped`` says why); the
    BPDA twin is dropped when the model has no k-WTA. ``keep``: adversarials of the first
    ``keep`` examples per attack for the example plots; ``result.x_adv[eps]`` holds every
    example's worst-case adversarial. Each attack shows a bar from ``progress`` (a factory,
    see `kwta_jax.progress`; ``None``: none).
    """
    x, y, eps_values = _check_inputs(models, x, y, eps_values, norm, mode)
    key = as_key(key)
    if models.bpda_needs_kwta and "bpda" in models.auxiliary and not models.model.count_kwta(x):
        models = dataclasses.replace(
            models, auxiliary={k: v for k, v in models.auxiliary.items() if k != "bpda"}
        )
    mesh = local_mesh() if mesh is None else mesh
    res = EvalResult(
        name=models.name,
        norm=norm,
        eps_values=eps_values,
        labels=y.astype(np.int64),
        clean_pred=predict(models.model, x, batch_size=batch_size),
        pred={},
        seconds={},
        compile_s={},
        kinds={},
        skipped={},
        examples={},
        clean_examples=x[:keep],
        mode=mode,
        devices=mesh.size,
        x_adv={e: x.copy() for e in eps_values},
    )
    # Per radius, the clean-correct examples no attack has broken yet.
    remaining = {e: res.clean_correct.copy() for e in eps_values}
    for i, spec in enumerate(suite):
        reason = spec.skip_reason(models.auxiliary)
        if reason:
            res.skipped[spec.name] = reason
            continue
        if mode == "full":
            active = None
        elif spec.min_norm and spec.measure_all:
            # It measures every example's distance (the median min-norm is a number of the
            # model, not of the cascade); other stages only attack what is still unbroken.
            active = {e: res.clean_correct.copy() for e in eps_values}
        else:
            active = {e: m.copy() for e, m in remaining.items()}
        out = run_attack(
            spec,
            models,
            x,
            y,
            eps_values=eps_values,
            norm=norm,
            key=jax.random.fold_in(key, i),
            batch_size=batch_size,
            progress=progress,
            active=active,
            mesh=mesh,
        )
        for e in eps_values:
            if mode == "cascade" and spec.min_norm and spec.measure_all:
                # It ran on every clean-correct example: keep the stage's own.
                out.attacked[e] = remaining[e].copy()
                out.pred[e] = np.where(remaining[e], out.pred[e], -1)
            broke = remaining[e] & (out.pred[e] >= 0) & (out.pred[e] != res.labels)
            res.x_adv[e][broke] = out.x_adv[e][broke]
            remaining[e] &= ~broke
        res.pred[spec.name] = out.pred
        res.seconds[spec.name] = out.seconds
        res.compile_s[spec.name] = out.compile_s
        res.kinds[spec.name] = spec.kind
        res.examples[spec.name] = {e: out.x_adv[e][:keep] for e in eps_values}
        res.attacked[spec.name] = out.attacked
        if out.dist is not None:
            res.min_norm_dist[spec.name] = out.dist
    return res

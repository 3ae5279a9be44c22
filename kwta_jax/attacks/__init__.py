"""Adversarial attacks as pure JAX functions.

Every attack is ``attack(logits_fn, x, y, key, *, eps, ...) -> x_adv`` where ``logits_fn`` maps
``[B, H, W, C]`` float32 images in [0, 1] to ``[B, classes]`` logits, ``x`` is such a batch,
``y: [B]`` int labels and ``key`` a PRNG key. Each result lies in the eps-ball around ``x``
intersected with [0, 1], and is a deterministic function of ``key``. Attacks are traceable as
a whole (loops are ``lax.fori_loop``); wrap them in ``jax.jit`` with ``functools.partial``.

Minimum-norm attacks (`fab_t_min_norm`, `fmn_min_norm`) return ``(x_adv, dist)``: the closest
adversarial found and its distance to ``x`` (``inf`` where none); `fab_t` and `fmn` are their
eps-constrained forms with the signature above.
"""

from kwta_jax.attacks import gradients, losses, projections
from kwta_jax.attacks.adaptive import bpda, bpda_apgd, eot_pgd, gradient_free, transfer
from kwta_jax.attacks.apgd import apgd
from kwta_jax.attacks.apgd_t import apgd_t
from kwta_jax.attacks.cw import cw_l2, cw_pgd
from kwta_jax.attacks.deepfool import deepfool
from kwta_jax.attacks.es import ES_SCHEDULE, ES_SCHEDULE_CPU, check_es_schedule, es
from kwta_jax.attacks.fab import fab_t, fab_t_min_norm
from kwta_jax.attacks.fgsm import fgm_l2, fgsm
from kwta_jax.attacks.fmn import fmn, fmn_min_norm
from kwta_jax.attacks.losses import LOSSES, cross_entropy, dlr, dlr_targeted, get_loss, margin
from kwta_jax.attacks.pgd import gradient_attack, mim, pgd
from kwta_jax.attacks.projections import (
    NORMS,
    AttackInvariantError,
    check_threat_model,
    lp_norm,
    project,
    random_init,
)
from kwta_jax.attacks.square import square

__all__ = [
    "ES_SCHEDULE",
    "ES_SCHEDULE_CPU",
    "LOSSES",
    "NORMS",
    "AttackInvariantError",
    "apgd",
    "apgd_t",
    "bpda",
    "bpda_apgd",
    "check_es_schedule",
    "check_threat_model",
    "cw_l2",
    "cw_pgd",
    "deepfool",
    "eot_pgd",
    "gradient_free",
    "cross_entropy",
    "dlr",
    "dlr_targeted",
    "es",
    "fab_t",
    "fab_t_min_norm",
    "fgm_l2",
    "fgsm",
    "fmn",
    "fmn_min_norm",
    "get_loss",
    "gradient_attack",
    "gradients",
    "losses",
    "lp_norm",
    "margin",
    "mim",
    "pgd",
    "project",
    "projections",
    "random_init",
    "square",
    "transfer",
]

"""Reports: every table, JSON file and plot the library writes, in one place.

* attack suite (`kwta_jax.evaluation.EvalResult`): `format_table`, `save_json`,
  `save_per_image` (``results_per_image.npz``), `plot_accuracy_vs_eps`, `plot_examples`;
* gradient-masking checks (`kwta_jax.diagnostics.Diagnosis`): `format_flags`;
* training: `plot_learning_curves` (``curves.png``), `format_comparison` (the ReLU-vs-k-WTA
  table of ``summary.json``);
* the write-up's experiments: `build_report`, `format_report` (``table.md``), `plot_report`.

Functions here read results and write text or files; they run no model. matplotlib is
imported on first use (headless Agg backend).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kwta_jax.atomic import atomic_path, write_json_atomic
from kwta_jax.suites import NON_GRADIENT_KINDS

if TYPE_CHECKING:
    from kwta_jax.diagnostics import Diagnosis
    from kwta_jax.experiments import Experiment
    from kwta_jax.results import EvalResult

__all__ = [
    "build_report",
    "format_comparison",
    "format_eps",
    "format_flags",
    "format_report",
    "format_table",
    "plot_accuracy_vs_eps",
    "plot_examples",
    "plot_learning_curves",
    "plot_report",
    "save_json",
    "save_per_image",
]


def _save_figure(fig, path, *, dpi: int) -> None:
    """Writes ``fig`` to ``path`` atomically (never a truncated PNG) and closes it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        _pyplot().close(fig)


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------
# The attack suite.
# --------------------------------------------------------------------------------------------


def format_eps(e: float) -> str:
    """``8/255`` for multiples of 1/255 that are not round decimals, else ``0.1``."""
    k = round(e * 255)
    if math.isclose(e * 255, k, abs_tol=1e-6) and not math.isclose(e * 100, round(e * 100)):
        return f"{k}/255"
    return f"{e:g}"


def format_table(res: EvalResult) -> str:
    """A text table: one row per attack (accuracy in % at each eps, examples/s, seconds),
    the per-example worst case, the examples each attack broke first, and the median
    minimum-norm distance. In cascade mode a row's accuracy is the one after that stage (it
    attacked only what the rows above left robust)."""
    cols = [format_eps(e) for e in res.eps_values]
    w = max([len("worst case (all attacks)")] + [len(a) for a in res.pred]) + 2
    head = (f"{'attack':<{w}}{'kind':<15}" + "".join(f"{c:>9}" for c in cols)
            + f"{'ex/s':>10}{'s':>8}")  # fmt: skip
    mode = res.mode
    if mode == "cascade":
        mode += ": each row attacks only what the rows above left robust; accuracy after it"
    lines = [
        f"{res.name}: {res.norm} robust accuracy (%) on {res.n} examples; "
        f"clean {100 * res.clean_correct.mean():.1f}%; mode {mode}; {res.devices} device(s)",
        head,
        "-" * len(head),
    ]
    for a in res.pred:
        accs = "".join(f"{100 * res.accuracy(a, e):>9.1f}" for e in res.eps_values)
        secs = sum(res.seconds[a].values()) + res.compile_s[a]
        lines.append(f"{a:<{w}}{res.kinds[a]:<15}{accs}{res.throughput(a):>10.0f}{secs:>8.1f}")
    lines.append("-" * len(head))
    accs = "".join(f"{100 * res.worst_accuracy(e):>9.1f}" for e in res.eps_values)
    lines.append(f"{'worst case (all attacks)':<{w}}{'':<15}{accs}")
    if res.pred:
        lines.append("examples each attack broke first (suite order), per eps:")
        broke = {e: res.broken_by(e) for e in res.eps_values}
        for a in res.pred:
            counts = "".join(f"{broke[e][a]:>9d}" for e in res.eps_values)
            lines.append(f"  {a:<{w - 2}}{'':<15}{counts}")
    med = res.median_min_norm()
    per = ", ".join(
        f"{a} {m:.4g}" if (m := res.median_min_norm(a)) is not None
        else f"{a} ran on {int((~np.isnan(d)).sum())} examples only"
        for a, d in res.min_norm_dist.items()
    )  # fmt: skip
    if med is not None:
        lines.append(
            f"median min-norm distance ({res.norm}, over clean-correct examples, inf where "
            f"none found): {med:.4g} (per attack: {per})"
        )
    elif res.min_norm_dist:
        lines.append(
            "median min-norm distance: none (no minimum-norm attack ran on every "
            f"clean-correct example: {per})"
        )
    for a, why in res.skipped.items():
        lines.append(f"(skipped {a}: {why})")
    return "\n".join(lines)


def save_json(payload: dict, path) -> None:
    """``payload`` as indented JSON, written atomically (`kwta_jax.atomic`)."""
    write_json_atomic(path, payload)


def save_per_image(results: Sequence[EvalResult], path) -> Path:
    """Writes the per-example arrays of each result (`EvalResult.per_image`) to one ``.npz``:
    ``models`` (the keys, the model names with ``#i`` appended to repeats) and
    ``<model>/<array>`` (``labels``, ``clean_pred``, ``robust/<attack>/<eps>``,
    ``worst_robust/<eps>``, ``attacked/<attack>/<eps>``, ``breaker/<eps>``,
    ``min_norm/<attack>``). Written atomically. Returns ``Path(path)``."""
    path = Path(path)
    arrays, names = {}, []
    for i, res in enumerate(results):
        name = res.name if res.name not in names else f"{res.name}#{i}"
        names.append(name)
        arrays.update({f"{name}/{k}": v for k, v in res.per_image().items()})
    arrays["models"] = np.asarray(names, dtype=str)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)
    return path


def plot_accuracy_vs_eps(results: Sequence[EvalResult], path) -> None:
    """PNG: robust accuracy vs eps, one panel per model, one line per attack, worst case
    in black."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    # tab20 and a marker per attack: a suite has more attacks than the default 10 colours, and
    # two attacks must not look alike. Styles are keyed by name over every panel, so an
    # attack looks the same in each (a panel may skip some, e.g. BPDA on a ReLU model).
    colours = plt.get_cmap("tab20").colors
    names = list(dict.fromkeys(a for res in results for a in res.pred))
    style = {a: (colours[i % len(colours)], "os^vD<>ph*"[i % 10]) for i, a in enumerate(names)}
    for ax, res in zip(axes[0], results, strict=True):
        eps = res.eps_values
        for a in res.pred:
            ax.plot(eps, [100 * res.accuracy(a, e) for e in eps], label=a,
                    color=style[a][0], marker=style[a][1])  # fmt: skip
        ax.plot(eps, [100 * res.worst_accuracy(e) for e in eps], "k--", lw=2.5,
                marker="s", label="worst case")  # fmt: skip
        ax.set_title(f"{res.name} (clean {100 * res.clean_correct.mean():.1f}%)")
        ax.set(xlabel=f"eps ({res.norm})", ylabel="robust accuracy (%)", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)


def plot_examples(res: EvalResult, path, *, eps: float | None = None, rows: int = 6) -> None:
    """PNG grid: clean images and each attack's adversarial image at ``eps`` (default the
    largest), titled with the prediction (red when wrong)."""
    plt = _pyplot()
    eps = res.eps_values[-1] if eps is None else eps
    rows = min(rows, len(res.clean_examples))
    cols = ["clean"] + list(res.pred)
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.4 * len(cols), 1.5 * rows),
                             squeeze=False)  # fmt: skip
    for r in range(rows):
        for c, name in enumerate(cols):
            ax = axes[r, c]
            if name == "clean":
                img, pred = res.clean_examples[r], res.clean_pred[r]
            else:
                img, pred = res.examples[name][eps][r], res.pred[name][eps][r]
            cmap = "gray" if img.shape[-1] == 1 else None
            ax.imshow(np.clip(img.squeeze(-1) if img.shape[-1] == 1 else img, 0, 1), cmap=cmap,
                      vmin=0, vmax=1)  # fmt: skip
            label = "not run" if pred < 0 else f"pred {pred}"
            ax.set_title(f"{name}\n{label}" if r == 0 else label, fontsize=7,
                         color="black" if pred == res.labels[r] else "red")  # fmt: skip
            ax.axis("off")
    fig.suptitle(f"{res.name}: {res.norm} eps={format_eps(eps)}", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------
# Gradient-masking checks.
# --------------------------------------------------------------------------------------------


def format_flags(diagnosis: Diagnosis | dict, name: str = "") -> str:
    """One line per flag (``[FLAG]`` or ``[ ok ]``, value, explanation, detail), how the
    checks ran, the checks that did not run and why, then a verdict that only says "no sign
    of gradient masking" when every check ran. Takes a `kwta_jax.diagnostics.Diagnosis` or
    its ``to_dict()``."""
    d = diagnosis if isinstance(diagnosis, dict) else diagnosis.to_dict()
    lines = [f"gradient-masking diagnostics{f' for {name}' if name else ''}:"]
    for fl in d["flags"]:
        mark = "FLAG" if fl["fired"] else " ok "
        value = "n/a" if fl["value"] is None else f"{fl['value']:.3f}"
        lines.append(f"  [{mark}] {fl['name']} = {value} (threshold {fl['threshold']:g}): "
                     f"{fl['explanation']}")  # fmt: skip
        if fl["detail"]:
            lines.append(f"         {fl['detail']}")
    for check, why in d["skipped"].items():
        lines.append(f"  [skip] {check}: not checked: {why}")
    for note in d["notes"]:
        lines.append(f"  ({note})")
    fired = [fl["name"] for fl in d["flags"] if fl["fired"]]
    if fired:
        verdict = (f"{len(fired)} flag(s) fired: gradient masking likely; trust the worst case "
                   "over the adaptive attacks, not white-box PGD.")  # fmt: skip
    elif d["skipped"]:
        verdict = (f"no flag fired among the checks that ran, but {len(d['skipped'])} did not "
                   "run: this is no evidence against gradient masking.")  # fmt: skip
    else:
        verdict = "no flag fired and every check ran: no sign of gradient masking."
    lines.append(f"  => {verdict}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def plot_learning_curves(history: Sequence[dict], path, *, title: str = "") -> Path:
    """Writes a PNG with loss (train/test) and accuracy (train/test) per epoch.

    Args:
      history: one dict per epoch with ``epoch``, ``train_loss``, ``test_loss``,
        ``train_accuracy``, ``test_accuracy`` (the lines of ``metrics.jsonl``).
      path: output ``.png`` path (written atomically: temporary file, then rename).

    Returns:
      ``Path(path)``.
    """
    plt = _pyplot()
    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split, style in (("train", "-o"), ("test", "--s")):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, ms=3, label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], style, ms=3, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ratios = [h.get("kwta_ratio") for h in history]
    if any(r is not None for r in ratios) and len(set(ratios)) > 1:
        twin = ax_acc.twinx()
        twin.step(epochs, ratios, "g:", where="mid", label="k-WTA ratio")
        twin.set_ylabel("k-WTA ratio", color="g")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)
    return path


def format_comparison(summary: dict) -> str:
    """The comparison table of a `run_comparison` summary."""
    eps = summary["eps"]
    head = ["act", "ratio", "clean"] + [f"FGSM {e:g}" for e in eps] + ["ms/step", "train s"]
    rows = []
    for act, r in summary["runs"].items():
        rows.append(
            [act, "-" if r["ratio"] is None else f"{r['ratio']:g}", f"{r['clean_accuracy']:.3f}"]
            + [f"{r['fgsm_accuracy'][str(float(e))]:.3f}" for e in eps]
            + [f"{r['step_ms']:.2f}" if r["step_ms"] is not None else "-",
               f"{r['train_seconds']:.1f}"]
        )  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    title = (
        f"{summary['dataset']} / {summary['model']}: test accuracy, clean and under FGSM "
        f"(L-inf eps on [0, 1] pixels)"
    )
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


# --------------------------------------------------------------------------------------------
# The write-up's experiments.
# --------------------------------------------------------------------------------------------


def _eps_key(eps: float) -> str:
    return str(float(eps))


def build_report(experiment: Experiment, attack_payload: dict) -> dict:
    """The write-up-format table of one experiment from the payload of
    `kwta_jax.attack_workflow.evaluate_run_dirs`.

    Every accuracy comes from the attack evaluation (the same test examples for every row).
    Returns a JSON-serialisable dict with ``rows`` (label, metric, eps, write-up pair, our
    pair) and the masking ``flags`` of each model.
    """
    by_act = {run["config"]["act"]: run for run in attack_payload["runs"]}
    missing = [a for a in experiment.acts if a not in by_act]
    if missing:
        raise ValueError(f"attack results have no run for activation(s) {missing}.")
    runs = [by_act[a] for a in experiment.acts]

    def accuracy(run, attack, eps):
        entry = run["attacks"].get(attack)
        return None if entry is None else entry["accuracy"][_eps_key(eps)]

    def strongest(run, eps, kinds):
        found = [
            (a["accuracy"][_eps_key(eps)], name)
            for name, a in run["attacks"].items()
            if a["kind"] in kinds
        ]
        return min(found) if found else (None, None)

    rows = [
        dict(label="clean", metric="clean", eps=0.0, writeup=experiment.writeup.get("clean"),
             ours=[r["clean_accuracy"] for r in runs], attack=None),
    ]  # fmt: skip
    for eps in experiment.fgsm_eps:
        rows.append(
            dict(label=f"FGSM eps={eps:g}", metric="fgsm", eps=eps,
                 writeup=experiment.writeup.get(f"fgsm {eps:g}"),
                 ours=[accuracy(r, "fgsm", eps) for r in runs], attack="fgsm")
        )  # fmt: skip
    for eps in experiment.eps:
        e = format_eps(eps)
        rows.append(
            dict(label=f"PGD eps={e}", metric="pgd", eps=eps, writeup=None,
                 ours=[accuracy(r, "pgd", eps) for r in runs], attack="pgd")
        )  # fmt: skip
        best = [strongest(r, eps, NON_GRADIENT_KINDS) for r in runs]
        rows.append(
            dict(label=f"strongest adaptive eps={e}", metric="adaptive", eps=eps, writeup=None,
                 ours=[b[0] for b in best], attack=[b[1] for b in best])
        )  # fmt: skip
        rows.append(
            dict(label=f"worst case eps={e}", metric="worst", eps=eps, writeup=None,
                 ours=[r["worst_case_accuracy"][_eps_key(eps)] for r in runs],
                 attack="all")
        )  # fmt: skip
    flags = {
        act: [f for f in run.get("diagnostics", {}).get("flags", []) if f.get("fired")]
        for act, run in zip(experiment.acts, runs, strict=True)
    }
    return {
        "experiment": experiment.name,
        "description": experiment.description,
        "notes": experiment.notes,
        "acts": list(experiment.acts),
        "config": runs[0]["config"],
        "n_examples": runs[0]["n_examples"],
        "attacks": sorted(set().union(*(r["attacks"] for r in runs))),
        "rows": rows,
        "flags": flags,
    }


def _cell(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_report(report: dict) -> str:
    """Markdown table of a `build_report` result, write-up columns beside ours."""
    relu, kwta = report["acts"]
    lines = [
        f"### {report['experiment']}: {report['description']}",
        "",
        f"| input | write-up {relu} | write-up {kwta} | ours {relu} | ours {kwta} |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        w = row["writeup"] or (None, None)
        label = row["label"]
        if isinstance(row["attack"], list):
            label += " (" + " / ".join(a or "-" for a in row["attack"]) + ")"
        lines.append(
            f"| {label} | {_cell(w[0])} | {_cell(w[1])} | {_cell(row['ours'][0])} | "
            f"{_cell(row['ours'][1])} |"
        )
    lines.append("")
    lines.append(f"Accuracy on {report['n_examples']} test examples; L-inf eps on [0, 1] pixels.")
    for act, flags in report["flags"].items():
        names = ", ".join(f["name"] for f in flags) or "none"
        lines.append(f"Gradient-masking flags ({act}): {names}.")
    if report["notes"]:
        lines.append(f"Notes: {report['notes']}")
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """Accuracy vs eps for both models under FGSM and under the per-example worst case."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    rows = report["rows"]
    for i, act in enumerate(report["acts"]):
        for metric, style, what in (("fgsm", "--", "FGSM"), ("worst", "-", "worst case")):
            pts = sorted(
                (r["eps"], r["ours"][i])
                for r in rows
                if r["metric"] in ("clean", metric) and r["ours"][i] is not None
            )
            ax.plot(*zip(*pts, strict=True), style, marker="o", color=f"C{i}",
                    label=f"{act}, {what}")  # fmt: skip
    ax.set_xlabel("L-inf eps")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{report['experiment']}: FGSM vs worst case over the suite")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)

"""Loss and throughput curves: python -m scaling.plot RUN_DIR [RUN_DIR ...] -o curves.png [--table]

One figure, four panels: train and validation loss against step and against tokens seen,
tokens/s against step, and learning rate against step; one colour per run (train solid,
validation dashed). Needs matplotlib (pip install -e '.[plot]'). --table also prints each run's
validation losses as a table, one row per evaluation.
"""

import argparse
import sys
from pathlib import Path

from scaling.metrics import read_metrics, warn


class RunError(Exception):
    """A run folder with nothing to plot."""


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{run_dir}: no metrics.jsonl")
    train, val, damaged = {}, {}, []
    for r in read_metrics(path, report=damaged.append):  # damaged lines are skipped, and named
        if "loss" in r:
            train[r["step"]] = r  # a resumed run re-logs some steps: the later record wins
        if "val_loss" in r:
            val[r["step"]] = r
    if not train and not val:  # one line: the error, naming the damaged lines if that is why
        where = f"{damaged[0]}; " if damaged else f"{path}: "
        raise RunError(f"{where}no training or validation record to plot")
    for msg in damaged:
        warn(msg)
    return {"name": Path(run_dir).name, "train": [train[k] for k in sorted(train)],
            "val": [val[k] for k in sorted(val)]}


def val_table(run: dict) -> str:
    rows = [f"{r['step']:>6}  {r['tokens']:>12,}  {r['val_loss']:.4f}" for r in run["val"]]
    return "\n".join([f"{run['name']}: validation loss", "  step        tokens  val_loss", *rows])


def plot(runs: list[dict], out: str) -> int:
    """Writes the figure of runs (read_run's); returns the number of curves drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (loss_step, loss_tokens), (speed, lr) = axes
    curves = 0
    for i, r in enumerate(runs):
        c = f"C{i}"
        tr, va = r["train"], r["val"]
        for ax, x in ((loss_step, "step"), (loss_tokens, "tokens")):
            ax.plot([p[x] for p in tr], [p["loss"] for p in tr], color=c, label=f"{r['name']} train")
            if va:
                ax.plot([p[x] for p in va], [p["val_loss"] for p in va], color=c, ls="--", label=f"{r['name']} val")
                curves += 1
            curves += 1
        speed.plot([p["step"] for p in tr], [p["tokens_per_sec"] for p in tr], color=c, label=r["name"])
        lr.plot([p["step"] for p in tr], [p["lr"] for p in tr], color=c, label=r["name"])
        curves += 2
    for ax, xl, yl in ((loss_step, "step", "loss"), (loss_tokens, "tokens", "loss"),
                       (speed, "step", "tokens/s"), (lr, "step", "learning rate")):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return curves


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scaling.plot", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (holding metrics.jsonl)")
    ap.add_argument("-o", "--out", default="curves.png")
    ap.add_argument("--table", action="store_true", help="also print each run's validation losses")
    a = ap.parse_args(argv)
    try:
        runs = [read_run(d) for d in a.runs]
        if a.table:
            print("\n\n".join(val_table(r) for r in runs))
        n = plot(runs, a.out)
    except (RunError, FileNotFoundError) as e:  # FileNotFoundError: -o in a folder that is not there
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ImportError:
        print("error: plotting needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {a.out} ({n} curves from {len(a.runs)} run(s))")


if __name__ == "__main__":
    main()

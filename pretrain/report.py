"""``python -m pretrain.report <run dir> [<run dir> ...]``: plots of runs and a summary.

Reads each run's ``metrics.jsonl`` as it stands (a run still going is fine: a line being
written is skipped) and draws, one line per run:

- ``loss.png``: training loss and validation NLL against tokens seen;
- ``training.png``: learning rate, gradient norm, tokens/s and MFU against step;
- ``samples.png``: the validation samples' entropy and generative perplexity over training
  (when the runs drew samples).

It writes them with ``report.md``, which links them and adds each run's last numbers and,
where a run directory has them, its zero-shot table (``zero_shot.json``) and its sampler
table (``samples_summary*.json``). One run: into ``<run dir>/report/``; several: into
``--out`` (default ``./report``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from model.errors import UserError

TRAINING = (("lr", "learning rate"), ("grad_norm", "gradient norm"),
            ("tokens_per_s", "tokens/s"), ("mfu", "MFU"))
SAMPLES = (("val/entropy", "sample entropy (nats)"), ("val/gen_ppl", "generative perplexity"))


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's logged records in step order; a resumed run's repeated steps keep their
    last value, and a line still being written is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; point pretrain.report at a run "
                        "directory (checkpointing.save_dir of a training run).")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the last line of a run that is writing it
        if isinstance(record, dict) and "step" in record:
            by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(x, y) of the records that have a finite ``key``."""
    points = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float))
              and isinstance(r.get(x), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(rows: int, cols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    return plt, fig, [a for row in axes for a in row]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_loss(runs: dict[str, list[dict]], path: Path) -> Path | None:
    plt, fig, (ax,) = _figure(1, 1)
    drawn = False
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        x, y = series(records, "loss", "tokens")
        if x:
            ax.plot(x, y, color=color, alpha=0.8, label=f"{name} train")
            drawn = True
        x, y = series(records, "val/nll", "tokens")
        if x:
            ax.plot(x, y, "o--", color=color, label=f"{name} validation (NLL)")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def plot_panels(runs: dict[str, list[dict]], panels, path: Path, title: str) -> Path | None:
    present = [(k, label) for k, label in panels
               if any(series(records, k)[0] for records in runs.values())]
    if not present:
        return None
    cols = min(2, len(present))
    plt, fig, axes = _figure(math.ceil(len(present) / cols), cols)
    for ax, (key, label) in zip(axes, present):
        for i, (name, records) in enumerate(runs.items()):
            x, y = series(records, key)
            if x:
                ax.plot(x, y, "o-" if len(x) < 30 else "-", color=f"C{i}", label=name,
                        markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(present):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(plt, fig, path)


def _last(records: list[dict], key: str):
    values = series(records, key)[1]
    return values[-1] if values else None


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
            ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def extra_tables(name: str, run_dir: Path) -> list[str]:
    """The zero-shot and sampler tables a run directory holds, as markdown."""
    lines = []
    zero_shot = run_dir / "zero_shot.json"
    if zero_shot.is_file():
        results = json.loads(zero_shot.read_text()).get("zero_shot", {})
        lines += [f"### {name}: zero-shot perplexity", ""]
        lines += _table(["dataset", "PPL", "NLL", "stderr", "tokens"],
                        [[d, r.get("ppl"), r.get("nll"), r.get("stderr"), r.get("tokens")]
                         for d, r in results.items()]) + [""]
    summaries = sorted(run_dir.glob("samples_summary*.json"))
    if summaries:
        rows = []
        for path in summaries:
            s = json.loads(path.read_text())
            rows.append([s.get("predictor"), s.get("steps"), s.get("mean_nfe"),
                         s.get("gen_ppl"), s.get("entropy"), s.get("mauve"),
                         s.get("samples_per_s")])
        lines += [f"### {name}: samplers", ""]
        lines += _table(["predictor", "steps", "NFE", "gen PPL", "entropy", "MAUVE",
                         "samples/s"], rows) + [""]
    return lines


def report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Writes the plots and ``report.md`` for ``run_dirs``; returns the markdown's path."""
    run_dirs = [Path(d).expanduser() for d in run_dirs]
    names = [d.name or str(d) for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    runs = {name: read_metrics(d) for name, d in zip(names, run_dirs)}
    out = Path(out) if out is not None else (
        run_dirs[0] / "report" if len(run_dirs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "Loss": plot_loss(runs, out / "loss.png"),
        "Training": plot_panels(runs, TRAINING, out / "training.png",
                                "learning rate, gradient norm, throughput"),
        "Samples during training": plot_panels(runs, SAMPLES, out / "samples.png",
                                               "validation samples"),
    }
    lines = ["# Run report", ""]
    header = ["run", "step", "tokens", "loss", "val NLL", "val PPL", "tokens/s", "MFU"]
    rows = [[name, _last(r, "step") if r else None, _last(r, "tokens"), _last(r, "loss"),
             _last(r, "val/nll"), _last(r, "val/ppl"), _last(r, "tokens_per_s"),
             _last(r, "mfu")] for name, r in runs.items()]
    lines += _table(header, rows) + [""]
    for title, path in plots.items():
        if path is not None:
            lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    for name, run_dir in zip(names, run_dirs):
        lines += extra_tables(name, run_dir)
    markdown = out / "report.md"
    tmp = markdown.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(markdown)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.report",
                                     description="Plots of one or several runs, and a "
                                                 "markdown summary linking them.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (default: <run>/report for one run, ./report "
                             "for several)")
    args = parser.parse_args(argv)
    try:
        path = report(args.runs, args.out)
    except UserError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

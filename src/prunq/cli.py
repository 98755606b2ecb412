"""``prunq`` command line: compress, sweep, report, evaluate.

Bad input (recipe fields, paths, an existing ``--out``) prints one line ``prunq: error: …`` and exits 2,
leaving nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from prunq.core.errors import PrunqError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunq", description="Joint pruning and quantization to extreme sparsity.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="train or load the dense model, prune, quantize, write a run directory")
    c.add_argument("recipe", type=Path, help="YAML recipe (see recipes/)")
    c.add_argument("--out", type=Path, required=True, help="run directory to create")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it is a prunq run directory (never anything else)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set prune.sparsity=0.99 (YAML value)")  # fmt: skip
    c.add_argument("--quiet", action="store_true", help="no progress bars or summary")

    s = sub.add_parser("sweep", help="grid over sparsity x bit-widths: one table and Pareto plots")
    s.add_argument("recipe", type=Path)
    s.add_argument("--sparsity", type=float, nargs="+", required=True)
    s.add_argument("--weight-bits", type=int, nargs="+", default=None)
    s.add_argument("--act-bits", type=int, nargs="+", default=None)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--overwrite", action="store_true", help="replace --out if it is a prunq sweep directory")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--quiet", action="store_true")

    r = sub.add_parser("report", help="re-render report.md and plots from a saved run directory")
    r.add_argument("run", type=Path)

    e = sub.add_parser("evaluate", help="load a run's compressed model and evaluate it on the task's test split")
    e.add_argument("run", type=Path)
    return p


def _recipe(args):
    import yaml

    from prunq.pipeline.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    changes = {}
    for item in args.set:
        if "=" not in item:
            raise PrunqError(f"--set: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        from prunq.pipeline.recipes import read_yaml

        changes[key.strip()] = read_yaml(value, f"--set {key.strip()}")
    if changes:
        try:
            recipe = recipe.with_(**changes)
        except KeyError as e:
            raise PrunqError(f"--set: unknown recipe field {e.args[0]!r}") from None
    return recipe


def _summary(metrics: dict) -> str:
    c = metrics["compressed"]
    return (
        f"{metrics['task']}: {metrics['metric_name']} dense {metrics['dense']['metric']:.4g} -> "
        f"pruned {metrics['pruned']['metric']:.4g} -> compressed {c['metric']:.4g} | sparsity {c['sparsity']:.4f}, "
        f"w{c['weight_bits']}a{c['act_bits']} | memory x{metrics['memory_ratio']:.4g}, BOPs x{metrics['bops_ratio']:.4g}"
    )


def _bits_check(values, flag):
    from prunq.core.config import check_bits

    for b in values or []:
        check_bits(b, flag)


def cmd_compress(args) -> int:
    from prunq.report.fsutil import atomic_dir
    from prunq.pipeline.runs import compress_recipe, write_run

    recipe = _recipe(args)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        result = compress_recipe(recipe, quiet=args.quiet)
        write_run(Path(tmp), recipe, result)
    if not args.quiet:
        print(_summary(result.metrics))
        print(f"wrote {args.out}/ (report: {args.out / 'report.md'})")
    return 0


def cmd_sweep(args) -> int:
    from prunq.report.fsutil import atomic_dir
    from prunq.report.report import render_sweep
    from prunq.pipeline.sweep import run_sweep

    recipe = _recipe(args)
    from prunq.core.config import check_sparsity

    for s in args.sparsity:
        check_sparsity(s, "--sparsity")
    if recipe.quant is None or recipe.prune is None:
        raise PrunqError(f"{args.recipe}: sweep needs a prune and a quantize method")
    _bits_check(args.weight_bits, "--weight-bits")
    _bits_check(args.act_bits, "--act-bits")
    wbits = args.weight_bits or [recipe.quant.weight_bits]
    abits = args.act_bits or [recipe.quant.act_bits]
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        bits = [(wb, ab) for wb in wbits for ab in abits]
        rows, info = run_sweep(recipe, args.sparsity, bits, Path(tmp), quiet=args.quiet)
        (Path(tmp) / "sweep.json").write_text(json.dumps({"rows": rows, **info}, indent=2))
        render_sweep(Path(tmp), rows, info["metric_name"], info["higher_is_better"], dense=info["dense"])
    if not args.quiet:
        print((args.out / "sweep.md").read_text())
    return 0


def cmd_report(args) -> int:
    from prunq.report.report import render_report

    path = render_report(args.run)
    print(path)
    return 0


def cmd_evaluate(args) -> int:
    from prunq.pipeline.io import load
    from prunq.pipeline.recipes import load_recipe
    from prunq.report.report import load_metrics
    from prunq.pipeline.runs import make_task

    metrics = load_metrics(args.run)
    from prunq.report.fsutil import inside_run

    recipe = load_recipe(inside_run(args.run, "recipe.yaml"))
    model = load(args.run)
    out = make_task(recipe).evaluate(model)
    out = {k: v for k, v in out.items() if isinstance(v, (int, float))}
    out["recorded"] = metrics["compressed"]["metric"]
    print(json.dumps(out))
    return 0


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that half-written runs are cleaned up like on Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prunq`` command."""
    args = _parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return {"compress": cmd_compress, "sweep": cmd_sweep, "report": cmd_report, "evaluate": cmd_evaluate}[
            args.command
        ](args)
    except PrunqError as e:
        print(f"prunq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunq: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("prunq: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

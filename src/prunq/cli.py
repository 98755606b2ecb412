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
    _resume_args(c)

    s = sub.add_parser("sweep", help="grid over sparsity x bit-widths: one table and Pareto plots")
    s.add_argument("recipe", type=Path)
    s.add_argument("--sparsity", type=float, nargs="+", required=True)
    s.add_argument("--weight-bits", type=int, nargs="+", default=None)
    s.add_argument("--act-bits", type=int, nargs="+", default=None)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--overwrite", action="store_true", help="replace --out if it is a prunq sweep directory")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--quiet", action="store_true")
    _resume_args(s)

    r = sub.add_parser("report", help="re-render report.md and plots from a saved run directory")
    r.add_argument("run", type=Path)

    e = sub.add_parser("evaluate", help="load a run's compressed model and evaluate it on the task's test split")
    e.add_argument("run", type=Path)

    x = sub.add_parser("export", help="write a run's compressed model as a deployable file")
    x.add_argument("run", type=Path, help="run directory (written by prunq compress)")
    x.add_argument("--format", default="packed",
                   help="packed (the cost model's size; prunq.load reads it) | qonnx (qonnx, hls4ml, FINN) | onnx "
                        "(ONNX Runtime, int8 QDQ) | onnx-int4 (<=4-bit weights as INT4: smaller) | onnx-fp32 | "
                        "hls4ml (a C++ project directory; needs quant.power_of_two: true)")  # fmt: skip
    x.add_argument("--out", type=Path, required=True, help="file to write")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.add_argument("--remove-channels", action="store_true",
                   help="export the smaller model: channels pruning emptied are removed (outputs unchanged)")
    return p


def _resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue a killed or stopped run from its work directory (OUT.work, kept beside --out)")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS",
                   help="fine-tuning steps between checkpoints in the work directory (default 100; 0: stage "
                        "boundaries only; a sweep checkpoints its dense training and keeps finished points)")  # fmt: skip


def _work(args, recipe, command: str, extra: str = ""):
    """The run's work directory. A resume must match what the run computes from: the resolved recipe,
    ``extra`` (a sweep's grid), prunq's version and the bytes of the recipe's dense checkpoint."""
    import hashlib

    from prunq import __version__
    from prunq.pipeline.checkpoint import WorkDir
    from prunq.pipeline.recipes import dump_recipe

    if args.checkpoint_every < 0:
        raise PrunqError(f"--checkpoint-every: must be >= 0, got {args.checkpoint_every}")
    identity = f"{dump_recipe(recipe)}{extra}\n# prunq {__version__}\n"
    ckpt = recipe.model.checkpoint
    if ckpt and Path(ckpt).is_file():
        h = hashlib.sha256()
        with open(ckpt, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        identity += f"# checkpoint sha256 {h.hexdigest()}\n"
    work = WorkDir.open(args.out, identity, command=command, resume=args.resume, every=args.checkpoint_every)
    args.work = work  # for the interruption message
    if work.resumed:
        print(f"prunq: resuming from {work.path} ({work.describe()})", file=sys.stderr)
    return work


def _run_in(work, body):
    """Run ``body()``; bad input (a PrunqError) removes the work directory — the recipe must change, so
    its checkpoints cannot be resumed — but a divergence keeps it (the last good state) and says where."""
    from prunq.pipeline.training import Diverged

    try:
        return body()
    except Diverged as e:  # the checkpoint is for inspection: --resume needs the same recipe (and would diverge again)
        raise PrunqError(f"{e} (last good checkpoint kept for inspection in {work.path}: {work.describe()})") from None
    except PrunqError:
        work.remove()
        raise


def _recipe(args):
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
    from prunq.pipeline.runs import compress_recipe, write_run
    from prunq.report.fsutil import atomic_dir

    recipe = _recipe(args)
    out = atomic_dir(args.out, overwrite=args.overwrite)  # checks --out and takes its lock, at once
    try:
        work = _work(args, recipe, "compress")
        result = _run_in(work, lambda: compress_recipe(recipe, quiet=args.quiet, work=work))
        with out as tmp:
            write_run(Path(tmp), recipe, result)
        work.remove()
    finally:
        out.close()
    if not args.quiet:
        print(_summary(result.metrics))
        print(f"wrote {args.out}/ (report: {args.out / 'report.md'})")
    return 0


def cmd_sweep(args) -> int:
    from prunq.report.fsutil import atomic_dir
    from prunq.pipeline.sweep import collect_points, run_sweep
    from prunq.report.sweep import render_sweep

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
    out = atomic_dir(args.out, overwrite=args.overwrite)
    try:
        grid = {"sparsity": args.sparsity, "weight_bits": wbits, "act_bits": abits}
        work = _work(args, recipe, "sweep", f"\n# grid: {json.dumps(grid)}\n")
        bits = [(wb, ab) for wb in wbits for ab in abits]
        rows, info = _run_in(work, lambda: run_sweep(recipe, args.sparsity, bits, None, quiet=args.quiet, work=work))
        with out as tmp:
            collect_points(work, rows, Path(tmp))
            (Path(tmp) / "sweep.json").write_text(json.dumps({"rows": rows, **info}, indent=2))
            render_sweep(Path(tmp), rows, info["metric_name"], info["higher_is_better"], dense=info["dense"])
        work.remove()
    finally:
        out.close()
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


def _kept(args) -> str:
    work = getattr(args, "work", None)
    if work is None or not work.path.is_dir():
        return "nothing was written"
    return f"checkpoint kept in {work.path} ({work.describe()}); the same command with --resume continues"


def cmd_export(args) -> int:
    from prunq.pipeline.export import export, export_hls

    if args.format == "hls4ml":
        path = export_hls(args.run, args.out, overwrite=args.overwrite, remove_channels=args.remove_channels)
        totals = json.loads((path / "prunq_hls.json").read_text())["totals"]
        print(f"wrote {path}/ (hls4ml project; {totals['n_zeros']:,} of {totals['n_weights']:,} weights zero, "
              f"multiplier limit {totals['multiplier_limit']:,})")  # fmt: skip
        return 0

    if (args.out.exists() or args.out.is_symlink()) and not args.overwrite:
        raise PrunqError(f"--out: {args.out} exists; pass --overwrite to replace it")
    if args.out.is_dir():
        raise PrunqError(f"--out: {args.out} is a directory")
    path = export(args.run, args.out, args.format, remove_channels=args.remove_channels)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
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
        commands = {"compress": cmd_compress, "sweep": cmd_sweep, "report": cmd_report, "evaluate": cmd_evaluate,
                    "export": cmd_export}  # fmt: skip
        return commands[args.command](args)
    except PrunqError as e:
        print(f"prunq: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: a full disk, a permission (one line, exit 1)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"prunq: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prunq: interrupted; {_kept(args)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"prunq: terminated (SIGTERM); {_kept(args)}", file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

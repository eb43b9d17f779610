"""make docs-figures: one set of numbers in the docs, from runs at one commit.

    python benchmarks/docs_figures.py                       # the demo, scaling and time to accuracy
    python benchmarks/docs_figures.py --parts demo          # the demo only (about 9 minutes on 2 cores)
    python benchmarks/docs_figures.py --parts demo --run runs/demo --wall 552   # an existing demo run

Runs, one after the other, and rewrites from their outputs (each block between its markers,
<!-- NAME:begin --> and <!-- NAME:end -->, with the commit the runs started from and the CPU):
- demo: `mpirun -n 4 python -m mpidd.train --data data/fashion_mnist.h5 --out runs/demo
  --overwrite` (what make demo runs; --np, --preflags): README.md's demo block (wall time and
  headline accuracies), BENCHMARKS.md's demo block (the table it printed) and
  docs/figures/demo_*.png (its report's figures);
- scaling: `python benchmarks/scaling.py` (2x2 to 7x7, runs in --work/scaling): BENCHMARKS.md's
  scaling block and docs/figures/scaling_*.png (the report of its runs: accuracy against N, and
  some of each run's figures);
- tta: `python benchmarks/time_to_accuracy.py --target 0.90` (mpidd against one process and
  DDP): BENCHMARKS.md's tta block and docs/figures/time_to_accuracy.png.
About 25 minutes in all on a 2-core machine.
"""

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PARTS = ("demo", "scaling", "tta")
TTA_FLAGS = ["--target", "0.90", "--global-epochs", "3", "--mpidd-epochs", "2,3,4"]
SCALING_FIGURES = {"runs_accuracy_against_N": "scaling_accuracy_against_N", "4x4_decomposition":
                   "scaling_4x4_decomposition", "4x4_subdomain_accuracy": "scaling_4x4_subdomain_accuracy",
                   "4x4_phases": "scaling_4x4_phases", "7x7_curves": "scaling_7x7_curves",
                   "2x2_confusion": "scaling_2x2_confusion"}
HEADLINE = (("CNN-DNN", "CNN-DNN"), ("average", "average"), ("majority vote", "vote"),
            ("coherent (transfer learning)", "transfer learning"), ("global CNN", "global CNN"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        return found.group(1).strip() if found else "unknown CPU"
    except OSError:
        return "unknown CPU"


def provenance(results: dict) -> str:
    source = results.get("source") or {}
    commit = (source.get("commit") or "unknown")[:7] + (" with local changes" if source.get("dirty") else "")
    return f"commit {commit}, {cpu_model()}, {os.cpu_count()} cores"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{round(seconds % 60):02d}s"


def readme_block(results: dict, wall_s: float) -> str:
    acc = results["accuracy"]
    figures = ", ".join(f"{label} {100 * acc[name]['test']:.2f}%" for name, label in HEADLINE if name in acc)
    return (f"`make demo` took {minutes(wall_s)} wall ({figures}; test accuracy) at {provenance(results)}; "
            f"its table: [BENCHMARKS.md](BENCHMARKS.md#the-demo-now-make-demo).")


def benchmarks_block(results: dict, wall_s: float, table: str) -> str:
    return (f"`make demo` ({results['world_size']} ranks, `--mode compare` on 2x2) took {minutes(wall_s)} wall "
            f"at {provenance(results)}, and printed:\n\n```\n{table}\n```")


def benchmark_block(command: str, output: str, first: str, last: str | None, wall_s: float, results: dict) -> str:
    """A benchmark's block: its command, wall time and provenance, and what it printed from the
    line that starts with `first` to the one that starts with `last` (None: to the end)."""
    lines = output.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(first))
    end = next((k for k in range(start, len(lines)) if last is not None and lines[k].startswith(last)), len(lines) - 1)
    table = "\n".join(lines[start:end + 1]).strip("\n")
    return f"`{command}` took {minutes(wall_s)} wall at {provenance(results)}, and printed:\n\n```\n{table}\n```"


def replace_block(text: str, block: str, where: str, name: str = "demo") -> str:
    """`text` with what stands between <!-- name:begin --> and <!-- name:end --> replaced by `block`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"{where}: expected one {begin} ... {end} block")
    return pattern.sub(lambda _: f"{begin}\n{block}\n{end}", text)


def rewrite(path: str, block: str, name: str = "demo"):
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(replace_block(text, block, path, name))


def tee(cmd: list) -> tuple[str, float]:
    """Run cmd in the project folder, printing its output as it comes; (its output, wall seconds)."""
    start, lines = time.perf_counter(), []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    return "".join(lines), time.perf_counter() - start


def report_figures(runs: list, figures: str, names: dict):
    """The report of `runs`, its figures {report name: docs name} moved to docs/figures."""
    from mpidd.cli.report import write_report
    folder = os.path.dirname(write_report(runs, os.path.join(figures, "report_tmp")))
    for name in os.listdir(folder):
        if name.endswith(".png") and name[:-4] in names:
            os.replace(os.path.join(folder, name), os.path.join(figures, names[name[:-4]] + ".png"))
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)


def demo(args, figures):
    from mpidd.cli.report import format_any, load_results
    run_dir, wall = args.run, args.wall
    if run_dir is None:
        start = time.perf_counter()
        subprocess.run([args.mpirun, "-n", str(args.np), *args.preflags.split(), sys.executable, "-m", "mpidd.train",
                        "--data", args.data, "--out", args.out, "--overwrite"], cwd=ROOT, check=True)
        run_dir, wall = args.out, time.perf_counter() - start
    results = load_results(run_dir)
    rewrite(os.path.join(args.root, "README.md"), readme_block(results, wall))
    rewrite(os.path.join(args.root, "BENCHMARKS.md"), benchmarks_block(results, wall, format_any(results)))
    name = os.path.basename(os.path.normpath(run_dir))
    report_figures([run_dir], figures, {f"{name}_{kind}": f"demo_{kind}" for kind in (
        "decomposition", "subdomain_accuracy", "curves", "accuracy", "phases", "confusion")})
    print(f"README.md, BENCHMARKS.md and docs/figures/demo_*.png from {run_dir} ({provenance(results)})")


def scaling(args, figures):
    from mpidd.cli.report import load_results
    out = os.path.join(args.work, "scaling")
    output, wall = tee([sys.executable, "benchmarks/scaling.py", "--data", args.data, "--out", out])
    grids = ["1x1", "2x2", "4x4", "7x7"]
    results = load_results(os.path.join(out, "2x2"))
    rewrite(os.path.join(args.root, "BENCHMARKS.md"), benchmark_block(
        "python benchmarks/scaling.py --data data/fashion_mnist.h5", output, "mpidd two-level CNN-DNN scaling", None,
        wall, results), "scaling")
    report_figures([os.path.join(out, g) for g in grids], figures, SCALING_FIGURES)
    print(f"BENCHMARKS.md's scaling block and docs/figures/scaling_*.png ({provenance(results)})")


def time_to_accuracy(args, figures):
    from mpidd.cli.report import load_results
    work = os.path.join(args.work, "tta")
    output, wall = tee([sys.executable, "benchmarks/time_to_accuracy.py", "--data", args.data, *TTA_FLAGS,
                        "--workdir", work])
    results = load_results(os.path.join(work, "mpidd_e2"))
    rewrite(os.path.join(args.root, "BENCHMARKS.md"), benchmark_block(
        "python benchmarks/time_to_accuracy.py --data data/fashion_mnist.h5 " + " ".join(TTA_FLAGS), output,
        "Time to test accuracy", "mpidd critical path shorter", wall, results), "tta")
    os.replace(os.path.join(work, "time_to_accuracy.png"), os.path.join(figures, "time_to_accuracy.png"))
    print(f"BENCHMARKS.md's tta block and docs/figures/time_to_accuracy.png ({provenance(results)})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"which to run, of {','.join(PARTS)}")
    p.add_argument("--run", help="demo: an existing finished demo run directory (else the demo runs now)")
    p.add_argument("--wall", type=float, help="with --run: its wall seconds")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "fashion_mnist.h5"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="the demo's run directory")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "docs"), help="the benchmarks' runs")
    p.add_argument("--mpirun", default=os.path.join(os.path.dirname(sys.executable), "mpiexec"))
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--preflags", default="", help="the launcher's flags before the command")
    p.add_argument("--root", default=ROOT, help="where README.md, BENCHMARKS.md and docs/figures are")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        p.error(f"--parts: {','.join(sorted(set(parts) - set(PARTS)))} unknown (of {','.join(PARTS)})")
    if args.run is not None and args.wall is None:
        p.error("--run needs --wall (the run's wall seconds)")
    figures = os.path.join(args.root, "docs", "figures")
    for part, write in (("demo", demo), ("scaling", scaling), ("tta", time_to_accuracy)):
        if part in parts:
            write(args, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())

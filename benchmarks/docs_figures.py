"""make docs-figures: one set of numbers in the docs, from one run at one commit.

    python benchmarks/docs_figures.py                       # runs the demo (mpirun -n 4), then writes
    python benchmarks/docs_figures.py --run runs/demo --wall 552   # an existing demo run, timed elsewhere

Runs `mpirun -n 4 python -m mpidd.train --data data/fashion_mnist.h5 --out runs/demo --overwrite`
(what make demo runs; --np, --preflags), timing it, and then rewrites, from that run's results.json:
- README.md, the block between <!-- demo:begin --> and <!-- demo:end -->: the demo's wall time
  and headline accuracies;
- BENCHMARKS.md, the same markers: the demo's whole table as it printed it;
- docs/figures/demo_*.png: the run's report figures (python -m mpidd.report RUN --out ...);
each with the commit the run started from (results.json's source) and the machine's CPU model.
"""

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"
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


def replace_block(text: str, block: str, where: str) -> str:
    """`text` with what stands between BEGIN and END replaced by `block`."""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"{where}: expected one {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text)


def rewrite(path: str, block: str):
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(replace_block(text, block, path))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="an existing finished demo run directory (else the demo runs now)")
    p.add_argument("--wall", type=float, help="with --run: its wall seconds")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "fashion_mnist.h5"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--mpirun", default=os.path.join(os.path.dirname(sys.executable), "mpiexec"))
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--preflags", default="", help="the launcher's flags before the command")
    p.add_argument("--root", default=ROOT, help="where README.md, BENCHMARKS.md and docs/figures are")
    args = p.parse_args(argv)
    from mpidd.cli.report import format_any, load_results, write_report
    run_dir, wall = args.run, args.wall
    if run_dir is None:
        start = time.perf_counter()
        subprocess.run([args.mpirun, "-n", str(args.np), *args.preflags.split(), sys.executable, "-m", "mpidd.train",
                        "--data", args.data, "--out", args.out, "--overwrite"], cwd=ROOT, check=True)
        run_dir, wall = args.out, time.perf_counter() - start
    elif wall is None:
        p.error("--run needs --wall (the run's wall seconds)")
    results = load_results(run_dir)
    rewrite(os.path.join(args.root, "README.md"), readme_block(results, wall))
    rewrite(os.path.join(args.root, "BENCHMARKS.md"), benchmarks_block(results, wall, format_any(results)))
    figures = os.path.join(args.root, "docs", "figures")
    report = write_report([run_dir], os.path.join(figures, "demo_report"))
    for name in os.listdir(os.path.dirname(report)):  # docs/figures/demo_<figure>.png
        if name.endswith(".png"):
            os.replace(os.path.join(os.path.dirname(report), name),
                       os.path.join(figures, "demo_" + name.split("_", 1)[1]))
    for name in os.listdir(os.path.dirname(report)):
        os.remove(os.path.join(os.path.dirname(report), name))
    os.rmdir(os.path.dirname(report))
    print(f"README.md, BENCHMARKS.md and docs/figures/demo_*.png from {run_dir} ({provenance(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

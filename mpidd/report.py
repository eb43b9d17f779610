"""Readable tables from results.json. No MPI.

    python -m mpidd.report runs/NAME      # print the table of a finished run again
"""

from __future__ import annotations

import json
import sys


def _pct(x):
    return "-" if x is None else f"{100 * x:6.2f}%"


def _int(x):
    return "-" if x is None else f"{x:,}"


def _sec(x):
    return "-" if x is None else f"{x:8.1f}"


def format_table(results: dict) -> str:
    d = results["decomposition"]
    lines = [f"mpidd: grid {d['grid']} overlap {d['overlap']} on {results['data']} "
             f"({d['image_shape']} -> subimages {d['subimage_shape']}), "
             f"{results['world_size']} ranks x {results['threads_per_rank']} threads",
             f"{'model':<24}{'params':>12}{'val acc':>10}{'test acc':>10}{'CPU s':>10}",
             "-" * 66]
    for row in results["models"]:
        lines.append(f"{row['name']:<24}{_int(row.get('params')):>12}{_pct(row.get('val_acc')):>10}"
                     f"{_pct(row.get('test_acc')):>10}{_sec(row.get('cpu_s')):>10}")
    t = results.get("timing", {})
    cp = t.get("critical_path")
    if cp:
        lines.append("-" * 66)
        lines.append(f"two-level critical path: {cp['cpu_s']:.1f} CPU s = slowest rank {cp['slowest_rank']} "
                     f"load+local {cp['local_cpu_s']:.1f} + gather {cp['gather_cpu_s']:.2f} "
                     f"+ coarse {cp['coarse_cpu_s']:.1f}  (wall {cp['wall_s']:.1f} s)")
    g = t.get("global_train_cpu_s")
    if g is not None:
        line = f"global CNN training: {g:.1f} CPU s"
        if cp:
            line += f"  ->  the two-level critical path is {g / cp['cpu_s']:.1f}x shorter"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    path = argv[0].rstrip("/")
    with open(path if path.endswith(".json") else f"{path}/results.json") as f:
        print(format_table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end: the examples under mpirun, in a subprocess, at their --tiny sizes."""

import os
import re

import pytest

from conftest import ROOT
from test_e2e import run

HEAT = os.path.join(ROOT, "examples", "insitu_heat.py")
ROW = re.compile(r"^(local CNN \d \([\d, ]+\)|average|vote|CNN-DNN)\s+([\d.]+)\s+([\d.]+)$", re.M)
RANK_ROW = re.compile(r"^(\d+)\s+[\d.]+\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", re.M)


def table(out):
    """{model: (val, test)}, [(rank, halo bytes, and the classifier's probabilities, results,
    metadata and total bytes sent)] and the CG iterations of a printed table."""
    accuracies = {name: (float(val), float(test)) for name, val, test in ROW.findall(out)}
    ranks = [tuple(int(v.replace(",", "")) for v in row) for row in RANK_ROW.findall(out)]
    iterations = int(re.search(r"CG, (\d+) iterations for all (\d+) samples", out).group(1))
    return accuracies, ranks, iterations


@pytest.mark.parametrize("dim, np_", [(2, 4), (3, 8)])
def test_insitu_heat_tiny(dim, np_):
    proc = run(["--tiny", "--dim", str(dim)], np=np_, timeout=180, script=(HEAT,))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    accuracies, ranks, iterations = table(proc.stdout)
    locals_ = sorted(n for n in accuracies if n.startswith("local CNN"))
    assert [n.split()[2] for n in locals_] == [str(i) for i in range(np_)]
    assert set(accuracies) - set(locals_) == {"average", "vote", "CNN-DNN"}
    assert all(0.0 <= a <= 1.0 for pair in accuracies.values() for a in pair)
    assert accuracies["CNN-DNN"][1] > 0.4  # 4 classes: chance is 0.25 (tiny runs reach about 0.6-0.7)

    # --tiny: 16 (3D: 8) points per axis, 1600/200/400 samples, K = 4, two blocks per axis
    n, K, block = 1600 + 200 + 400, 4, (16 if dim == 2 else 8) // 2
    assert [r for r, *_ in ranks] == list(range(np_))
    for r, halo, probs, results, metadata, total in ranks:
        # every rank of a 2x2 (2x2x2) grid has one neighbour per axis: one float64 face each way per CG step
        assert halo == dim * block ** (dim - 1) * 8 * n * iterations
        # clf.bytes_sent_: float32 (n, K) probabilities of its subdomain, train + val in fit, test in score_all;
        # rank 0's own stay on rank 0
        assert probs == (0 if r == 0 else 4 * K * (1600 + 200 + 400))
        # rank 0 broadcasts fit's scores and histories and score_all's accuracies: small
        assert 0 < results < 50_000 if r == 0 else results == 0
        assert 0 < metadata < 50_000 and total == probs + results + metadata
    assert "parameters, exchange and gradients sent: 0 bytes; fields gathered: 0 bytes" in proc.stdout


def test_insitu_heat_refuses_the_wrong_rank_count():
    proc = run(["--tiny"], np=2, timeout=60, script=(HEAT,))
    assert proc.returncode != 0
    assert "runs on 4 ranks (mpirun -n 4), not 2" in proc.stderr

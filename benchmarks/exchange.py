"""The coherent CNN-DNN's model-parallel exchange against a local CNN's training step.

    mpirun -n 4 python benchmarks/exchange.py             # 2x2, batch 128

It times the model-parallel exchange of the coherent CNN-DNN on its own (gather of
the B x K local outputs of every subdomain to rank 0, scatter of their gradients back), with
all ranks in step (a barrier before), and a local CNN's training step (forward, backward,
Adam) at the same batch size with every rank computing at once, as in coherent training.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mpidd import parallel  # noqa: E402
from mpidd.decomposition import Decomposition, parse_grid, subdomains_of_rank  # noqa: E402
from mpidd.engine import TrainOptions, make_optimizer, to_channels_last, to_float  # noqa: E402
from mpidd.models import CNNConfig, build_cnn, local_width_factor  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(prog="python benchmarks/exchange.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--grid", default="2x2", help="subdomain grid")
    p.add_argument("--image", default="28x28", help="image size")
    p.add_argument("--classes", type=int, default=10, help="K")
    p.add_argument("--batch-size", type=int, default=128, help="B")
    p.add_argument("--steps", type=int, default=2000, help="exchanges to time")
    p.add_argument("--compute-steps", type=int, default=40, help="local training steps to time")
    p.add_argument("--arch", choices=("vgg", "resnet"), default="vgg", help="local CNN family")
    p.add_argument("--width", type=int, default=48, help="width of the global CNN (local: scaled)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    return p


def exchange_benchmark(comm, args):
    rank, size = comm.Get_rank(), comm.Get_size()
    image = parse_grid(args.image)
    dec = Decomposition(image, parse_grid(args.grid), 0)
    N, K, B = dec.num_subdomains, args.classes, args.batch_size
    mine = subdomains_of_rank(rank, size, N)
    exchange = parallel.ModelParallelExchange(comm, mine, N, K)
    local = torch.rand(B, len(mine) * K, requires_grad=True)
    for _ in range(10):  # warm-up
        z = exchange(local)
        torch.autograd.backward(z, torch.ones_like(z))
    parallel.sleepy_barrier(comm)
    start = time.perf_counter()
    for _ in range(args.steps):
        z = exchange(local)
        torch.autograd.backward(z, torch.ones_like(z))  # rank 0: a gradient for every subdomain
    exchange_s = (time.perf_counter() - start) / args.steps

    cfg = CNNConfig(arch=args.arch, width=args.width)
    wf = local_width_factor(1, K, image, dec.subimage_shape, N, cfg)
    models = {i: to_channels_last(build_cnn(1, K, dec.subimage_shape, cfg, wf), 4) for i in mine}
    optimizer = make_optimizer(torch.nn.ModuleList(models.values()), TrainOptions())
    x = torch.randint(0, 256, (B, 1, *dec.subimage_shape), dtype=torch.uint8)
    y = torch.randint(0, K, (B,))
    parallel.sleepy_barrier(comm)
    start = time.perf_counter()
    for s in range(args.compute_steps + 3):
        if s == 3:  # after warm-up
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = sum(torch.nn.functional.cross_entropy(m(to_float(x)), y) for m in models.values())
        loss.backward()
        optimizer.step()
    step_s = (time.perf_counter() - start) / args.compute_steps
    return parallel.gather_to_root(comm, (exchange_s, step_s, len(mine)))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    comm = parallel.world()
    parallel.install_abort_on_error(comm)
    torch.set_num_threads(args.threads or parallel.default_threads(comm))
    parallel.tune_malloc()
    parallel.warm_up_torch()
    results = exchange_benchmark(comm, args)
    if comm.Get_rank() == 0:
        exchange_s = max(r[0] for r in results)
        step_s = max(r[1] for r in results)
        N = sum(r[2] for r in results)
        print(f"benchmarks/exchange.py: {comm.Get_size()} ranks x {torch.get_num_threads()} threads, "
              f"grid {args.grid} (N={N}), K={args.classes}, batch {args.batch_size}; "
              f"{parallel.library_version()}")
        print(f"exchange (gather {args.batch_size}x{N}x{args.classes} float32 + scatter of the gradients): "
              f"{1e6 * exchange_s:.0f} us per step (max over ranks, {args.steps} steps)")
        print(f"local CNN training step ({args.arch}, all ranks at once): {1e3 * step_s:.1f} ms "
              f"(max over ranks, {args.compute_steps} steps)")
        print(f"exchange / (step + exchange) = {100 * exchange_s / (step_s + exchange_s):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

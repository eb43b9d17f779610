"""The methods reach their caller only through a Context's interfaces (Stops, Checkpoints,
Progress): a caller of its own, here one that keeps checkpoints in memory, stops a method,
resumes it, and gets what an uninterrupted run computes."""

import copy

import numpy as np
import pytest
import torch

from mpidd import rundir
from mpidd.decomposition import Decomposition
from mpidd.engine import Control, Preempted, Shard, TrainOptions
from mpidd.methods import twolevel
from mpidd.methods.context import Checkpoints, Context, Progress, Stops
from mpidd.models import CNNConfig

DEC = Decomposition((8, 8), (1, 2), 0)
CFG = twolevel.TwoLevelConfig(cnn=CNNConfig(width=4, hidden=8), local=TrainOptions(epochs=2, batch_size=16))


class StopAtPoll(Stops):
    """Says stop at its `at`-th poll (alone or with a group), never before or after."""

    def __init__(self, at):
        self.at, self.polls = at, 0

    def poll(self):
        self.polls += 1
        return self.polls == self.at

    def poll_group(self, group):
        return self.poll()


class InMemory(Checkpoints):
    """Checkpoints in a dict: the newest state of each loop, handed back as its resume."""

    def __init__(self):
        self.states, self.fields = {}, {}

    def control(self, name, stop, write=True, epoch_saves=True, **fields):
        self.fields[name] = fields

        def save(state):
            self.states[name] = copy.deepcopy(state)  # the loop's model and optimizer live on
        return Control(stop=stop, save=save, resume=copy.deepcopy(self.states.get(name)))


def subsets():
    rng = np.random.default_rng(0)
    x = {s: rng.standard_normal((n, 1, 8, 8)).astype(np.float32) for s, n in (("train", 48), ("val", 16))}
    y = {s: rng.integers(0, 3, len(x[s])) for s in x}
    return {i: {s: Shard(x[s][(slice(None), slice(None)) + DEC.slices(i)], y[s]) for s in x} for i in range(2)}


def fit(ctx):
    return twolevel.fit_local_models(ctx, subsets(), DEC, 1, 3, 1.0, CFG)


def test_default_context_neither_stops_saves_nor_prints(capsys):
    probs, models, histories = fit(Context(comm=None))
    assert sorted(probs) == [0, 1] and all(len(h) == CFG.local.epochs for h in histories.values())
    assert capsys.readouterr().out == ""


def test_a_callers_interfaces_stop_resume_and_report():
    reference, _, _ = fit(Context(comm=None))
    lines, store = [], InMemory()
    ctx = Context(comm=None, stops=StopAtPoll(6), checkpoints=store, progress=Progress(sinks=(lines.append,)))
    with pytest.raises(Preempted):  # an epoch polls before each of its 3 steps and its 1 validation batch:
        fit(ctx)  # the 6th poll is before step 2 of epoch 2 of subdomain 0
    stopped = store.states[rundir.local_checkpoint(0)]
    assert stopped["stopped"] and (stopped["epoch"], stopped["step"]) == (2, 1)
    assert rundir.local_checkpoint(1) not in store.states
    assert store.fields[rundir.local_checkpoint(0)]["box"] == DEC.box(0)
    assert [line.split(":")[0] for line in lines] == [f"local 0 {DEC.coords(0)}"]

    probs, _, histories = fit(Context(comm=None, checkpoints=store, progress=Progress(sinks=(lines.append,))))
    for i in reference:
        for s in reference[i]:
            torch.testing.assert_close(torch.from_numpy(probs[i][s]), torch.from_numpy(reference[i][s]),
                                       rtol=0, atol=0)
    assert [r["epoch"] for r in histories[0]] == [1, 2]
    assert any(line.startswith(f"local 1 {DEC.coords(1)}: epoch 2/2") for line in lines)

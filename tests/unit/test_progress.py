"""The whole run's progress (mpidd.cli.progress) with clocks the test moves: numbered phase
lines, and the time left from the CPU seconds per FLOP and the wall/CPU ratio measured so far."""

import torch

from mpidd.cli.progress import PhaseWork, RunProgress, calibrate, clock_text, training_flops
from mpidd.methods.context import progress_printer


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def tracker(phases, calibrated=None):
    wall, cpu, lines = Clock(), Clock(), []
    return (RunProgress(phases, sinks=(lines.append,), started=0.0, wall=wall, cpu=cpu, calibrated=calibrated),
            wall, cpu, lines)


PHASES = [PhaseWork("local", "local CNNs", 100.0, True), PhaseWork("gather", "gather", 0.0, True),
          PhaseWork("coarse", "coarse DNN", 200.0, False), PhaseWork("global", "global CNN", 200.0, True, 2.0)]


def test_phase_lines_are_numbered_and_say_the_time_left_once_measured():
    p, wall, cpu, lines = tracker(PHASES)
    wall.t = 3.0
    p.start("local")
    assert lines == ["phase 1 of 4: local CNNs (run 0:00:03 so far)"]  # nothing measured yet
    wall.t, cpu.t = 13.0, 5.0  # 100 FLOPs in 5 CPU s (0.05 s a FLOP), 10 s of wall: shared ranks at 2x
    p.start("gather")
    p.start("coarse")
    # coarse: 200 x 0.05 alone = 10 s; global: 200 x 0.05 x 2 / 2 threads = 10 s
    assert lines[-1] == "phase 3 of 4: coarse DNN (run 0:00:13 so far, run about 0:00:20 left)"
    wall.t, cpu.t = 15.0, 7.0
    assert p.suffix(4.0) == " | run 0:00:14 left"  # 4 s of this phase's own ETA + 10 s of the global CNN
    p.start("unknown")  # a phase the run does not list: ends the current one, prints nothing
    assert len(lines) == 3
    p.finish()
    assert p.left_s(1.0) is None


def test_before_any_phase_ends_the_current_phase_measures_the_rate():
    p, wall, cpu, lines = tracker(PHASES)
    p.start("local")
    assert p.suffix(30.0) == ""  # no time and no CPU yet: no estimate
    wall.t, cpu.t = 10.0, 5.0
    # 10 s done and 30 s to go: a quarter of 100 FLOPs in 5 CPU s = 0.2 s a FLOP, wall/CPU 2
    # coarse 200 x 0.2 = 40 s alone; global 200 x 0.2 x 2 / 2 threads = 40 s
    assert p.left_s(30.0) == 30.0 + 40.0 + 40.0
    assert p.suffix(30.0) == " | run 0:01:50 left"


def test_progress_lines_end_with_the_suffix():
    lines = []
    report = progress_printer("local 0 (0, 0)", 3, 0, (lines.append,), suffix=lambda eta: f" | left {eta:.0f}")
    report({"epoch": 1, "batch": 8, "batches": 16, "loss": 0.5, "acc": 0.75, "images_per_s": 100.0, "eta_s": 12.0})
    assert lines == ["local 0 (0, 0): epoch 1/3 batch 8/16 loss 0.5000 acc 75.00% 100 img/s ETA 0:00:12 | left 12"]


def test_training_flops_and_clock_text():
    assert training_flops(2.0, 3, 10, 4, 5) == 2.0 * (3 * (30 + 4) + 5)
    assert clock_text(3725.4) == "1:02:05" and clock_text(-1) == "0:00:00"


def test_each_model_at_its_own_rate_calibrated_until_measured():
    """Phases of one model run at its measured rate; a model not run yet at its calibrated rate
    times how the measured ones compared with theirs (here 2x)."""
    phases = [PhaseWork("local", "local CNNs", 100.0, False, model="local"),
              PhaseWork("coarse", "coarse DNN", 10.0, False, model="coarse"),
              PhaseWork("coherent", "coherent", 50.0, False, model="local"),
              PhaseWork("global", "global CNN", 1000.0, False, 2.0, model="global")]
    p, wall, cpu, lines = tracker(phases, calibrated={"local": 0.05, "coarse": 0.1, "global": 0.01})
    p.start("local")
    wall.t, cpu.t = 10.0, 10.0  # 100 FLOPs in 10 CPU s: 0.1 s a FLOP, twice the calibration
    p.start("coarse")
    # coarse 10 x 0.1 x 2 = 2 s; coherent 50 x 0.1 = 5 s; global 1000 x 0.01 x 2 / 2 threads = 10 s
    assert p.left_s(None) == 2.0 + 5.0 + 10.0
    wall.t, cpu.t = 30.0, 30.0  # the coarse DNN took 20 CPU s: 2 s a FLOP (its own; local stays at 0.1)
    p.start("coherent")
    # correction now (10 + 20) / (100 x 0.05 + 10 x 0.1) = 5: global 1000 x 0.01 x 5 / 2 = 25 s
    assert p.left_s(None) == 5.0 + 25.0


def test_calibration_measures_a_step_and_leaves_the_random_state():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    rate = calibrate(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (1, 8, 8), 10, 32)
    assert torch.equal(torch.rand(4), expected)
    assert 0 < rate < 1e-6  # a few ns a FLOP on any CPU for this small model

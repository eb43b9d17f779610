"""Dense prediction's pure core (serial): U-Nets, their scores and losses, their training loop."""

import copy

import numpy as np
import pytest
import torch

from mpidd.dense import evaluate_dense, predict_dense, train_dense
from mpidd.engine import Control, Preempted, TrainOptions
from mpidd.metrics import (dense_loss, regression_scores, regression_sums, segmentation_scores, segmentation_sums,
                           soft_dice_loss, ssim)
from mpidd.models import count_parameters
from mpidd.unet import UNetConfig, build_unet, matching_width_factor
from test_engine import StopAfter


# ---- U-Nets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,pooled", [((16, 16), [True, True]), ((6, 6), [True, False]), ((7, 7), [False, False]),
                                          ((8, 8, 4), [True, True]), ((5, 6, 7), [False, False])])
def test_unet_keeps_the_input_shape_and_pools_where_it_can(shape, pooled):
    torch.manual_seed(0)
    net = build_unet(2, 3, shape, UNetConfig(width=4, depth=2))
    assert net.pooled == pooled
    x = torch.randn(2, 2, *shape)
    out = net(x)
    assert out.shape == (2, 3) + shape
    bottleneck, skips = net.encode(x)
    assert bottleneck.shape == (2,) + net.bottleneck_shape
    assert torch.equal(net.decode(bottleneck, skips), out)
    assert torch.equal(net(x, torch.zeros_like(bottleneck)), out)
    assert not torch.allclose(net(x, torch.ones_like(bottleneck)), out)  # the coarse correction reaches the output


@pytest.mark.parametrize("image,sub,N", [((64, 64), (32, 32), 4), ((64, 64), (16, 16), 16), ((32,) * 3, (16,) * 3, 8)])
def test_a_local_unet_has_about_one_nth_of_the_global_parameters(image, sub, N):
    cfg = UNetConfig()
    wf = matching_width_factor(1, 1, image, sub, N, cfg)
    ratio = count_parameters(build_unet(1, 1, image, cfg)) / count_parameters(build_unet(1, 1, sub, cfg, wf))
    assert 0.85 * N < ratio <= 1.0001 * N and wf < 1


# ---- scores and losses ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 24, 20), (2, 16, 12), (1, 12, 14, 13)])
def test_ssim_is_scikit_images(shape):
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(0)
    target = rng.random((3,) + shape)
    pred = target + 0.2 * rng.standard_normal(target.shape)
    ours = ssim(pred, target, data_range=1.0)
    for k in range(3):
        theirs = structural_similarity(pred[k], target[k], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, channel_axis=0)
        assert ours[k] == pytest.approx(theirs, abs=1e-9)
    assert ssim(target, target, 1.0) == pytest.approx(np.ones(3))


def test_regression_scores_add_across_boxes():
    rng = np.random.default_rng(1)
    target, pred = rng.random((5, 2, 8, 8)), rng.random((5, 2, 8, 8))
    whole = regression_scores(regression_sums(pred, target))
    halves = [regression_sums(pred[..., :, s], target[..., :, s]) for s in (slice(0, 3), slice(3, 8))]
    summed = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    assert regression_scores(summed) == pytest.approx(whole)
    err = pred - target
    assert whole["mae"] == pytest.approx(np.abs(err).mean()) and whole["mse"] == pytest.approx((err ** 2).mean())
    rel = [np.linalg.norm(err[k]) / np.linalg.norm(target[k]) for k in range(5)]
    assert whole["rel_l2"] == pytest.approx(np.mean(rel))


def test_segmentation_scores_by_hand():
    target = np.array([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    scores = segmentation_scores(segmentation_sums(pred, target, 4))  # class 3 occurs nowhere
    # class 0: tp 2 (of 3 targets, 3 predicted) -> IoU 2/4; class 1: tp 2, fp 1 -> 2/3; class 2: tp 2, fn 1 -> 2/3
    assert scores["iou"][:3] == pytest.approx([2 / 4, 2 / 3, 2 / 3]) and scores["iou"][3] is None
    assert scores["miou"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert scores["dice"][:3] == pytest.approx([4 / 6, 4 / 5, 4 / 5]) and scores["dice"][3] is None
    assert scores["pixel_acc"] == pytest.approx(6 / 8)
    halves = segmentation_sums(pred[:, :2], target[:, :2], 4) + segmentation_sums(pred[:, 2:], target[:, 2:], 4)
    assert segmentation_scores(halves) == segmentation_scores(segmentation_sums(pred, target, 4))


def test_dense_losses():
    target = torch.tensor([[[0, 1], [1, 2]]])
    perfect = 50.0 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0, abs=1e-6)
    assert dense_loss("segment", "ce+dice")(perfect, target).item() == pytest.approx(0, abs=1e-6)
    assert dense_loss("segment", "dice")(torch.zeros(1, 3, 2, 2), target).item() > 0.3
    assert dense_loss("regress", "l1")(torch.ones(2, 1, 3), torch.zeros(2, 1, 3)).item() == 1.0
    with pytest.raises(ValueError, match="--loss dice does not fit --task regress"):
        dense_loss("regress", "dice")


# ---- the training loop ----------------------------------------------------------------------------
def blobs(n=160, size=8, seed=0):
    """Images of random blobs; the regression target is a blurred copy, the mask its level sets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    field = torch.nn.functional.avg_pool2d(x, 3, 1, 1) * 2.0
    masks = (field[:, 0] > 1.0).long() + (field[:, 0] > 1.2).long()
    return x.numpy(), field.numpy(), masks.numpy()


def fit(task, loss, epochs=8, control=None, seed=3):
    x, field, masks = blobs()
    t = field if task == "regress" else masks
    torch.manual_seed(seed)
    net = build_unet(1, 1 if task == "regress" else 3, (8, 8), UNetConfig(width=4, depth=1))
    opts = TrainOptions(epochs=epochs, batch_size=16, lr=1e-2)
    history, _ = train_dense(net, (x[:128], t[:128]), (x[128:], t[128:]), opts, seed, task, loss, control=control)
    return net, history, (x[128:], t[128:])


@pytest.mark.parametrize("task,loss", [("regress", "mse"), ("regress", "l1"), ("segment", "ce"),
                                       ("segment", "ce+dice")])
def test_train_dense_learns(task, loss):
    torch.set_num_threads(1)
    net, history, (x, t) = fit(task, loss)
    first, last = history[0], history[-1]
    assert last["val_loss"] < 0.6 * first["val_loss"]
    if task == "regress":
        assert last["val_acc"] < first["val_acc"]  # the MAE falls
        pred = predict_dense(net, x).numpy()
        assert regression_scores(regression_sums(pred, t))["mae"] == pytest.approx(last["val_acc"], rel=1e-5)
    else:
        assert last["val_acc"] > 0.75 and last["val_acc"] > first["val_acc"]
        pred = predict_dense(net, x).argmax(1).numpy()
        assert segmentation_scores(segmentation_sums(pred, t, 3))["pixel_acc"] == pytest.approx(last["val_acc"])
    assert evaluate_dense(net, x, t, task, loss) == pytest.approx((last["val_loss"], last["val_acc"]))


@pytest.mark.parametrize("stop_at", [2, 5, 11])
def test_stopped_and_resumed_dense_training_is_the_uninterrupted_one(stop_at):
    torch.set_num_threads(1)
    reference, ref_history, (x, _) = fit("segment", "ce", epochs=2)
    saved = []
    with pytest.raises(Preempted):
        fit("segment", "ce", epochs=2, control=Control(stop=StopAfter(stop_at), save=lambda s: saved.append(
            copy.deepcopy(s))))
    resumed, history, _ = fit("segment", "ce", epochs=2, control=Control(resume=saved[-1]))
    keys = ("loss", "acc", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in history] == [[r[k] for k in keys] for r in ref_history]
    assert torch.equal(predict_dense(resumed, x), predict_dense(reference, x))


@pytest.mark.parametrize("grid,shape", [((2, 2), (3, 4, 4)), ((2, 3, 2), (2, 2, 3, 2)), ((1, 4), (1, 2, 2))])
def test_the_coarse_map_puts_each_bottleneck_at_its_grid_position(grid, shape):
    from mpidd.decomposition import Decomposition
    from mpidd.unet import CoarseCorrection
    net = CoarseCorrection(grid, shape, hidden=4)
    dec = Decomposition(tuple(g * h for g, h in zip(grid, shape[1:])), grid)
    N, F = dec.num_subdomains, int(np.prod(shape))
    flat = torch.randn(3, N * F)
    coarse = net.to_map(flat)
    assert coarse.shape == (3, shape[0]) + dec.shape
    for i in range(N):  # the decomposition's box of subdomain i holds its bottleneck
        block = flat[:, i * F:(i + 1) * F].reshape(3, *shape)
        assert torch.equal(coarse[(slice(None), slice(None)) + dec.slices(i)], block)
    assert torch.equal(net.from_map(coarse), flat)
    assert torch.equal(net(flat), torch.zeros_like(flat))  # zero at the start: the local-only model


def test_a_cropped_unet_predicts_its_tile_of_the_box():
    """With crop, the output is the uncropped output's tile: the halo is seen, not predicted."""
    torch.manual_seed(0)
    full = build_unet(2, 3, (12, 12), UNetConfig(width=4, depth=2))
    cropped = build_unet(2, 3, (12, 12), UNetConfig(width=4, depth=2), crop=(slice(2, 10), slice(4, 12)))
    cropped.load_state_dict(full.state_dict())
    x = torch.rand(5, 2, 12, 12)
    full.eval(), cropped.eval()
    assert cropped(x).shape == (5, 3, 8, 8) and torch.equal(cropped(x), full(x)[:, :, 2:10, 4:12])


# ---- the estimator (one process) ------------------------------------------------------------------
TINY = dict(grid="2x2", epochs=1, batch_size=16, unet_width=4, unet_depth=1, coarse_channels=8, coarse_epochs=1,
            coarse_batch_size=16, coherent_epochs=1, threads=1)


def test_the_dense_estimator_fits_predicts_and_follows_scikit_learn():
    """On one process: fit holds out a validation share, predict gives whole fields, score is
    R^2 (1 - MSE / variance); clone keeps the hyperparameters; fit_coherent from random weights."""
    import sklearn.base
    from mpi4py import MPI

    import mpidd
    x, field, _ = blobs(96)
    net = mpidd.TwoLevelUNet(task="regress", comm=MPI.COMM_SELF, **TINY).fit(x[:64], field[:64])
    assert sorted(net.scores_) == ["local-only", "two-level"] and net.n_subdomains_ == 4
    assert len(net.history_["local_0"]) == 1 and net.out_channels_ == 1
    pred = net.predict(x[64:])
    assert pred.shape == (32, 1, 8, 8) and pred.dtype == np.float32
    s = net.scores(x[64:], field[64:])
    assert s["mae"] == pytest.approx(np.abs(pred - field[64:]).mean(), rel=1e-5)
    assert net.score(x[64:], field[64:]) == pytest.approx(1 - s["mse"] / field[64:].var(), rel=1e-6)
    twin = sklearn.base.clone(net)
    assert twin.get_params()["unet_width"] == 4 and not hasattr(twin, "scores_")
    net.fit_coherent(x[:64], field[:64], init="random")
    assert "coherent-random" in net.scores_ and not np.array_equal(net.predict(x[64:], "coherent-random"), pred)


def spread(n, seed):
    """Sparse sources (n, 1, 16, 16) and the fields a 9x9 box blur makes of them: reaching 4
    pixels into the neighbouring 8x8 tiles."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 16, 16, generator=g) > 0.9).float() * torch.rand(n, 1, 16, 16, generator=g)
    u = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (4, 4, 4, 4)), 9, 1) * 9
    return x.numpy(), u.numpy()


def test_the_dense_estimator_sees_a_halo_and_predicts_its_tiles():
    """overlap=2: each local U-Net sees its tile with 2 pixels of its neighbours' and predicts
    its tile (stitched at the tile's place); on fields that reach across the tiles the halo
    lowers the local-only error (measured 0.112 -> 0.078 on an AMD EPYC)."""
    from mpi4py import MPI

    import mpidd
    x, u = spread(160, 0)
    test_x, test_u = spread(64, 1)
    opts = dict(TINY, epochs=15, lr=1e-2, coarse_epochs=1)
    mae, nets = {}, {}
    for overlap in (0, 2):
        nets[overlap] = mpidd.TwoLevelUNet(task="regress", overlap=overlap, comm=MPI.COMM_SELF, **opts).fit(
            x[:128], u[:128], x[128:], u[128:])
        mae[overlap] = nets[overlap].scores(test_x, test_u, "local-only")["mae"]
    assert mae[2] < 0.85 * mae[0], mae
    net, dec = nets[2], nets[2].decomposition((1, 16, 16))
    assert dec.subimage_shape == (12, 12) and dec.tile_shape == (8, 8)
    pred = net.predict(test_x, "local-only")
    local = net._models["local-only"][0]  # {subdomain: U-Net}: each one's own output, by hand
    with torch.no_grad():
        for i, model in local.items():
            box = torch.as_tensor(test_x[(slice(None), slice(None)) + dec.slices(i)])
            full = build_unet(1, 1, (12, 12), net.config().unet, net.width_factor_)
            full.load_state_dict(model.state_dict())
            want = full.eval()(box)[(slice(None), slice(None)) + dec.crop(i)]
            assert np.allclose(pred[(slice(None), slice(None)) + dec.tile_slices(i)], want.numpy(), atol=1e-6), i
    with pytest.raises(ValueError, match="overlap 3 too large"):
        mpidd.TwoLevelUNet(task="regress", overlap=3, comm=MPI.COMM_SELF, **TINY).fit(x[:64, :, :8, :8],
                                                                                     u[:64, :, :8, :8])


def test_the_dense_estimator_refuses_bad_input_in_one_line():
    from mpi4py import MPI

    import mpidd
    x, field, mask = blobs(48)
    nan = field.copy()
    nan[3, 0, 6, 6] = np.nan
    cases = [(dict(task="regress"), (x, field[:, :, :4]), "task regress needs fields t (n, C_out, 8, 8)"),
             (dict(task="regress"), (x, nan), "targets hold NaN or inf values in subdomain 3"),
             (dict(task="segment", num_classes=2), (x, mask), "masks hold classes outside 0..1"),
             (dict(task="segment"), (x, field), "task segment needs masks t (48, 8, 8)"),
             (dict(task="regress", loss="dice"), (x, field), "--loss dice does not fit --task regress"),
             (dict(task="classify"), (x, field), "task must be regress or segment"),
             (dict(task="regress", grid="3x3"), (x, field), "does not divide images"),
             (dict(task="regress", device="cuda"), (x, field), "trains on the CPU: device must be None or 'cpu'")]
    for kw, args, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            mpidd.TwoLevelUNet(comm=MPI.COMM_SELF, **{**TINY, **kw}).fit(*args)
    net = mpidd.TwoLevelUNet(task="regress", comm=MPI.COMM_SELF, **TINY)
    with pytest.raises(ValueError, match="starts from the two-level model: call fit first"):
        net.fit_coherent(x, field)
    net.fit(x, field)
    with pytest.raises(ValueError, match="model 'coherent-random' is not fitted"):
        net.predict(x, "coherent-random")


@pytest.mark.parametrize("shape,affine,tiles", [((3, 4, 5, 6), True, 1), ((2, 3, 4, 5, 6), True, 1),
                                                ((3, 4, 5, 6), False, 1), ((6, 4, 5, 6), True, 3)])
def test_tile_batchnorm_in_one_process_is_batchnorm(shape, affine, tiles):
    """TileBatchNorm with every subdomain in one process (1, or 3 of 2 samples each): nn.BatchNorm's
    outputs, input and parameter gradients (the subdomains' parts added by sum_gradients), running
    statistics (float64), in training and eval mode."""
    import copy
    import torch
    from mpidd.tiled_unet import Tiles, tile_wise
    torch.manual_seed(0)
    bn = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm3d)(shape[1], affine=affine).double()
    if affine:
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.uniform_(bn.bias, -1, 1)
    parts = Tiles(tiles)
    tiled = tile_wise(torch.nn.Sequential(copy.deepcopy(bn).float()), parts).double()
    tiled[0].load_state_dict(bn.state_dict())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(shape, dtype=torch.float64)
    y, y2 = bn(x), tiled(x2)
    y.backward(g)
    y2.backward(g)
    if affine:
        assert all(p.grad is None for p in tiled.parameters())  # the subdomains' copies hold the parts
    parts.sum_gradients(tiled)
    assert torch.allclose(y, y2, atol=1e-12) and torch.allclose(x.grad, x2.grad, atol=1e-12)
    for p, q in zip(bn.parameters(), tiled[0].parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-12)
    for a, b in zip(bn.buffers(), tiled[0].buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-12)
    bn.eval(), tiled.eval()
    assert torch.allclose(bn(x), tiled(x), atol=1e-12)
    assert not torch.allclose(y2, tiled(x), atol=1e-3)  # training used the batch's statistics


def test_tile_convolutions_keep_each_subdomains_gradient_apart():
    """A tile-wise convolution (no halo) over 3 subdomains in one process: the convolution's output;
    the copies' gradients are each subdomain's part (a convolution on its samples alone), and
    sum_gradients adds them in subdomain order (ordered_sum), returning the extra columns' sums."""
    import torch
    from mpidd.tiled_unet import Tiles, ordered_sum, tile_wise
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    parts = Tiles(3)
    tiled = tile_wise(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1)), parts)
    tiled.load_state_dict({"0." + k: v for k, v in conv.state_dict().items()})
    assert [n for n, _ in tiled.named_parameters()] == ["0.weight", "0.bias"]
    x = torch.randn(6, 2, 5, 5)
    out = tiled(x)
    assert torch.allclose(out, conv(x), atol=1e-6)
    out.square().sum().backward()
    one = []
    for k in range(3):
        conv.zero_grad()
        conv(x[2 * k:2 * k + 2]).square().sum().backward()
        one.append(conv.weight.grad.clone())
    weight_copies = parts._copies[tiled[0].weight][1]
    assert all(torch.equal(c.grad, g) for c, g in zip(weight_copies, one))
    extra = parts.sum_gradients(tiled, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert torch.equal(tiled[0].weight.grad, ordered_sum(torch.stack(one))) and extra.tolist() == [9.0, 12.0]
    assert not parts._copies  # dropped: the next step copies the stepped weights

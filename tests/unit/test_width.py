"""Width decomposition and recomposition (Gu, Zhang, Liu & Cai): serial, no MPI."""

import dataclasses

import numpy as np
import pytest
import torch

from mpidd.engine import TrainOptions, evaluate, train_classifier
from mpidd.models import CNNConfig, build_cnn, count_parameters
from mpidd.recomposition import WidthError, build_subnet, recompose_weights, subnet_config

CONFIGS = {
    "vgg": CNNConfig(arch="vgg", width=12, depth=2, hidden=24),
    "vgg-nobn-3d": CNNConfig(arch="vgg", width=8, depth=2, hidden=8, batchnorm=False),
    "resnet": CNNConfig(arch="resnet", width=8, depth=3, blocks_per_stage=2),
    "resnet-nobn-3d": CNNConfig(arch="resnet", width=4, depth=2, blocks_per_stage=1, batchnorm=False),
    "ctcnn": CNNConfig(arch="ctcnn", width=8, depth=3, hidden=16),
    "ctcnn-3d": CNNConfig(arch="ctcnn", width=8, depth=2, hidden=8),
}


def randomised_subnets(cfg, M, shape, channels=2, K=5, seed=0):
    """Sub-networks with random weights and random BatchNorm statistics (so eval mode is no identity)."""
    torch.manual_seed(seed)
    subs = [build_subnet(channels, K, shape, cfg, M) for _ in range(M)]
    for s in subs:
        for mod in s.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-0.2, 0.2)
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.data.uniform_(-0.2, 0.2)
        s.eval()
    return subs


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("M", [2, 4])
def test_recomposed_features_are_concatenated_and_logits_averaged(name, M):
    cfg = CONFIGS[name]
    shape = (6, 10, 10) if name.endswith("3d") else (16, 16)
    subs = randomised_subnets(cfg, M, shape)
    torch.manual_seed(99)  # the global network's own random init must be overwritten everywhere
    glob = recompose_weights(subs, build_cnn(2, 5, shape, cfg)).eval()
    x = torch.randn(7, 2, *shape)
    with torch.no_grad():
        # layer by layer (a VGG conv/BN/ReLU/pool, a ResNet stem layer or residual block), then
        # inside the head too (VGG's dense layer is block-diagonal), all but the classifier
        g, parts = x, [x] * M
        for k, layer in enumerate(glob.features):
            g, parts = layer(g), [s.features[k](p) for s, p in zip(subs, parts)]
            assert torch.allclose(g, torch.cat(parts, 1), atol=1e-5), f"feature layer {k}"
        for k, layer in enumerate(glob.head[:-1]):
            g, parts = layer(g), [s.head[k](p) for s, p in zip(subs, parts)]
            assert torch.allclose(g, torch.cat(parts, 1), atol=1e-5), f"head layer {k}"
        mean_logits = torch.stack([s(x) for s in subs]).mean(0)
        assert torch.allclose(glob(x), mean_logits, atol=1e-5)


def test_recomposed_train_mode_batchnorm_also_matches():
    cfg, M = CONFIGS["resnet"], 2
    subs = randomised_subnets(cfg, M, (12, 12))
    glob = recompose_weights(subs, build_cnn(2, 5, (12, 12), cfg)).train()
    for s in subs:
        s.train()
    x = torch.randn(9, 2, 12, 12)
    with torch.no_grad():
        assert torch.allclose(glob.features(x), torch.cat([s.features(x) for s in subs], 1), atol=1e-5)


def test_noise_fills_off_diagonal_blocks_only():
    cfg, M = CONFIGS["vgg"], 2
    subs = randomised_subnets(cfg, M, (16, 16))
    exact = recompose_weights(subs, build_cnn(2, 5, (16, 16), cfg))
    noisy = recompose_weights(subs, build_cnn(2, 5, (16, 16), cfg), noise=0.1, seed=1)
    conv = noisy.features[3].weight  # the second conv: 12 -> 12 channels, blocks of 6
    assert torch.equal(conv[:6, :6], exact.features[3].weight[:6, :6])
    assert torch.equal(exact.features[3].weight[:6, 6:], torch.zeros(6, 6, 3, 3))
    off = conv[:6, 6:]
    assert off.abs().max() > 0
    assert 0.03 < off.std() / subs[0].features[3].weight.std() < 0.3  # noise x the block's scale
    x = torch.randn(4, 2, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(noisy.eval()(x), exact.eval()(x), atol=1e-5)
    # the first convolution, BatchNorm and the classifier have no off-diagonal blocks: untouched
    exact_state, noisy_state = exact.state_dict(), noisy.state_dict()
    for key in ("features.0.weight", "features.1.weight", "features.1.running_var", "head.5.weight", "head.5.bias"):
        assert torch.equal(noisy_state[key], exact_state[key]), key


def test_subnet_config_splits_every_width_and_refuses_what_does_not_split():
    cfg = CNNConfig(width=48, hidden=128)
    assert subnet_config(cfg, 4) == dataclasses.replace(cfg, width=12, hidden=32)
    assert subnet_config(CNNConfig(arch="resnet", width=16), 4).width == 4
    with pytest.raises(WidthError, match="--width 48 is not divisible by --subnets 5"):
        subnet_config(cfg, 5)
    with pytest.raises(WidthError, match="--hidden 100"):
        subnet_config(CNNConfig(width=48, hidden=100), 8)
    with pytest.raises(WidthError, match="--hidden 100"):
        subnet_config(CNNConfig(arch="ctcnn", width=48, hidden=100), 8)
    with pytest.raises(WidthError, match="a DenseNet's concatenated features"):
        subnet_config(CNNConfig(arch="densenet", width=48), 4)
    # M thin networks hold fewer weights than the global one: the off-diagonal blocks
    sub, glob = build_subnet(1, 10, (28, 28), cfg, 4), build_cnn(1, 10, (28, 28), cfg)
    assert 4 * count_parameters(sub) < count_parameters(glob)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("sklearn")
    from data_prep.digits import load
    return load()


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_recomposed_loss_at_most_mean_subnet_loss_on_real_digits(digits, arch):
    """The paper's bound in the form that holds here: cross-entropy is convex in the logits and
    the recomposed logits are the sub-networks' mean, so loss(recomposed) <= mean loss(subnets)."""
    cfg, M = CNNConfig(arch=arch, width=8, depth=2, hidden=16, blocks_per_stage=1), 2
    subs = []
    for m in range(M):  # trained briefly on different seeds: different networks, all useful
        torch.manual_seed(m)
        sub = build_subnet(1, 10, (8, 8), cfg, M)
        train_classifier(sub, digits["train"], None, TrainOptions(epochs=6, batch_size=32, lr=3e-3), seed=m)
        subs.append(sub)
    glob = recompose_weights(subs, build_cnn(1, 10, (8, 8), cfg))
    x, y = digits["test"]
    sub_losses = [evaluate(s, x, y)[0] for s in subs]
    loss, acc = evaluate(glob, x, y)
    assert max(sub_losses) - min(sub_losses) > 1e-3  # the sub-networks do differ
    assert loss <= np.mean(sub_losses) + 1e-6
    assert acc > 0.5  # real learning: 10 classes, chance is 0.1

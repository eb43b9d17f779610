import pytest
import torch

from mpidd.engine import TrainOptions, predict_proba, train_classifier
from mpidd.models import CNNConfig, CoarseDNN, build_cnn, count_parameters, local_width_factor
from mpidd.seeds import derive_seed


@pytest.mark.parametrize("shape", [(28, 28), (14, 14), (16, 16), (4, 4), (18, 10)])
def test_vgg_output_shape(shape):
    model = build_cnn(1, 10, shape, CNNConfig())
    assert model(torch.rand(3, 1, *shape)).shape == (3, 10)


def test_vgg_3d_and_depth_width():
    cfg = CNNConfig(width=4, depth=3, convs_per_block=1, hidden=8)
    model = build_cnn(2, 5, (8, 8, 8), cfg)
    assert model(torch.rand(2, 2, 8, 8, 8)).shape == (2, 5)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [4, 8, 16]


def test_parameters_do_not_depend_on_input_size_and_scale_with_width():
    cfg = CNNConfig()
    assert count_parameters(build_cnn(1, 10, (28, 28), cfg)) == count_parameters(build_cnn(1, 10, (14, 14), cfg))
    assert (count_parameters(build_cnn(1, 10, (28, 28), cfg, 0.5))
            < count_parameters(build_cnn(1, 10, (28, 28), cfg)) / 3)


@pytest.mark.parametrize("N,sub", [(4, (14, 14)), (16, (7, 7)), (2, (28, 14))])
def test_local_width_factor_gives_about_one_nth_of_the_parameters(N, sub):
    cfg = CNNConfig()
    wf = local_width_factor(1, 10, (28, 28), sub, N, cfg)
    ratio = count_parameters(build_cnn(1, 10, sub, cfg, wf)) / count_parameters(build_cnn(1, 10, (28, 28), cfg))
    assert 0.7 / N < ratio < 1.3 / N


def test_coarse_dnn_shapes():
    dnn = CoarseDNN(40, 10, hidden=(32, 16), dropout=0.2)
    assert dnn(torch.rand(5, 40)).shape == (5, 10)
    assert len([m for m in dnn.modules() if isinstance(m, torch.nn.Linear)]) == 3


def test_training_is_reproducible_and_learns():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = (torch.rand(256, 1, 8, 8, generator=g) * 100 + y[:, None, None, None] * 120).to(torch.uint8)
    results = []
    for _ in range(2):
        seed = derive_seed(7, 0, 3)
        torch.manual_seed(seed)
        model = build_cnn(1, 2, (8, 8), CNNConfig(width=4, hidden=8))
        history, _ = train_classifier(model, (x.numpy(), y.numpy()), (x.numpy(), y.numpy()),
                                      TrainOptions(epochs=3, batch_size=32), seed)
        results.append((history[-1]["loss"], predict_proba(model, x.numpy())))
    assert results[0][0] == results[1][0]
    assert (results[0][1] == results[1][1]).all()
    assert history[-1]["val_acc"] > 0.9
    assert derive_seed(7, 0, 3) != derive_seed(7, 0, 2)


def test_no_batch_of_one_image_reaches_batchnorm():
    # 4x4 images, depth 3: the last block runs on 1x1 maps, where BatchNorm cannot train on
    # a single image; 33 images in batches of 32 would leave one alone.
    torch.set_num_threads(1)
    x = torch.randint(0, 255, (33, 1, 4, 4), dtype=torch.uint8).numpy()
    y = torch.randint(0, 3, (33,)).numpy()
    model = build_cnn(1, 3, (4, 4), CNNConfig(width=4, depth=3, hidden=8))
    history, _ = train_classifier(model, (x, y), None, TrainOptions(epochs=1, batch_size=32), seed=0)
    assert history[0]["epoch"] == 1


@pytest.mark.parametrize("shape", [(28, 28), (32, 32), (14, 14), (7, 7), (1, 1)])
def test_resnet_output_shape_and_size_independent_parameters(shape):
    cfg = CNNConfig(arch="resnet", width=8)
    model = build_cnn(3, 10, shape, cfg)
    assert model(torch.rand(2, 3, *shape)).shape == (2, 10)
    assert count_parameters(model) == count_parameters(build_cnn(3, 10, (28, 28), cfg))


def test_resnet20_has_the_papers_layers_and_parameters():
    # He et al.'s CIFAR ResNet-20: 3 stages x 3 blocks at 16/32/64 channels, about 0.27M parameters
    model = build_cnn(3, 10, (32, 32), CNNConfig(arch="resnet", width=16, depth=3, blocks_per_stage=3))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19 and [c.out_channels for c in convs[::6]] == [16, 16, 32, 64]
    assert 0.26e6 < count_parameters(model) < 0.28e6
    x = torch.rand(2, 3, 32, 32)
    assert model.features(x).shape == (2, 64, 8, 8)  # stages 2 and 3 halve the map


def test_resnet_3d_and_without_batchnorm():
    model = build_cnn(1, 4, (8, 8, 8), CNNConfig(arch="resnet", width=4, batchnorm=False))
    assert model(torch.rand(2, 1, 8, 8, 8)).shape == (2, 4)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())


@pytest.mark.parametrize("N,sub", [(4, (14, 14)), (16, (7, 7))])
def test_resnet_local_width_factor_gives_about_one_nth_of_the_parameters(N, sub):
    cfg = CNNConfig(arch="resnet")
    wf = local_width_factor(1, 10, (28, 28), sub, N, cfg)
    ratio = count_parameters(build_cnn(1, 10, sub, cfg, wf)) / count_parameters(build_cnn(1, 10, (28, 28), cfg))
    assert 0.7 / N < ratio < 1.3 / N


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_cnn(1, 10, (28, 28), CNNConfig(arch="inception"))


@pytest.mark.parametrize("arch,shape", [("vgg", (12, 12)), ("resnet", (6, 6, 6))])
def test_input_normalization_is_part_of_the_model(arch, shape):
    """A CNN built with input_mean/std computes on (x - mean) / std: equal to the plain CNN with
    the same weights fed normalised images; the numbers travel in its state dict."""
    mean, std = (0.2, 0.5, 0.7), (0.1, 0.3, 2.0)
    plain_cfg = CNNConfig(arch=arch, width=4, hidden=8)
    norm_cfg = CNNConfig(arch=arch, width=4, hidden=8, input_mean=mean, input_std=std)
    plain, normed = build_cnn(3, 5, shape, plain_cfg), build_cnn(3, 5, shape, norm_cfg)
    assert not any(k.startswith("normalize.") for k in plain.state_dict())
    state = normed.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.tensor(mean))
    assert torch.equal(state["normalize.std"].flatten(), torch.tensor(std))
    plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("normalize.")})
    plain.eval(), normed.eval()
    x = torch.rand((4, 3) + shape)
    view = (1, 3) + (1,) * len(shape)
    expected = plain((x - torch.tensor(mean).view(view)) / torch.tensor(std).view(view))
    assert torch.allclose(normed(x), expected, atol=1e-5)
    assert not torch.allclose(normed(x), plain(x), atol=1e-3)  # it does change the output
    with pytest.raises(ValueError, match="2 means .* for 3 channels"):
        build_cnn(3, 5, shape, CNNConfig(arch=arch, input_mean=(0, 0), input_std=(1, 1)))


def test_densenet121_and_the_keras_ct_cnn_have_their_references_parameters():
    """DenseNet-121 (torchvision's densenet121: 7,978,856 parameters on 224x224 RGB, 1000 classes)
    and the Keras CT example's 3D CNN (1,351,873 trainable parameters on 128x128x64 volumes, one
    sigmoid output; Keras adds BatchNorm's 1,024 running statistics, which torch keeps as buffers)."""
    dense = build_cnn(3, 1000, (224, 224), CNNConfig(arch="densenet", width=64, depth=4))
    assert count_parameters(dense) == 7_978_856
    assert len([m for m in dense.modules() if isinstance(m, torch.nn.Conv2d)]) == 120  # + the classifier: 121
    ct = build_cnn(1, 1, (64, 128, 128), CNNConfig(arch="ctcnn", width=64, depth=4, hidden=512, dropout=0.3))
    assert count_parameters(ct) == 1_351_873
    convs = [m for m in ct.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 256] and all(c.padding == (0, 0, 0) for c in convs)


@pytest.mark.parametrize("arch", ["densenet", "ctcnn"])
@pytest.mark.parametrize("shape", [(28, 28), (14, 14), (7, 7), (16, 16, 8), (8, 8, 4)])
def test_densenet_and_ct_cnn_shapes_parameter_ratios_and_a_training_step(arch, shape):
    """2D and 3D, whole images and subimages: logits of the right shape, parameters independent
    of the input size, a local CNN at about 1/N of the global one, and a training step that
    changes every weight."""
    torch.manual_seed(0)
    cfg = CNNConfig(arch=arch, width=32, depth=2, hidden=32, dense_layers=(2, 3))
    model = build_cnn(2, 5, shape, cfg)
    x = torch.rand(4, 2, *shape)
    assert model(x).shape == (4, 5)
    whole = tuple(2 * s for s in shape)
    assert count_parameters(model) == count_parameters(build_cnn(2, 5, whole, cfg))
    N = 2 ** len(shape)
    wf = local_width_factor(2, 5, whole, shape, N, cfg)
    ratio = count_parameters(build_cnn(2, 5, shape, cfg, wf)) / count_parameters(build_cnn(2, 5, whole, cfg))
    assert 0.7 / N < ratio < 1.3 / N
    before = [p.detach().clone() for p in model.parameters()]
    history, _ = train_classifier(model, (x.numpy(), torch.tensor([0, 1, 2, 3]).numpy()), None,
                                  TrainOptions(epochs=1, batch_size=4), seed=0)
    assert history[0]["loss"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

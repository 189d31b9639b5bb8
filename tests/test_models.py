"""The GloRo-family architectures: shapes, parameter counts, a training step, and their bound.
(The peers' families are tested in test_peers.py.)"""

import pytest
import torch

from cll import lipschitz, losses, models
from cll.layers import MaxMin

# (arch, num_classes, in_shape) each architecture is used with in the paper or the demo
USES = {
    "2C2F": [(10, (1, 28, 28))],
    "4C3F": [(10, (3, 32, 32)), (10, (1, 28, 28)), (10, (1, 8, 8))],
    "6C2F": [(10, (3, 32, 32))],
    "8C2F": [(200, (3, 64, 64))],
    "moons-mlp": [(2, (2,))],
}
# parameters from the layer tables of docs/recipes.md, "Architectures" (weights + biases)
PARAMS = {
    ("4C3F", (3, 32, 32)): 2_431_018,
    ("6C2F", (3, 32, 32)): 2_250_378,
    ("8C2F", (3, 64, 64)): 4_342_984,  # "about 4M" on the poster
    ("moons-mlp", (2,)): 3_782,
}

# Parameter counts of the reference builds: models.GloroNet(depth=12, width=512, input_size=...,
# num_classes=...) of github.com/hukkai/liresnet at 0c0611a (its configs' size; 2048 x 8 dense layers
# fixed in its model.py), built once by hand on the meta device and summed over model.parameters().
HOST_PARAMS = {
    ("LiResNet-L12W512", 10, (3, 32, 32)): 82_944_010,
    ("LiResNet-L12W512", 100, (3, 32, 32)): 83_128_420,
    ("LiResNet-L12W512", 200, (3, 64, 64)): 133_664_968,
    # models.BRONet(**cfg["model"], **cfg["dataset"]) of
    # github.com/ntuaislab/BRONet at 9d59c9b (bronet/), with bronet/configs/benchmark_reproduce/
    # {cifar10,cifar100,tiny_imagenet}.yaml, built once by hand on the meta device (a one-process gloo
    # group for its dense layers' world-size check) and summed over model.parameters(); L2W32: cifar10.yaml
    # with depth 2, width 32, dense_width 256, linear_num 2.
    ("BRONet-L12W512", 10, (3, 32, 32)): 68_788_234,
    ("BRONet-L12W512", 100, (3, 32, 32)): 68_972_644,
    ("BRONet-L6W512", 200, (3, 64, 64)): 75_643_080,
    ("BRONet-L2W32", 10, (3, 32, 32)): 294_154,
}


@pytest.mark.parametrize("arch,num_classes,in_shape", list(HOST_PARAMS))
def test_host_parameter_counts_are_the_reference_builds(arch, num_classes, in_shape):
    with torch.device("meta"):
        model = models.create(arch, num_classes, in_shape, head="lln")
    assert sum(p.numel() for p in model.parameters()) == HOST_PARAMS[(arch, num_classes, in_shape)]


# tests/test_peers.py, tests/test_liresnet.py, tests/test_bronet.py
PEER_FAMILIES = ("LipConv-", "CPL-", "SLL-", "Sandwich", "LiResNet-", "BRONet-")


def test_every_registered_arch_has_a_use():
    gloro = {name for name in models.names() if not name.startswith(PEER_FAMILIES)}
    assert gloro == set(USES)
    assert {"LipConv-10", "LipConv-20", "CPL-XL", "SLL-XL", "Sandwich"} <= set(models.names())


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(Exception, match=r"unknown architecture 'VGG'.*4C3F"):
        models.create("VGG", 10, (3, 32, 32))


@pytest.mark.parametrize("arch,num_classes,in_shape", [(a, c, s) for a, uses in USES.items() for c, s in uses])
def test_forward_backward_and_bound(arch, num_classes, in_shape):
    torch.manual_seed(0)
    model = models.create(arch, num_classes, in_shape)
    if (arch, in_shape) in PARAMS:
        assert sum(p.numel() for p in model.parameters()) == PARAMS[(arch, in_shape)]
    x = torch.rand(2, *in_shape)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    k = lipschitz.estimate_body(model, n_iter=1)
    loss = losses.cll_loss(logits, torch.tensor([0, 1]), model.head.weight, k, 0.15, 0.3) + losses.lipschitz_penalty(
        k, model.head.weight, 1e-4
    )
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # every body layer is a conv/linear layer with a bias or a MaxMin/Flatten
    assert all(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, MaxMin, torch.nn.Flatten)) for m in model.body)
    if arch != "8C2F":  # its bound takes ~20 s on a CPU; the layer tests cover its conv shapes
        assert lipschitz.upper_bound(model) >= lipschitz.estimate_constant(model) > 0


def test_8c2f_conv_shapes_follow_the_spec():
    model = models.create("8C2F", 200, (3, 64, 64))
    convs = [m for m in model.body if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (64, 3, 1, 1),
        (64, 3, 1, 1),
        (64, 4, 2, 0),
        (128, 3, 1, 1),
        (128, 3, 1, 1),
        (128, 4, 2, 0),
        (256, 3, 1, 1),
        (256, 4, 2, 0),
    ]
    dense = [m for m in model.body if isinstance(m, torch.nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(9216, 256)]
    assert (model.head.in_features, model.head.out_features) == (256, 200)


def test_init_is_kaiming_normal_with_zero_bias():
    torch.manual_seed(0)
    model = models.create("4C3F", 10, (3, 32, 32))
    fc = model.body[9]
    assert isinstance(fc, torch.nn.Linear) and fc.in_features == 4096
    assert fc.bias.abs().max() == 0
    assert fc.weight.std().item() == pytest.approx((2 / 4096) ** 0.5, rel=0.05)

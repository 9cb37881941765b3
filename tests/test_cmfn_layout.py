"""Memory layout of the CMFN blocks: outputs keep the input's memory format, and no convolution
of an NCHW (or a channels_last) model is handed an input of the other layout, which would make
it reorder its weight on every call (IRMLP's dense 768 x 768 x 3 x 3 weight, 8 times a step,
when LayerNorm2d returned a channels-last strided tensor inside the NCHW model)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.cmfn.csc_cma import CSCCMA
from model.cmfn.global_block import GlobalBlock
from model.cmfn.local_block import LocalBlock
from model.cmfn.mfa import MFA
from model.layers import LayerNorm2d, memory_format_of
from model import build_model
from utils.config import build_config

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _layout(t):
    """'nchw', 'channels_last', 'both' (size-1 dims make the two coincide) or 'other'."""
    nchw, cl = t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)
    return "both" if nchw and cl else "nchw" if nchw else "channels_last" if cl else "other"


def _reference_layer_norm(x, weight, bias, eps):
    """Per position over the channels, in float64: (x - mean) / sqrt(biased var + eps)."""
    x = x.double()
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)


def _randomised_norm(channels):
    norm = LayerNorm2d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


@pytest.mark.parametrize("layout", sorted(FORMATS))
def test_layernorm2d_keeps_the_input_layout(layout):
    norm = _randomised_norm(12)
    x = (torch.randn(3, 12, 5, 4) * 3 + 1).contiguous(memory_format=FORMATS[layout])
    y = norm(x)
    assert _layout(x) == layout
    assert y.stride() == x.stride(), "LayerNorm2d output strides %s, input %s" % (y.stride(), x.stride())
    assert _layout(y) == layout


@pytest.mark.parametrize("layout", sorted(FORMATS))
def test_layernorm2d_matches_a_straightforward_reference(layout):
    torch.manual_seed(0)
    norm = _randomised_norm(16)
    x = (torch.randn(2, 16, 6, 3) * 2 - 0.5).contiguous(memory_format=FORMATS[layout]).requires_grad_()
    y = norm(x)
    expected = _reference_layer_norm(x.detach(), norm.weight.detach(), norm.bias.detach(), 1e-6)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)
    # gradients, against the float64 reference through autograd
    g = torch.randn(2, 16, 6, 3, dtype=torch.float64)
    y.backward(g.float())
    x64 = x.detach().double().requires_grad_()
    w64, b64 = norm.weight.detach().double().requires_grad_(), norm.bias.detach().double().requires_grad_()
    _reference_layer_norm(x64, w64, b64, 1e-6).backward(g)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(norm.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(norm.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


def test_memory_format_of():
    x = torch.randn(2, 3, 4, 5)
    assert memory_format_of(x) == torch.contiguous_format
    assert memory_format_of(x.contiguous(memory_format=torch.channels_last)) == torch.channels_last
    assert memory_format_of(torch.randn(2, 3, 1, 1).contiguous(memory_format=torch.channels_last)) \
        == torch.contiguous_format
    assert memory_format_of(torch.randn(4, 5)) == torch.contiguous_format


def _blocks():
    return {
        "csc_cma": (CSCCMA(32, num_heads=4), [(2, 32, 6, 3), (2, 32, 6, 3)]),
        "local_block": (LocalBlock(32), [(2, 32, 6, 3)]),
        "global_block": (GlobalBlock(32, num_heads=4, window_size=4), [(2, 32, 6, 3)]),
        "mfa_downsample": (MFA(32, 16, downsample=True), [(2, 32, 3, 2), (2, 16, 6, 3)]),
        "mfa": (MFA(32, 16, downsample=False), [(2, 32, 6, 3), (2, 16, 6, 3)]),
    }


@pytest.mark.parametrize("layout", sorted(FORMATS))
@pytest.mark.parametrize("name", sorted(_blocks()))
def test_blocks_keep_the_input_layout_and_values(name, layout):
    torch.manual_seed(0)
    block, shapes = _blocks()[name]
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # MFA's zero-initialised BNs would hide its attention
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    block.train()
    inputs = [torch.randn(*s) for s in shapes]
    with torch.no_grad():
        torch.manual_seed(1)
        expected = block(*inputs)
        twin = block.to(memory_format=FORMATS[layout])
        torch.manual_seed(1)
        out = twin(*[t.contiguous(memory_format=FORMATS[layout]) for t in inputs])
    assert _layout(out) in (layout, "both")
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


class _ConvLayouts(TorchDispatchMode):
    """Records (input layout, weight layout, weight shape) of every forward convolution."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, w = args[0], args[1]
            self.calls.append((_layout(x), _layout(w), tuple(w.shape)))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny_cmfn():
    cfg = build_config("sysu", opts=["MODEL.BACKBONE", "resnet18", "MODEL.PRETRAINED", "False"])
    torch.manual_seed(0)
    return build_model(cfg, 6)


@pytest.mark.parametrize("layout", sorted(FORMATS))
def test_every_convolution_of_the_model_gets_its_weights_layout(tiny_cmfn, layout):
    model = tiny_cmfn.to(memory_format=FORMATS[layout]).train()
    images = torch.randn(4, 3, 64, 32).contiguous(memory_format=FORMATS[layout])
    with _ConvLayouts() as record:
        out = model(images, torch.tensor([0, 0, 1, 1]))
    assert out["pool"].shape == (12, 512)
    assert len(record.calls) > 80
    mismatched = [c for c in record.calls if c[0] not in (layout, "both") or c[1] not in (layout, "both")]
    assert not mismatched, "convolutions with an input or weight in another layout: %s" % mismatched[:5]

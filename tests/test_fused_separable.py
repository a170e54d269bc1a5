"""The fused separable unit computes what the folded unfused units compute."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import xception
from xception.fused_separable import (
    FusedSeparable,
    fusable,
    fuse_separables,
    triton,
)
from xception.fusion import fold_batchnorm, inference_model
from xception.layers import SeparableConv2d
from xception.models.xception import Xception, XceptionConfig


def random_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_fusing_every_unit_keeps_the_function():
    model = random_statistics(xception.create_model("xception_tiny"))
    folded = fold_batchnorm(model)
    units = sum(isinstance(m, SeparableConv2d) for m in folded.modules())
    fused = fuse_separables(fold_batchnorm(model))
    kernels = [m for m in fused.modules() if isinstance(m, FusedSeparable)]
    assert len(kernels) == units
    assert not any(isinstance(m, SeparableConv2d) for m in fused.modules())
    # Fig. 5: a ReLU precedes every separable convolution except block 2's first and the
    # exit flow's last two, which are followed by one instead.
    assert sum(k.relu_in for k in kernels) == units - 3
    assert sum(k.relu_out for k in kernels) == 2
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), folded(x), rtol=1e-4, atol=1e-4)
        fast = inference_model(model, fused=True)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "override",
    [
        {"mid_activation": "relu"},
        {"mid_norm": True},
        {"spatial_groups": 4},
        {"depth_multiplier": 2},
    ],
)
def test_units_the_kernel_does_not_cover_stay_as_they_are(override):
    config = XceptionConfig(width_multiplier=0.25, middle_blocks=1, **override)
    model = random_statistics(Xception(config))
    assert not any(fusable(m) for m in model.modules())
    folded = fold_batchnorm(model)
    fused = fuse_separables(fold_batchnorm(model))
    assert not any(isinstance(m, FusedSeparable) for m in fused.modules())
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), folded(x))


def test_unfolded_units_are_left_alone():
    model = random_statistics(xception.create_model("xception_tiny"))
    assert not any(isinstance(m, FusedSeparable) for m in fuse_separables(model).modules())
    with pytest.raises(ValueError, match="depthwise unit"):
        FusedSeparable(SeparableConv2d(8, 8, groups=2), relu_in=False, relu_out=False)


KERNEL_CHECK = """
import torch
from xception.fused_separable import FusedSeparable
from xception.layers import SeparableConv2d
torch.manual_seed(0)
cases = [  # channels, out, size, dilation, stride, padding, relus, channels_last, bias
    (20, 24, 7, 1, 1, "tf", (True, False), True, True),
    (40, 70, 9, 2, 1, "tf", (False, True), False, False),
    (33, 65, 5, 1, 1, "tf", (True, True), True, True),
    (16, 16, 8, 1, 2, "symmetric", (False, False), True, False),
]
for case, (c, co, size, dilation, stride, padding, relus, last, bias) in enumerate(cases):
    relu_in, relu_out = relus
    torch.backends.cudnn.allow_tf32 = case % 2 == 0  # both matrix-multiply precisions
    unit = SeparableConv2d(c, co, 3, stride, dilation, padding=padding, bias=bias).eval()
    fused = FusedSeparable(unit, relu_in, relu_out)
    x = torch.randn(2, c, size, size + 3)
    if last:
        x = x.contiguous(memory_format=torch.channels_last)
    got, expected = fused._triton(x), fused.reference(x)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.skipif(triton is None, reason="needs triton")
def test_triton_kernel_matches_the_reference_in_tritons_interpreter():
    # The interpreter runs the kernel's indexing, masks and tiling on the CPU, exactly as
    # written; the GPU test below checks the compiled kernel where a GPU is present.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_eager_on_the_gpu(dtype):
    model = random_statistics(xception.create_model("xception")).cuda()
    x = torch.randn(4, 3, 299, 299, device="cuda")
    eager = inference_model(model)
    fused = inference_model(model, fused=True)
    assert any(isinstance(m, FusedSeparable) for m in fused.modules())
    with torch.no_grad(), torch.autocast("cuda", dtype, enabled=dtype == torch.bfloat16):
        expected, got = eager(x).float(), fused(x).float()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3  # TF32 / bf16 matrix multiplies
    torch.testing.assert_close(got.softmax(1), expected.softmax(1), rtol=0, atol=tolerance)


PRECISION_CHECK = """
import torch
from xception.fused_separable import convolutions_use_tf32
cudnn = torch.backends.cudnn
cudnn.allow_tf32 = True
assert convolutions_use_tf32()
cudnn.allow_tf32 = False
assert not convolutions_use_tf32()
cudnn.conv.fp32_precision = "ieee"  # reading cudnn.allow_tf32 would raise here
assert not convolutions_use_tf32()
cudnn.conv.fp32_precision, torch.backends.fp32_precision = "tf32", "ieee"
assert convolutions_use_tf32()  # the most specific setting wins, as in PyTorch
print("ok")
"""


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="no fp32_precision")
def test_kernel_precision_follows_pytorchs_convolution_settings():
    # In a subprocess: these flags are process-wide and mixing their APIs is sticky.
    result = subprocess.run([sys.executable, "-c", PRECISION_CHECK], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]

"""The fused separable unit computes what the folded unfused units compute."""

import os
import re
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch
from torch import nn

import xception
from xception.fused_separable import (
    FusedSeparable,
    fusable,
    fuse_separables,
    triton,
    vector_width,
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
from xception.fused_separable import TILES, FusedSeparable, vector_width
from xception.layers import SeparableConv2d
torch.manual_seed(0)
cases = [  # channels, out, size, dilation, stride, padding, relus, channels_last, bias
    (20, 24, 7, 1, 1, "tf", (True, False), True, True),
    (40, 70, 9, 2, 1, "tf", (False, True), False, False),
    (33, 65, 5, 1, 1, "tf", (True, True), True, True),
    (16, 16, 8, 1, 2, "symmetric", (False, False), True, False),
    (18, 22, 6, 1, 1, "tf", (True, False), True, False),
]
widths = set()
for case, (c, co, size, dilation, stride, padding, relus, last, bias) in enumerate(cases):
    relu_in, relu_out = relus
    # Both branches of the kernel's IEEE flag (the interpreter multiplies either in full
    # float32; the GPU test checks TF32 numerics).
    torch.backends.cudnn.allow_tf32 = case % 2 == 0
    unit = SeparableConv2d(c, co, 3, stride, dilation, padding=padding, bias=bias).eval()
    fused = FusedSeparable(unit, relu_in, relu_out)
    x = torch.randn(2, c, size, size + 3)
    if last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = fused.reference(x)
    widths.add(vector_width(x, expected.contiguous(memory_format=torch.channels_last)))
    for tile in [None, *TILES]:  # None: the autotuned kernel, which runs the first here
        got = fused._triton(x, tile)
        assert got.shape == expected.shape, (got.shape, expected.shape)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=str(tile))
# Half precision: weights cast to the input's type, 16-byte accesses of 8 values, a half
# output. (Not bfloat16: the interpreter's bfloat16 dot multiplies bit patterns.)
unit = SeparableConv2d(24, 40, 3, bias=True).eval()
fused = FusedSeparable(unit, relu_in=True, relu_out=False)
x = torch.randn(2, 24, 7, 9).half().contiguous(memory_format=torch.channels_last)
expected = fused.reference(x.float())
widths.add(vector_width(x, torch.empty_like(expected).half()))
for tile in [None, *TILES]:
    got = fused._triton(x, tile)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=3e-3, atol=3e-3, msg=str(tile))
assert widths == {1, 2, 4, 8}, widths
print("ok")
"""


# Triton 3.6's interpreter turns a runtime loop bound (the kernel's channel loop) into an int
# with int(array of shape (1,)), which NumPy 2.4 refuses; the compiled kernel is unaffected.
INTERPRETER_NUMPY_BUG = "only 0-dimensional arrays can be converted to Python scalars"


@pytest.mark.skipif(triton is None, reason="needs triton")
def test_triton_kernel_matches_the_reference_in_tritons_interpreter():
    # The interpreter runs the kernel's indexing, masks and tiling on the CPU, exactly as
    # written; the GPU test below checks the compiled kernel where a GPU is present.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, env=env
    )
    if INTERPRETER_NUMPY_BUG in result.stderr:
        pytest.skip(
            "this Triton's interpreter cannot take a loop bound under NumPy >= 2.4 "
            "(triton-lang/triton#9171, fixed by 3.8)"
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
    # Logits, not probabilities (1000 of them are all about 1e-3: zeros would pass). The
    # error is measured against the logits' own scale: TF32 or bf16 products in ~36 layers.
    scale = expected.abs().max()
    error = (got - expected).abs().max() / scale
    assert scale > 0 and error < (5e-2 if dtype == torch.bfloat16 else 1e-2), (scale, error)
    assert torch.equal(got.argmax(1), expected.argmax(1))


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


@pytest.mark.parametrize(
    ("channels", "out_channels", "dtype", "channels_last", "expected"),
    [
        (728, 728, torch.bfloat16, True, 8),  # 16 bytes
        (728, 728, torch.float32, True, 4),
        (728, 1024, torch.float16, True, 8),
        (18, 22, torch.float32, True, 2),
        (33, 64, torch.float32, True, 1),
        (728, 728, torch.bfloat16, False, 1),  # NCHW: channels are not contiguous
    ],
)
def test_vector_width_divides_every_channel_count_and_stride(
    channels, out_channels, dtype, channels_last, expected
):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(2, channels, 19, 19, dtype=dtype).contiguous(memory_format=layout)
    y = torch.empty(2, out_channels, 19, 19, dtype=dtype, memory_format=torch.channels_last)
    assert vector_width(x, y) == expected


def compile_for_h100(dtype: str, tile) -> tuple[str, str]:
    """PTX and ptxas's resource report of the kernel for an H100 (sm_90), specialised as
    Triton's launcher specialises it for Xception's middle-flow unit in ``dtype`` at batch
    256 (channels_last, 728 channels, 19x19): no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    from xception.fused_separable import _separable_kernel

    c, size, vec = 728, 19, 8 if dtype == "bf16" else 4
    ints = dict(
        pixels=256 * size * size, channels=c, height=size, width=size, out_h=size, out_w=size,
        out_channels=c, sxn=c * size * size, sxc=1, sxh=size * c, sxw=c,
        syn=c * size * size, syc=1, syh=size * c, syw=c, stride=1, padding=1, dilation=1,
    )  # fmt: skip
    pointers = dict(x_ptr=dtype, dw_ptr="fp32", pw_ptr=dtype, bias_ptr="fp32", y_ptr=dtype)
    flags = dict(VEC=vec, KERNEL=3, RELU_IN=True, RELU_OUT=False, HAS_BIAS=True)
    flags |= dict(IEEE=dtype == "fp32", **tile.kwargs)
    signature, constants, attributes = {}, {}, {}
    for index, name in enumerate(_separable_kernel.fn.arg_names):
        if name in pointers:
            signature[name] = "*" + pointers[name]
            attributes[(index,)] = [["tt.divisibility", 16]]
        elif name in ints and ints[name] != 1:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attributes[(index,)] = [["tt.divisibility", 16]]
        else:  # flags, and integers equal to 1, which Triton's launcher makes constants
            signature[name] = "constexpr"
            constants[(index,)] = flags.get(name, 1)
    source = triton.compiler.ASTSource(_separable_kernel.fn, signature, constants, attributes)
    options = {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
        file.write(ptx)
        file.flush()
        command = [get_ptxas(90).path, "-arch=sm_90a", "-v", file.name, "-o", os.devnull]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    return ptx, report


@pytest.mark.skipif(triton is None, reason="needs triton")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_tile_compiles_for_an_h100_without_spills_and_with_wide_accesses(
    dtype, tmp_path, monkeypatch
):
    """Register spills and one-element accesses are what slow a kernel like this most;
    ptxas reports the first and the PTX shows the second, on a machine without a GPU.
    Activations and 1x1 weights arrive through asynchronous 16-byte copies (the loads in
    flight); the only narrower copies are the depthwise taps, one float32 a thread per tap
    and stage; no load reads 16-bit values one by one, and every store is 16 bytes wide."""
    from xception.fused_separable import TILES

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for tile in TILES:
        try:
            ptx, report = compile_for_h100(dtype, tile)
        except (ImportError, AttributeError) as error:
            if "triton" not in traceback.extract_tb(error.__traceback__)[-1].filename:
                raise  # our own mistake, not Triton's API moving
            pytest.skip(f"this Triton cannot compile ahead of time here: {error}")
        assert " 0 bytes spill stores" in report, (str(tile), report)
        copies = re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)
        narrow = [size for size in copies if size != "0x10"]
        assert len(copies) > len(narrow), str(tile)
        assert len(narrow) <= 9 * tile.num_stages, (str(tile), len(narrow))
        assert not re.search(r"ld\.global\S*\.b16", ptx), str(tile)  # half-width reads
        stores = re.findall(r"st\.global\S*", ptx)
        assert stores and all(".v4." in store for store in stores), (str(tile), set(stores))


@pytest.mark.skipif(triton is None, reason="needs triton")
def test_the_kernel_refuses_an_input_with_other_channels():
    fused = FusedSeparable(SeparableConv2d(8, 16).eval(), relu_in=False, relu_out=False)
    with pytest.raises(ValueError, match="expected 8 input channels, got 5"):
        fused._triton(torch.randn(1, 5, 6, 6))

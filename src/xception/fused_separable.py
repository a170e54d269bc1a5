"""A depthwise separable unit in one GPU kernel: [ReLU] -> depthwise k x k -> 1x1 (+ folded
BatchNorm bias) -> [ReLU], with the depthwise output never written to memory.

Unfused, the depthwise stage writes its whole output and the pointwise stage reads it back:
for Xception's middle flow that is as many bytes as the pointwise stage's input and output
together, on a layer whose arithmetic is cheap. Here each Triton program computes the
depthwise result for a tile of output pixels and a slice of input channels in registers and
feeds it straight to a matrix multiply with the pointwise weights.

Only inference (BatchNorm folded, see ``fusion``) and only units the kernel covers: a
depthwise spatial stage (no channel multiplier, nothing between the stages) with
input-independent padding. Elsewhere, and wherever Triton or a GPU is missing, the module
runs the same function with PyTorch's own convolutions.

Measured on an H200 (benchmarks/RESULTS.md, session 7): it equals the eager model, but
Xception with it runs 3.4x slower than compiled: each output-channel tile recomputes its
pixel tile's depthwise result, which costs more than the memory traffic it saves. Nothing
uses it by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xception.layers import SeparableConv2d

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path below is used
    triton = None


class FusedSeparable(nn.Module):
    """One folded separable unit; ``forward`` takes NCHW or channels_last input."""

    def __init__(self, unit: SeparableConv2d, relu_in: bool, relu_out: bool) -> None:
        super().__init__()
        if not fusable(unit):
            raise ValueError("the fused kernel needs a depthwise unit with static padding")
        spatial, pointwise = unit.spatial, unit.pointwise
        self.relu_in, self.relu_out = relu_in, relu_out
        self.kernel_size, self.stride = spatial.kernel_size[0], spatial.stride[0]
        self.padding, self.dilation = spatial.padding[0], spatial.dilation[0]
        # Tap-major, (k * k, C): a tap's weights for a slice of channels lie side by side,
        # so neighbouring threads read neighbouring words.
        taps = spatial.weight.detach().flatten(1).t().contiguous()
        self.depthwise = nn.Parameter(taps, requires_grad=False)
        # The 1x1 weights as the right-hand matrix of the kernel's multiply: (C_in, C_out).
        matrix = pointwise.weight.detach()[:, :, 0, 0].t().contiguous()
        self.pointwise = nn.Parameter(matrix, requires_grad=False)
        bias = pointwise.bias
        if spatial.bias is not None:  # pointwise(depthwise(x) + b) = pointwise(depthwise(x)) + W b
            carried = spatial.bias.detach() @ matrix
            bias = carried if bias is None else bias.detach() + carried
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton is not None and x.is_cuda:
            return self._triton(x)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The unit with PyTorch's convolutions: the CPU path, and what the kernel must equal."""
        if self.relu_in:
            x = F.relu(x)
        k = self.kernel_size
        weight = self.depthwise.t().reshape(-1, 1, k, k)
        x = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, x.shape[1])
        x = F.conv2d(x, self.pointwise.t()[:, :, None, None], self.bias)
        return F.relu(x) if self.relu_out else x

    def _triton(self, x: torch.Tensor, tile: triton.Config | None = None) -> torch.Tensor:
        """The kernel; ``tile`` fixes one of ``TILES`` instead of the fastest, which Triton
        picks by timing each on the first call per unit shape and dtype."""
        n, channels, height, width = x.shape
        if channels != self.depthwise.shape[1]:
            raise ValueError(f"expected {self.depthwise.shape[1]} input channels, got {channels}")
        span = (self.kernel_size - 1) * self.dilation + 1
        out_h = (height + 2 * self.padding - span) // self.stride + 1
        out_w = (width + 2 * self.padding - span) // self.stride + 1
        out_channels = self.pointwise.shape[1]
        y = torch.empty(
            (n, out_channels, out_h, out_w),
            device=x.device,
            dtype=x.dtype,
            memory_format=torch.channels_last,
        )
        pixels = n * out_h * out_w

        def grid(meta: dict) -> tuple[int]:
            pixel_tiles = triton.cdiv(pixels, meta["BLOCK_M"])
            return (pixel_tiles * triton.cdiv(out_channels, meta["BLOCK_N"]),)

        bias = self.bias if self.bias is not None else self.pointwise  # unread when absent
        kernel = _separable_kernel if tile is None else _separable_kernel.fn
        kernel[grid](
            x, self.depthwise, self.pointwise.to(x.dtype), bias, y,
            pixels, channels, height, width, out_h, out_w, out_channels,
            *x.stride(), *y.stride(),
            self.stride, self.padding, self.dilation,
            VEC=vector_width(x, y), KERNEL=self.kernel_size,
            RELU_IN=self.relu_in, RELU_OUT=self.relu_out, HAS_BIAS=self.bias is not None,
            IEEE=x.dtype == torch.float32 and not convolutions_use_tf32(),
            **({} if tile is None else tile.all_kwargs()),
        )  # fmt: skip
        return y


def vector_width(x: torch.Tensor, y: torch.Tensor) -> int:
    """Channels per load and store, up to 16 bytes: the kernel may read and write this many
    channels at once where both tensors are channels_last and every channel count and stride
    is a multiple of it (Triton only learns of divisibility by 16 on its own, and Xception's
    728 channels are not)."""
    if x.stride(1) != 1 or y.stride(1) != 1:
        return 1
    counts = [x.shape[1], y.shape[1]] + [t.stride(d) for t in (x, y) for d in (0, 2, 3)]
    width = 16 // x.element_size()
    while width > 1 and any(count % width for count in counts):
        width //= 2
    return width


def convolutions_use_tf32() -> bool:
    """Whether PyTorch's float32 GPU convolutions run in TF32: the kernel's float32 multiplies
    follow suit. The most specific of the ``fp32_precision`` settings that is not "none"
    decides; with none set, the older ``cudnn.allow_tf32`` flag does."""
    cudnn = torch.backends.cudnn
    for scope in (getattr(cudnn, "conv", None), cudnn, torch.backends):
        precision = getattr(scope, "fp32_precision", "none")
        if precision in ("ieee", "tf32"):
            return precision == "tf32"
    return bool(cudnn.allow_tf32)


def fusable(unit: nn.Module) -> bool:
    """Whether ``unit`` is a separable convolution the kernel computes exactly."""
    if not isinstance(unit, SeparableConv2d):
        return False
    spatial = unit.spatial
    return (
        spatial.groups == spatial.in_channels == spatial.out_channels
        and not spatial.dynamic_padding
        and spatial.kernel_size[0] == spatial.kernel_size[1]
        and spatial.stride[0] == spatial.stride[1]
        and spatial.dilation[0] == spatial.dilation[1]
        and spatial.padding[0] == spatial.padding[1]
        and isinstance(unit.mid_norm, nn.Identity)
        and isinstance(unit.mid_act, nn.Identity)
    )


if triton is not None:
    # Output pixels x output channels per program, input channels per step; warps, and
    # loads in flight. Compiled for an H100 each is free of register spills at Xception's
    # shapes in float32 and bfloat16 (tests check with ptxas); which is fastest depends on
    # the unit and the GPU, so Triton times them there. Wide channel tiles recompute the
    # depthwise stage less often: 728 outputs in 64-channel tiles compute it 12 times per
    # pixel on CUDA cores, more time than the 1x1 takes on tensor cores.
    TILES = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 32}, num_warps=w, num_stages=2)
        for m, n, w in ((64, 64, 4), (128, 64, 8), (64, 128, 8), (64, 256, 8))
    ]

    # What one timing of the tiles holds for: the unit's shape and the kernel's variant.
    UNIT_SHAPE = ["pixels", "channels", "out_w", "out_channels", "stride", "padding", "dilation"]
    TIMED_PER = [*UNIT_SHAPE, "VEC", "KERNEL", "IEEE"]

    def _untimed_off_gpu(configs: list, named_args: dict, **kwargs) -> list:
        """Triton's interpreter (CPU tensors) cannot time tiles: it runs the first."""
        return configs if named_args["x_ptr"].is_cuda else configs[:1]

    @triton.autotune(
        configs=TILES,
        key=TIMED_PER,
        prune_configs_by={"early_config_prune": _untimed_off_gpu},
    )
    @triton.jit
    def _separable_kernel(
        x_ptr, dw_ptr, pw_ptr, bias_ptr, y_ptr,
        pixels, channels, height, width, out_h, out_w, out_channels,
        sxn, sxc, sxh, sxw, syn, syc, syh, syw,
        stride, padding, dilation,
        VEC: tl.constexpr, KERNEL: tl.constexpr, RELU_IN: tl.constexpr, RELU_OUT: tl.constexpr,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # The launch guarantees that VEC divides these; rewritten so, they tell the compiler,
        # which then loads and stores VEC channels at a time.
        channels, out_channels = channels // VEC * VEC, out_channels // VEC * VEC
        sxn, sxh, sxw = sxn // VEC * VEC, sxh // VEC * VEC, sxw // VEC * VEC
        syn, syh, syw = syn // VEC * VEC, syh // VEC * VEC, syw // VEC * VEC
        # Every output-channel tile of a pixel tile recomputes its depthwise result from the
        # same input. Launched one after another, they run side by side and read that input
        # from L2 instead of each from memory.
        tile, channel_tiles = tl.program_id(0), tl.cdiv(out_channels, BLOCK_N)
        pixel_tile, channel_tile = tile // channel_tiles, tile % channel_tiles
        rows = pixel_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels
        cols = channel_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
        row_ok, col_ok = rows < pixels, cols < out_channels
        image = (rows // (out_h * out_w)).to(tl.int64)  # batch offsets pass 2**31 at scale
        oh = (rows // out_w) % out_h
        ow = rows % out_w
        # Each output pixel's window corner; a tap adds the same offset to every pixel.
        top, left = oh * stride - padding, ow * stride - padding
        corner = image * sxn + top * sxh + left * sxw
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, channels, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            k_ok = ks < channels
            depthwise = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for i in tl.static_range(KERNEL):
                ih = top + i * dilation
                row_inside = row_ok & (ih >= 0) & (ih < height)
                for j in tl.static_range(KERNEL):
                    iw = left + j * dilation
                    inside = row_inside & (iw >= 0) & (iw < width)
                    offsets = corner + (i * dilation * sxh + j * dilation * sxw)
                    pointers = x_ptr + offsets[:, None] + ks[None, :] * sxc
                    mask = inside[:, None] & k_ok[None, :]
                    v = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
                    if RELU_IN:
                        v = tl.maximum(v, 0.0)
                    tap = tl.load(dw_ptr + (i * KERNEL + j) * channels + ks, mask=k_ok)
                    depthwise += v * tap.to(tl.float32)[None, :]
            weights = tl.load(
                pw_ptr + ks[:, None] * out_channels + cols[None, :],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if IEEE:
                acc += tl.dot(depthwise.to(weights.dtype), weights, input_precision="ieee")
            else:
                acc += tl.dot(depthwise.to(weights.dtype), weights)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok).to(tl.float32)[None, :]
        if RELU_OUT:
            acc = tl.maximum(acc, 0.0)
        offsets = image * syn + oh * syh + ow * syw
        pointers = y_ptr + offsets[:, None] + cols[None, :] * syc
        tl.store(pointers, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fuse_separables(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``[ReLU], SeparableConv2d, [ReLU]`` run of a Sequential by one
    ``FusedSeparable``; the BatchNorm after the unit must already be folded (an Identity)."""
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for index, name in enumerate(names):
            unit = parent._modules[name]
            if not fusable(unit):
                continue
            later = [n for n in names[index + 1 :] if type(parent._modules[n]) is not nn.Identity]
            if later and isinstance(parent._modules[later[0]], nn.BatchNorm2d):
                continue  # not folded: the kernel has no BatchNorm stage
            before = names[index - 1] if index else None
            after = later[0] if later else None
            relu_in = before is not None and type(parent._modules[before]) is nn.ReLU
            relu_out = after is not None and type(parent._modules[after]) is nn.ReLU
            parent._modules[name] = FusedSeparable(unit, relu_in, relu_out)
            for absorbed, fused in ((before, relu_in), (after, relu_out)):
                if fused:
                    parent._modules[absorbed] = nn.Identity()
    return model

"""Device names, autocast and the model's input batch: one place for every command."""

import pytest
import torch

from xception.data.transforms import Preprocessing
from xception.devices import autocast, check_device_name, model_input, resolve_device


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_names_every_command_accepts(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "CPU", "tpu", ""])
def test_other_device_names_fail_with_the_accepted_ones(name):
    with pytest.raises(ValueError, match=r"is not auto .*, cpu, cuda, cuda:N or mps"):
        check_device_name(name)


def test_auto_and_cpu_resolve_here_and_absent_devices_fail_clearly():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="no CUDA device is available"):
            resolve_device("cuda:1")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"there are {count} CUDA devices"):
            resolve_device(f"cuda:{count}")


def test_model_input_scales_to_minus_one_one_on_the_device_in_its_layout():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    x = model_input(images.contiguous(), Preprocessing(), torch.device("cpu"), channels_last=True)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    nchw = model_input(images, Preprocessing(), torch.device("cpu"), channels_last=False)
    assert nchw.is_contiguous()


def test_autocast_is_off_for_none_and_bf16_on_a_cpu():
    device = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(device, "none"):
        assert (a @ b).dtype == torch.float32
    with autocast(device, "bf16"):
        assert (a @ b).dtype == torch.bfloat16

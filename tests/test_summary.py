"""Multiply-adds against two independent counts: Fig. 5 by hand, and PyTorch's counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import xception
from xception.summary import count_macs, format_summary, summarize


def fig5_macs() -> int:
    """Xception's multiply-adds at 299x299, layer by layer from the paper's figure."""

    def sep(size: int, cin: int, cout: int) -> int:
        return size * size * (9 * cin + cin * cout)

    total = 149**2 * 32 * 3 * 9 + 147**2 * 64 * 32 * 9  # stem
    total += sep(147, 64, 128) + sep(147, 128, 128) + 74**2 * 64 * 128
    total += sep(74, 128, 256) + sep(74, 256, 256) + 37**2 * 128 * 256
    total += sep(37, 256, 728) + sep(37, 728, 728) + 19**2 * 256 * 728
    total += 8 * 3 * sep(19, 728, 728)  # middle flow
    total += sep(19, 728, 728) + sep(19, 728, 1024) + 10**2 * 728 * 1024
    total += sep(10, 1024, 1536) + sep(10, 1536, 2048)
    return total + 2048 * 1000


def test_xception_macs_equal_the_figure_count():
    macs = count_macs(xception.create_model("xception"), 299)
    assert macs == fig5_macs()
    assert 8.3e9 < macs < 8.45e9  # "about 8.4 G"


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("xception", 299),
        ("xception_tiny", 96),
        ("inception_v3", 299),
        ("inception_v3_paper", 299),
        ("mobilenet_v1", 224),
    ],
)
def test_macs_agree_with_pytorchs_flop_counter(name, size):
    model = xception.create_model(name).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert count_macs(model, size) * 2 == counter.get_total_flops()


def test_inception_v3_is_about_5_7_g():
    assert 5.6e9 < count_macs(xception.create_model("inception_v3"), 299) < 5.8e9


def test_summary_table_lists_modules_and_totals():
    model = xception.create_model("xception")
    summary = summarize(model, 299, depth=1)
    assert [row.name for row in summary.rows] == ["entry_flow", "middle_flow", "exit_flow", "head"]
    assert sum(row.params for row in summary.rows) == summary.trainable_params == 22_855_952
    assert sum(row.macs for row in summary.rows) == summary.macs
    assert summary.rows[1].output_shape == (728, 19, 19)
    text = format_summary(summary, "xception")
    assert "22,855,952" in text and "8.36 G" in text
    assert model.training  # summarize leaves the mode as it found it

"""Grad-CAM against its closed form: behind global average pooling and a linear classifier
(every model here) it is the class activation map of Zhou et al. (2016)."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import xception
from xception.gradcam import gradcam, overlay


def class_activation_map(model, x, index):
    """ReLU(sum_k W[index, k] A_k) of the last feature maps, scaled to [0, 1] and resized."""
    with torch.no_grad():
        maps = model.forward_features(x)[0]
        cam = F.relu(torch.einsum("k,khw->hw", model.head.classifier.weight[index], maps))
    cam = cam / cam.max()
    return F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear")[0, 0]


@pytest.mark.parametrize(("name", "size"), [("xception_tiny", 96), ("mobilenet_v1_025", 96)])
def test_gradcam_is_the_class_activation_map_behind_a_linear_head(name, size):
    torch.manual_seed(0)
    model = xception.create_model(name, num_classes=5).eval()
    x = torch.randn(1, 3, size, size)
    for index in (None, 3):
        found = gradcam(model, x, index)
        expected_index = int(model(x).argmax()) if index is None else index
        assert found.class_index == expected_index and found.heatmap.shape == (size, size)
        expected = class_activation_map(model, x, expected_index)
        torch.testing.assert_close(found.heatmap, expected.clamp(0, 1), rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_the_heatmap_finds_the_evidence():
    """A model whose class 1 responds to one image corner: the heatmap lights that corner."""
    torch.manual_seed(0)
    model = xception.create_model("xception_tiny", num_classes=2).eval()
    x = torch.zeros(1, 3, 96, 96)
    x[..., :24, :24] = 3.0  # a bright patch top left
    with torch.no_grad():
        maps = model.forward_features(x)[0]
        model.head.classifier.weight.copy_(torch.stack([-maps[:, 0, 0], maps[:, 0, 0]]))
    heat = gradcam(model, x, 1).heatmap
    assert heat[:24, :24].mean() > 3 * heat[48:, 48:].mean()


def test_layers_and_classes_are_checked_and_the_overlay_is_a_picture():
    model = xception.create_model("xception_tiny", num_classes=2)
    x = torch.randn(3, 80, 80)
    with pytest.raises(ValueError, match=r"no layer 'exit_flow\.block99'"):
        gradcam(model, x, layer="exit_flow.block99")
    with pytest.raises(ValueError, match="class 5 is not one of the 2"):
        gradcam(model, x, 5)
    middle = gradcam(model, x, layer="middle_flow.block6")
    assert middle.heatmap.shape == (80, 80)
    picture = overlay(Image.new("RGB", (80, 80), (10, 200, 10)), middle.heatmap)
    assert picture.size == (320, 320) and picture.mode == "RGB"

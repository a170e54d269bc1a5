"""Behaviour every registered model shares."""

import pytest
import torch
from torch import nn

import xception


def out_of_place(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


@pytest.mark.parametrize(
    ("name", "size"), [("xception_tiny", 80), ("inception_v3", 80), ("mobilenet_v1", 64)]
)
def test_in_place_activations_change_neither_outputs_nor_gradients(name, size):
    torch.manual_seed(0)
    model = xception.create_model(name, num_classes=5).double().train()
    assert any(getattr(m, "inplace", False) for m in model.modules())
    reference = out_of_place(xception.create_model(name, num_classes=5).double().train())
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    results = []
    for net in (model, reference):
        torch.manual_seed(1)  # the same dropout masks
        out = net(x)
        out.square().sum().backward()
        results.append((out, [p.grad for p in net.parameters()]))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_reset_classifier_keeps_the_config_true(tmp_path):
    import xception
    from xception.weights import save_weights

    model = xception.create_model("xception_tiny", num_classes=5)
    model.reset_classifier(0)
    assert model.config.num_classes == 0 == model.num_classes
    path = tmp_path / "notop.safetensors"
    save_weights(model, path, "xception_tiny")  # the file describes what it holds
    assert xception.load_model(path)[0].num_classes == 0

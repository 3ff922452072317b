"""Folding weight standardisation into plain convs, and exporting the folded model with
torch.export and to ONNX (checked with onnxruntime)."""

import pytest
import torch
from torch import nn

from nfnet.models import NFBlock, WSConv2d, create_model, export_onnx, fold_weight_standardization

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("nfnet_tiny", num_classes=10)
    with torch.no_grad():  # live branches and non-trivial gains, not the init values
        for m in model.modules():
            if isinstance(m, NFBlock):
                m.skip_gain.uniform_(0.5, 1.5)
            if isinstance(m, WSConv2d):
                m.gain.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("size", [64, 65])  # 65: odd maps, asymmetric SAME padding
def test_folded_model_has_plain_convs_and_the_same_logits(model, size):
    folded = fold_weight_standardization(model)
    assert not any(isinstance(m, WSConv2d) for m in folded.modules())
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, WSConv2d) for m in model.modules())
    assert all(not hasattr(m, "gain") for m in convs)
    assert not folded.training
    # The original is untouched and the folded parameter count drops by the gains.
    assert any(isinstance(m, WSConv2d) for m in model.modules())
    gains = sum(m.gain.numel() for m in model.modules() if isinstance(m, WSConv2d))
    assert sum(p.numel() for p in folded.parameters()) == sum(
        p.numel() for p in model.parameters()) - gains
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **FP32_TOL)


def test_torch_export_of_the_folded_model(model):
    folded = fold_weight_standardization(model)
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(folded, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), **FP32_TOL)


def test_onnx_export_runs_in_onnxruntime(model, tmp_path):
    import onnx
    import onnxruntime as ort
    path = tmp_path / "nfnet_tiny.onnx"
    export_onnx(model, path, image_size=64)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 64, 64)  # another batch size than the export's example
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-4)

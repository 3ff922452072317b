"""The classifier's rows follow the class names (nfnet.models.head, fit_state_dict): kept rows are
the old rows, bit for bit; new rows are the official classifier init (N(0, 0.01), zero bias)."""

from __future__ import annotations

import pytest
import torch

from nfnet.errors import InputError
from nfnet.models import create_model
from nfnet.models.head import arrange_rows, rows_by_name
from nfnet.models.nfnet import CLASSIFIER_INIT_STD
from nfnet.models.pretrained import fit_state_dict, save_safetensors
from nfnet.inference.weights import load_pretrained


def test_arrange_rows_keeps_old_rows_and_draws_new_ones_as_the_official_init():
    weight, bias = torch.randn(3, 4096), torch.randn(3)
    new_weight, new_bias = arrange_rows(weight, bias, [2, None, 0, None], torch.Generator().manual_seed(0))
    assert torch.equal(new_weight[0], weight[2]) and torch.equal(new_weight[2], weight[0])
    assert new_bias[0] == bias[2] and new_bias[2] == bias[0]
    fresh = new_weight[[1, 3]]
    assert torch.equal(new_bias[[1, 3]], torch.zeros(2))
    # 8192 draws of N(0, 0.01): the sample std is within 3% of 0.01, the mean within 4 sigma of 0.
    assert abs(fresh.std().item() / CLASSIFIER_INIT_STD - 1) < 0.03
    assert abs(fresh.mean().item()) < 4 * CLASSIFIER_INIT_STD / fresh.numel() ** 0.5


def test_rows_by_name():
    assert rows_by_name(["a", "b", "c"], ["c", "a", "d"]) == [2, 0, None]


def _trained(names):
    torch.manual_seed(0)
    net = create_model("nfnet_tiny", num_classes=len(names))
    with torch.no_grad():
        net.classifier.weight.copy_(torch.arange(len(names)).float().view(-1, 1).expand_as(net.classifier.weight))
        net.classifier.bias.copy_(torch.arange(len(names)).float())
    return net


def test_grown_class_set_keeps_each_classes_row_under_its_name():
    old = _trained(["circle", "cross", "star"])
    model = create_model("nfnet_tiny", num_classes=4)
    fit_state_dict(model, old.state_dict(), "old.ckpt", ["circle", "cross", "star"], ["arrow", "circle", "cross", "star"])
    rows = model.classifier.weight[:, 0].tolist()
    assert rows[1:] == [0.0, 1.0, 2.0] and model.classifier.bias[1:].tolist() == [0.0, 1.0, 2.0]
    assert model.classifier.bias[0].item() == 0.0 and abs(rows[0]) < 0.1  # a new row, not one of the old
    assert torch.equal(model.stem.conv0.weight, old.stem.conv0.weight)


def test_a_swapped_or_renamed_class_is_refused_instead_of_keeping_rows_under_wrong_names():
    # Before, the same class count was enough and every row was kept under whatever name came.
    old = _trained(["circle", "cross", "star"])
    model = create_model("nfnet_tiny", num_classes=3)
    with pytest.raises(InputError) as caught:
        fit_state_dict(model, old.state_dict(), "old.ckpt", ["circle", "cross", "star"], ["circle", "plus", "star"])
    assert "cross" in str(caught.value) and "old.ckpt" in str(caught.value) and "\n" not in str(caught.value)


def test_same_names_in_another_order_move_the_rows():
    old = _trained(["a", "b", "c"])
    model = create_model("nfnet_tiny", num_classes=3)
    fit_state_dict(model, old.state_dict(), "old", ["a", "b", "c"], ["c", "a", "b"])
    assert model.classifier.bias.tolist() == [2.0, 0.0, 1.0]


def test_no_class_in_common_is_a_new_task_with_a_fresh_classifier():
    old = _trained(["a", "b", "c"])
    model = create_model("nfnet_tiny", num_classes=3)
    fit_state_dict(model, old.state_dict(), "old", ["a", "b", "c"], ["x", "y", "z"])
    assert model.classifier.bias.abs().sum() == 0 and model.classifier.weight.abs().max() < 0.1


def test_safetensors_written_with_class_names_load_by_name(tmp_path):
    old = _trained(["a", "b"])
    path = tmp_path / "w.safetensors"
    save_safetensors(old.state_dict(), path, class_names=["a", "b"])
    model = load_pretrained(create_model("nfnet_tiny", num_classes=3), path, ["b", "new", "a"])
    assert model.classifier.bias.tolist() == [1.0, 0.0, 0.0] and model.classifier.weight[2, 0] == 0.0

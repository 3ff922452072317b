"""DeepMind Haiku checkpoints: format of NFNET_SPEC.md §2.3, written with dill from this
project's models, read back bit-exactly; code in a pickle is refused before it runs."""

import collections
import os
import pickle
import sys
import types

import dill
import numpy as np
import pytest
import torch

from nfnet.models import VARIANTS, create_model, load_haiku_checkpoint
from nfnet.models.haiku import haiku_to_state_dict
from nfnet.models.matching import infer_variant

# NFNET_SPEC.md §2.2: haiku modules per variant (the F+ rows share their F row's count).
SPEC_MODULES = {0: 94, 1: 178, 2: 262, 3: 346, 4: 430, 5: 514, 6: 598, 7: 682}


def to_haiku(model, as_numpy=True):
    """This model's parameters in DeepMind's structure, written from §2.3: module paths
    under 'NFNet/~/', blocks numbered globally with no suffix on the first, conv weights
    HWIO, linear weights (in, out), params w/gain/bias, b for linears, skip_gain."""
    params = collections.defaultdict(dict)

    def put(module, param, tensor):
        tensor = tensor.detach()
        if param == "w" and tensor.dim() == 4:
            tensor = tensor.permute(2, 3, 1, 0)  # OIHW -> HWIO
        elif param == "w":
            tensor = tensor.t()  # (out, in) -> (in, out)
        params[f"NFNet/~/{module}"][param] = (
            tensor.contiguous().numpy() if as_numpy else tensor)

    def conv(module, conv_module):
        put(module, "w", conv_module.weight)
        put(module, "gain", conv_module.gain)
        put(module, "bias", conv_module.bias)

    for i in range(4):
        conv(f"stem_conv{i}", getattr(model.stem, f"conv{i}"))
    index = 0
    for stage in model.stages:
        for block in stage:
            name = "nf_block" if index == 0 else f"nf_block_{index}"
            put(name, "skip_gain", block.skip_gain)
            for sub in ("conv0", "conv1", "conv1b", "conv2", "conv_shortcut"):
                if getattr(block, sub) is not None:
                    conv(f"{name}/~/{sub}", getattr(block, sub))
            for sub, fc in (("linear", block.se.fc0), ("linear_1", block.se.fc1)):
                put(f"{name}/~/squeeze_excite/~/{sub}", "w", fc.weight)
                put(f"{name}/~/squeeze_excite/~/{sub}", "b", fc.bias)
            index += 1
    conv("final_conv", model.final_conv)
    put("linear", "w", model.classifier.weight)
    put("linear", "b", model.classifier.bias)
    return dict(params)


def randomized(name, **kw):
    torch.manual_seed(0)
    model = create_model(name, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:  # gains, biases, skip gains: not their 0/1 init
                p.normal_()
    return model


@pytest.mark.parametrize("name,variant", [("nfnet_tiny", "nfnet_tiny"), ("nfnet_f0", None)])
def test_dill_checkpoint_round_trips_bit_exactly(tmp_path, name, variant):
    model = randomized(name)
    path = tmp_path / f"{name}_haiku.npz"
    with open(path, "wb") as f:
        dill.dump(to_haiku(model), f)
    expected = model.state_dict()
    del model
    loaded = load_haiku_checkpoint(path, variant)
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], tensor), key
        assert loaded[key].is_contiguous()
    assert infer_variant(loaded).name == name


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_maps_key_for_key_with_shapes(name):
    with torch.device("meta"):
        model = create_model(name)
    params = to_haiku(model, as_numpy=False)
    if name != "nfnet_tiny":
        assert len(params) == SPEC_MODULES[int(name[len("nfnet_f")])]
    assert params["NFNet/~/stem_conv0"]["w"].shape == (3, 3, 3, 16)  # §2.3 example
    converted = haiku_to_state_dict(params)  # stage depths read from the structure
    expected = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == expected
    assert infer_variant(converted).name == name


def test_first_block_has_no_suffix_and_grouped_weights_are_per_group():
    with torch.device("meta"):
        params = to_haiku(create_model("nfnet_f0"), as_numpy=False)
    assert "NFNet/~/nf_block" in params and "NFNet/~/nf_block_0" not in params
    assert params["NFNet/~/nf_block_3/~/conv1"]["w"].shape == (3, 3, 128, 768)  # §2.3
    assert params["NFNet/~/final_conv"]["w"].shape == (1, 1, 1536, 3072)
    assert params["NFNet/~/linear"]["w"].shape == (3072, 1000)


def test_old_haiku_containers_load_as_plain_dicts(tmp_path, monkeypatch):
    """Old haiku pickled params as FlatMapping(mapping) / frozendict(dict) (spec §2.3 open
    question); the loader rebuilds them as dicts without haiku installed."""
    fake = types.ModuleType("haiku._src.data_structures")

    class FlatMapping(dict):
        def __reduce__(self):
            return FlatMapping, (dict(self),)

    class frozendict(dict):  # noqa: N801 - haiku's spelling
        def __reduce__(self):
            return frozendict, (dict(self),)

    for cls in (FlatMapping, frozendict):
        cls.__module__, cls.__qualname__ = fake.__name__, cls.__name__
        setattr(fake, cls.__name__, cls)
    # Importable as haiku._src.data_structures, so dill pickles the classes by reference,
    # as it did haiku's own.
    haiku, src = types.ModuleType("haiku"), types.ModuleType("haiku._src")
    haiku._src, src.data_structures = src, fake
    for module in (haiku, src, fake):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    model = randomized("nfnet_tiny")
    params = FlatMapping({k: frozendict(v) for k, v in to_haiku(model).items()})
    path = tmp_path / "old.npz"
    with open(path, "wb") as f:
        dill.dump(params, f)
    for name in ("haiku", "haiku._src", fake.__name__):
        monkeypatch.delitem(sys.modules, name)
    loaded = load_haiku_checkpoint(path)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_protocol_2_pickle_of_a_numpy_1_era_file_loads(tmp_path):
    """numpy 1.x wrote checkpoints with pickle protocol 2, which stores an array's bytes through
    `_codecs.encode(str, "latin1")`; that global turns a str into bytes and is allowed."""
    model = randomized("nfnet_tiny")
    path = tmp_path / "protocol2.npz"
    payload = pickle.dumps(to_haiku(model), protocol=2)
    assert b"_codecs\nencode" in payload
    # numpy 1.x names its reconstructor numpy.core.multiarray (numpy 2 writes numpy._core).
    path.write_bytes(payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    loaded = load_haiku_checkpoint(path)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("args,refused", [
    (("x", "utf-16"), "utf-16"),  # only latin1, the protocol's own use
    ((b"x", "latin1"), "bytes"),
])
def test_codecs_encode_is_allowed_only_as_latin1_str_to_bytes(tmp_path, args, refused):
    import _codecs

    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        pickle.dump(_Exploit(_codecs.encode, *args), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=refused):
        load_haiku_checkpoint(path)


class _Exploit:
    """A pickle payload that calls `func(*args)` when unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("make_payload,refused", [
    (lambda target: _Exploit(os.system, f"touch {target}"), "system"),
    (lambda target: _Exploit(open, str(target), "w"), "io.open"),
    (lambda target: _Exploit(exec, f"open({str(target)!r}, 'w')"), "builtins.exec"),
    # Hidden inside an otherwise valid params dict.
    (lambda target: {"NFNet/~/linear": {"w": np.zeros((2, 2), np.float32),
                                        "b": _Exploit(open, str(target), "w")}}, "io.open"),
])
def test_pickled_code_is_refused_before_it_runs(tmp_path, make_payload, refused):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        pickle.dump(make_payload(target), f)
    with pytest.raises(pickle.UnpicklingError, match=refused):
        load_haiku_checkpoint(path)
    assert not target.exists()


def test_dill_array_record_with_foreign_constructor_is_refused(tmp_path):
    from dill._dill import _create_array

    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        pickle.dump(_Exploit(_create_array, collections.OrderedDict, (), None), f)
    with pytest.raises(pickle.UnpicklingError, match="constructor"):
        load_haiku_checkpoint(path)


def test_unknown_structure_is_an_error(tmp_path):
    path = tmp_path / "other.npz"
    with open(path, "wb") as f:
        dill.dump({"ResNet/~/conv": {"w": np.zeros((1, 1, 1, 1), np.float32)}}, f)
    with pytest.raises(ValueError, match="ResNet"):
        load_haiku_checkpoint(path, "nfnet_tiny")


def test_wrong_variant_is_an_error(tmp_path):
    path = tmp_path / "tiny.npz"
    with open(path, "wb") as f:
        dill.dump(to_haiku(create_model("nfnet_tiny")), f)
    with pytest.raises(ValueError, match="nfnet_f0"):
        load_haiku_checkpoint(path, "nfnet_f0")

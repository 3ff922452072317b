"""Weights out to timm and the Hugging Face Hub layout (issue 20.1), checked against timm itself:
the names and shapes are those of timm's own models, a saved folder loads in timm the ways a
user loads one and timm computes our logits, timm's eval transform crops what the official eval
crops, and the folder (or its Hub cache entry) reads back to our exact state dict."""

import dataclasses
import json

import pytest
import timm
import torch

from nfnet.models import create_model, from_timm_state_dict
from nfnet.models.timm import (
    model_overrides, timm_model_kwargs, timm_model_name, to_timm_state_dict,
)
from nfnet.models.timm_hub import (
    push_timm_folder, read_timm_folder, save_timm_folder, timm_data_config,
)
from test_pretrained_timm import randomize_, relative_error

CLASSES = 10
NAMES = [f"class_{i}" for i in range(CLASSES)]
PARITY_RTOL = 1e-4  # the issue: max |diff| <= 1e-4 x max |logit|
SIZES = (64, 72)  # 72: odd maps from the second stage on, asymmetric SAME padding
HUB_ID = "someone/nfnet-f0-interop-test"


def perturbed_f0(**overrides):
    """F0 with every parameter moved off its init (gains and skip gains start at 1 and 0, which
    would hide a mixed-up gain layout or a skipped branch)."""
    return randomize_(create_model("nfnet_f0", CLASSES, **overrides), seed=1).eval()


def one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def erf_f0():
    """The numerics timm can express: its GELU is the erf one (see test_official_gelu_gap)."""
    return perturbed_f0(gelu_approximate="none")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(2)
    return {size: torch.randn(2, 3, size, size, generator=g) for size in SIZES}


@pytest.fixture(scope="module")
def folder(erf_f0, tmp_path_factory):
    return save_timm_folder(erf_f0, tmp_path_factory.mktemp("f0"), class_names=NAMES)


@pytest.fixture(scope="module")
def timm_from_folder(folder):
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def test_round_trip_through_timm_names_is_bit_exact(erf_f0):
    state_dict = erf_f0.state_dict()
    back = from_timm_state_dict(to_timm_state_dict(state_dict, "nfnet_f0"), "nfnet_f0")
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


@pytest.mark.parametrize("variant", ["nfnet_f0", "nfnet_f7"])
def test_exported_names_and_shapes_are_timms(variant):
    with torch.device("meta"):
        ours = create_model(variant, CLASSES)
        theirs = timm.create_model(timm_model_name(variant), num_classes=CLASSES,
                                   **timm_model_kwargs(variant))
    exported = to_timm_state_dict(ours.state_dict(), variant)
    expected = theirs.state_dict()
    assert exported.keys() == expected.keys()
    assert all(exported[k].shape == expected[k].shape for k in expected)
    back = from_timm_state_dict(exported, variant)
    assert all(back[k].shape == v.shape for k, v in ours.state_dict().items())


def test_timm_f7_under_the_export_kwargs_is_the_deepmind_network():
    """timm ports F0-F6 only as dm_nfnet_*; its nfnet_f7 plus the export's switches must be
    timm's own DeepMind configuration with F7's depths (NFNET_SPEC.md §1.10)."""
    from timm.models.nfnet import model_cfgs

    kwargs = timm_model_kwargs("nfnet_f7")
    f7 = dataclasses.replace(model_cfgs[timm_model_name("nfnet_f7")], **kwargs)
    dm_f7 = dataclasses.replace(model_cfgs["dm_nfnet_f6"], depths=(8, 16, 48, 24), **kwargs)
    assert f7 == dm_f7


@pytest.mark.parametrize("size", SIZES)
def test_timm_loads_the_folder_and_computes_our_logits(erf_f0, folder, timm_from_folder,
                                                       images, size):
    x = images[size]
    with torch.no_grad():
        expected = erf_f0(x)
        got = timm_from_folder(x)
    assert got.shape == (2, CLASSES)
    assert relative_error(got, expected) <= PARITY_RTOL
    assert timm_from_folder.pretrained_cfg["label_names"] == NAMES


def test_timm_loads_the_weights_file_by_name_with_the_model_args(erf_f0, folder, images):
    """The other way a user loads it: architecture + model_args + the weights file."""
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(
        config["architecture"], pretrained=True, num_classes=CLASSES, **config["model_args"],
        pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=CLASSES),
    ).eval()
    x = images[SIZES[0]]
    with torch.no_grad():
        assert relative_error(model(x), erf_f0(x)) <= PARITY_RTOL


def test_official_gelu_gap_is_the_only_difference_left(erf_f0, timm_from_folder, images,
                                                       tmp_path):
    """timm has no tanh-GELU switch for dm_nfnet (its activation must be a key of its gamma
    table, where 'gelu' is erf). With the official tanh GELU the same weights give logits off
    by 3e-4 to 5e-4 of the largest (measured at 64-256 px), and the folder says so."""
    official = create_model("nfnet_f0", CLASSES).eval()
    official.load_state_dict(erf_f0.state_dict())
    x = images[SIZES[0]]
    with torch.no_grad():
        gap = relative_error(timm_from_folder(x), official(x))
    assert PARITY_RTOL < gap < 1e-3
    config = json.loads((save_timm_folder(official, tmp_path) / "config.json").read_text())
    assert any("tanh" in note for note in config["pretrained_cfg"]["notes"])


@pytest.mark.parametrize("size", [256, 320, 352, 416, 512, 544, 576, 608, 462])
def test_timm_eval_transform_resizes_to_size_plus_32_and_crops_size(size):
    """NFNET_SPEC.md §4.2: squash to (S+32)^2, centre-crop S. 462 is a size where S / (S / (S+32))
    rounds under S+32 in floating point."""
    cfg = timm_data_config(size)
    transform = timm.data.create_transform(**cfg)
    resize, crop = transform.transforms[0], transform.transforms[1]
    assert tuple(resize.size) == (size + 32, size + 32)
    assert tuple(crop.size) == (size, size)
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert cfg["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_folder_config_carries_the_eval_transform(folder):
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert {k: cfg[k] for k in timm_data_config(256)} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in timm_data_config(256).items()}


def test_read_timm_folder_gives_back_our_state_dict(erf_f0, folder, images):
    state_dict, variant, class_names, metadata = read_timm_folder(folder)
    assert variant == "nfnet_f0" and class_names == NAMES
    for key, value in erf_f0.state_dict().items():
        assert torch.equal(state_dict[key], value), key
    assert metadata["model_kwargs"] == model_overrides(erf_f0)
    assert (metadata["image_size"], metadata["eval_pad"]) == (256, 32)
    rebuilt = create_model(variant, len(class_names), **metadata["model_kwargs"]).eval()
    rebuilt.load_state_dict(state_dict)
    x = images[SIZES[0]]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), erf_f0(x))


def test_read_timm_folder_of_timms_own_export(timm_from_folder, images, tmp_path):
    """A folder written by timm (as timm's Hub weights are) reads with the overrides that make
    this model compute what timm computes."""
    from timm.models import save_for_hf

    save_for_hf(timm_from_folder, tmp_path, safe_serialization=True)
    state_dict, variant, _, metadata = read_timm_folder(tmp_path)
    ours = create_model(variant, CLASSES, **metadata["model_kwargs"]).eval()
    ours.load_state_dict(state_dict)
    x = images[SIZES[1]]
    with torch.no_grad():
        assert relative_error(ours(x), timm_from_folder(x)) <= PARITY_RTOL


@pytest.fixture
def fake_hf_cache(folder, tmp_path, monkeypatch):
    """The folder as huggingface_hub caches a downloaded repo, HF_HOME in tmp_path, offline."""
    import huggingface_hub.constants as hf_constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variables once, at import: set what they would have set.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def test_hf_hub_id_reads_from_the_local_cache(fake_hf_cache, erf_f0, images):
    state_dict, variant, class_names, _ = read_timm_folder(f"hf-hub:{HUB_ID}")
    assert variant == "nfnet_f0" and class_names == NAMES
    assert all(torch.equal(state_dict[k], v) for k, v in erf_f0.state_dict().items())
    # ... and timm itself resolves the same id from the same cache.
    model = timm.create_model(f"hf-hub:{HUB_ID}", pretrained=True).eval()
    x = images[SIZES[0]]
    with torch.no_grad():
        assert relative_error(model(x), erf_f0(x)) <= PARITY_RTOL


def test_hf_hub_id_missing_from_the_cache_is_one_clear_line(fake_hf_cache):
    with pytest.raises(FileNotFoundError) as excinfo:
        read_timm_folder("hf-hub:someone/not-downloaded")
    message = one_line(excinfo)
    assert "someone/not-downloaded" in message and "hf download someone/not-downloaded" in message


@pytest.mark.parametrize("variant", ["nfnet_tiny", "nfnet_f0plus"])
def test_variants_without_a_timm_counterpart_are_refused_in_one_line(variant, tmp_path):
    with torch.device("meta"):
        net = create_model(variant)
    calls = [
        lambda: to_timm_state_dict(net.state_dict(), variant),
        lambda: timm_model_name(variant),
        lambda: timm_model_kwargs(variant),
        lambda: save_timm_folder(net, tmp_path),
    ]
    for call in calls:
        with pytest.raises(ValueError) as excinfo:
            call()
        assert one_line(excinfo).startswith(f"{variant} has no timm counterpart")
    assert not any(tmp_path.iterdir())


def test_overrides_timm_cannot_build_are_refused_in_one_line(erf_f0, tmp_path):
    with pytest.raises(ValueError) as excinfo:
        timm_model_kwargs("nfnet_f0", width=1.5)
    assert "width=1.5" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        save_timm_folder(erf_f0, tmp_path, class_names=NAMES[:3])
    assert "3 class names" in one_line(excinfo)


def test_push_without_credentials_is_one_clear_line(folder, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PermissionError) as excinfo:
        push_timm_folder(folder, HUB_ID)
    message = one_line(excinfo)
    assert HUB_ID in message and "hf auth login" in message and "HF_TOKEN" in message
    with pytest.raises(FileNotFoundError) as excinfo:
        push_timm_folder(tmp_path, HUB_ID)
    assert "config.json" in one_line(excinfo)

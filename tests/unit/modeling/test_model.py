"""The embedder: normalised output, starting weights (a local file or a name from torchvision's cache), and a
loop that can fit one batch."""

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import ConfigError
from components.modeling.embedder import build_embedder, embed_images, load_backbone_weights
from components.training.loop import NonFiniteLossError, train_embedder


def test_embeddings_are_l2_normalised(params):
    model = build_embedder(params.model).eval()
    images = [Image.new("RGB", (40, 30), (i * 20, 0, 0)) for i in range(5)]
    vectors = embed_images(model, images, batch_size=2)
    assert vectors.shape == (5, params.model.embedding_dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_local_weights_load_and_bad_files_are_named(params, tmp_path):
    donor = build_embedder(params.model)
    path = tmp_path / "resnet.pt"
    torch.save(donor.net.state_dict(), path)
    model = build_embedder(params.model)
    load_backbone_weights(model, path)
    assert torch.equal(model.net.conv1.weight, donor.net.conv1.weight)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: cannot load backbone weights"):
        load_backbone_weights(model, tmp_path / "junk.pt")


def shapes(tmp_path, n_classes=4, per_class=4):
    """Tiny, easily separable classes: a bright square at a class-specific place."""
    paths, labels = [], []
    for c in range(n_classes):
        for i in range(per_class):
            img = np.full((32, 32, 3), 20 + i * 5, dtype=np.uint8)
            y, x = divmod(c, 2)
            img[y * 16 : y * 16 + 12, x * 16 : x * 16 + 12] = 230
            path = tmp_path / f"{c}-{i}.png"
            Image.fromarray(img).save(path)
            paths.append(path)
            labels.append(f"class{c}")
    return paths, labels


@pytest.mark.parametrize(
    "loss, miner",
    [("multi_similarity", "multi_similarity"), ("triplet", "batch_hard"), ("supcon", "none"), ("proxy_anchor", "none")],
)
def test_training_fits_one_small_batch(params, tmp_path, loss, miner):
    paths, labels = shapes(tmp_path)
    p = params.train.model_copy(
        update={"epochs": 15, "batch_size": 16, "m_per_class": 4, "lr": 0.003, "loss": loss, "miner": miner}
    )
    result = train_embedder(paths, labels, p, params.model)
    assert result.epoch_losses[-1] < result.epoch_losses[0] * 0.5
    assert result.device == "cpu" and result.classes == 4 and result.images == 16


def test_non_finite_loss_stops_training(params, tmp_path):
    paths, labels = shapes(tmp_path)
    model = build_embedder(params.model)
    with torch.no_grad():
        model.net.fc.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss became nan"):
        train_embedder(paths, labels, params.train, params.model, init=model)


def test_small_stem_keeps_resolution_and_survives_save_and_load(params, tmp_path):
    from components.modeling.embedder import load_embedder, save_embedder

    small = build_embedder(params.model.model_copy(update={"stem": "small"})).eval()
    assert small.net.conv1.stride == (1, 1) and small.net.conv1.kernel_size == (3, 3)
    assert isinstance(small.net.maxpool, torch.nn.Identity)
    save_embedder(small, tmp_path / "e.pt")
    loaded = load_embedder(tmp_path / "e.pt")
    assert loaded.spec() == small.spec() and loaded.spec()["stem"] == "small"
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded(x), small(x), atol=1e-6)
    # A checkpoint from before the stem option (no "stem" in its spec) loads as the ImageNet stem.
    old = build_embedder(params.model.model_copy(update={"stem": "imagenet"}))
    spec = {k: v for k, v in old.spec().items() if k != "stem"}
    torch.save({"spec": spec, "state_dict": old.state_dict()}, tmp_path / "old.pt")
    assert load_embedder(tmp_path / "old.pt").stem == "imagenet"


def test_small_stem_needs_a_resnet_style_backbone(params):
    with pytest.raises(ValueError, match="stem 'small' needs a ResNet-style backbone"):
        build_embedder(params.model.model_copy(update={"backbone": "mobilenet_v3_small", "stem": "small"}))


def test_affine_augmentation_fills_with_white_and_keeps_the_size():
    from components.data.transforms import train_transform

    torch.manual_seed(0)
    white = Image.new("RGB", (105, 105), "white")
    x = train_transform(28, "affine")(white)
    assert x.shape == (3, 28, 28) and torch.allclose(x, torch.ones_like(x))  # white stays white: no black frame
    assert train_transform(28, "crop")(white).shape == (3, 28, 28)
    with pytest.raises(ValueError, match="unknown augment"):
        train_transform(28, "jitter")


def test_weights_by_name_come_from_torchvisions_cache_with_their_own_normalisation(params, tmp_path, monkeypatch):
    import torchvision

    from components.config import with_overrides
    from components.modeling.embedder import (
        WeightsUnavailable,
        load_embedder,
        save_embedder,
        torchvision_weights,
        weights_cache_file,
    )

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    weights = torchvision_weights(params.model.backbone, "IMAGENET1K_V1")
    cached = weights_cache_file(weights)
    assert cached == tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    named = with_overrides(params, {"model.weights": "IMAGENET1K_V1"})

    # Not cached, and no network here (the download is refused at once): an error naming the cache file.
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailable, match=f"not in torchvision's cache \\({cached}\\)"):
        build_embedder(named.model)

    # Placed in the cache (as a machine with the network would have it): loaded, nothing downloaded.
    torch.manual_seed(1)
    state = torchvision.models.get_model(params.model.backbone, weights=None).state_dict()
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, cached)
    model = build_embedder(named.model)
    assert torch.equal(model.net.conv1.weight, state["conv1.weight"])
    assert model.mean == (0.485, 0.456, 0.406) and model.std == (0.229, 0.224, 0.225)
    # The normalisation travels with the model: saved, loaded, used by every embed.
    save_embedder(model, tmp_path / "m.pt")
    again = load_embedder(tmp_path / "m.pt")
    assert (again.mean, again.std) == (model.mean, model.std)
    image = Image.new("RGB", (40, 40), (200, 30, 90))
    assert np.allclose(embed_images(again, [image]), embed_images(model.eval(), [image]), atol=1e-5)
    # DEFAULT is the backbone's best weights; an unknown name is a params error naming the choices.
    assert torchvision_weights(params.model.backbone, "DEFAULT") == weights
    with pytest.raises(
        ConfigError, match="IMAGENET9K_V9.*is not a file name nor one of resnet18's: DEFAULT, IMAGENET1K_V1"
    ):
        with_overrides(params, {"model.weights": "IMAGENET9K_V9"})


def test_a_centred_model_subtracts_its_trained_images_mean_output_and_keeps_it(params, tmp_path):
    from components.modeling.embedder import embed_files, fit_centre, load_embedder, save_embedder
    from components.modeling.runtime import EXPORT_TOLERANCE, OnnxForward, make_forward

    torch.manual_seed(0)
    centred = build_embedder(params.model.model_copy(update={"centre": True})).eval()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    fit_centre(centred, paths)
    centred._raw = True  # the head's outputs, centred by hand
    raw = embed_files(centred, paths)
    centred._raw = False
    by_hand = (raw - raw.mean(axis=0)) / np.linalg.norm(raw - raw.mean(axis=0), axis=1, keepdims=True)
    assert np.allclose(embed_files(centred, paths), by_hand, atol=1e-5)
    save_embedder(centred, tmp_path / "c.pt")
    loaded = load_embedder(tmp_path / "c.pt")
    assert loaded.centred and torch.equal(loaded.centre, centred.centre)
    images = [Image.open(p).convert("RGB") for p in paths]
    served = make_forward(loaded, "onnxruntime")  # the service's runtime carries the centre too
    assert isinstance(served, OnnxForward) and np.abs(served(images) - by_hand).max() <= EXPORT_TOLERANCE

"""The backbone contract over torchvision families: features of width num_features, preprocessing."""

import pytest
import torch
import torchvision

from transfer_cli.backbones import ImagePreprocessing, TorchvisionBackbone
from transfer_cli.errors import ConfigError


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "vit_b_16"])
def test_torchvision_backbones_produce_pooled_features(name):
    backbone = TorchvisionBackbone(name, weights=None).eval()
    prep = backbone.preprocessing()
    assert isinstance(prep, ImagePreprocessing) and prep.crop_size == 224
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, prep.crop_size, prep.crop_size))
    assert features.shape == (2, backbone.num_features)
    assert backbone.offline_init_args() == {"weights": None}


def test_image_size_scales_the_resize_like_the_weights_do():
    prep = TorchvisionBackbone("resnet50", weights=None, image_size=112).preprocessing()
    assert (prep.crop_size, prep.resize_size) == (112, 116)  # 232/224 of the V2 weights


def test_weights_from_a_local_file_are_loaded(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "mine.pth"
    torch.save(source.state_dict(), path)
    backbone = TorchvisionBackbone("resnet18", weights=str(path))
    assert torch.equal(backbone.model.conv1.weight, source.conv1.weight)


def test_unknown_model_and_unknown_weights_are_config_errors():
    with pytest.raises(ConfigError, match="resnet18"):
        TorchvisionBackbone("resnet_nope", weights=None)
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        TorchvisionBackbone("resnet18", weights="IMAGENET_V9")


def test_weights_whose_builder_changes_the_input_transform_are_refused_before_any_download():
    with pytest.raises(ConfigError, match="not supported yet"):
        TorchvisionBackbone("inception_v3", weights="DEFAULT")

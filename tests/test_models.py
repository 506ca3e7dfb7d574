import pytest
import torch

from reid_ray import ReidRayError
from reid_ray.models import ModelConfig, build_backbone, build_reid_net


@pytest.mark.parametrize("arch,dim", [("small", 256), ("resnet18", 512)])
def test_bnneck_outputs_and_last_stride(arch, dim):
    net = build_reid_net(ModelConfig(arch=arch), num_classes=5)
    out = net(torch.randn(4, 3, 64, 32))
    assert out["feat"].shape == out["bn_feat"].shape == (4, dim) and out["logits"].shape == (4, 5)
    assert not net.bnneck.bias.requires_grad and net.classifier.bias is None
    net.eval()
    assert net(torch.randn(2, 3, 64, 32)).shape == (2, dim)  # retrieval feature = post-BN


def test_last_stride_one_doubles_the_final_map():
    x = torch.randn(1, 3, 128, 64)
    s1 = build_backbone("resnet18", last_stride=1)(x)
    s2 = build_backbone("resnet18", last_stride=2)(x)
    assert s1.shape[-2:] == (8, 4) and s2.shape[-2:] == (4, 2)


def test_pretrained_local_path_loads_and_bad_path_is_clear(tmp_path):
    import torchvision
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    trunk = build_backbone("resnet18", pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(trunk.body[0].weight, ref.conv1.weight)
    with pytest.raises(ReidRayError, match="not found"):
        build_backbone("resnet18", pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ReidRayError, match="valid: resnet18"):
        build_backbone("vgg")


def test_imagenet_download_failure_suggests_a_local_path(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(type(ResNet18_Weights.DEFAULT), "get_state_dict", offline)
    with pytest.raises(ReidRayError, match="local path"):
        build_backbone("resnet18", pretrained="imagenet")

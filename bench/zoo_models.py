"""The architectures of bench/zoo.py: timm, torchvision and Hugging Face models, random weights.

Each entry builds a model (pretrained=False: nothing is downloaded) and a function that draws
`n` inputs for it with a given seed. Vision models take 3x64x64 where they allow it (ViTs are
built with img_size=64); text models take 16 random token ids. Only bench/zoo.py imports this
file; the libraries are imported inside the builders so that a missing one is reported by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

VOCAB = 1000


@dataclass(frozen=True)
class ZooModel:
    name: str
    source: str  # "timm", "torchvision" or "transformers"
    build: Callable[[], nn.Module]
    size: int = 64  # image side, or sequence length for text models
    text: bool = False

    def inputs(self, n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.text:
            return torch.randint(3, VOCAB, (n, self.size), generator=g)
        return torch.randn(n, 3, self.size, self.size, generator=g)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


def _tv_frozen_bn_resnet18() -> nn.Module:
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    return torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)


def _hf(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg)

    return build


_TEXT = dict(vocab_size=VOCAB)
_HF_VIT = dict(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=128, num_labels=10)

# The models named in issue 13 come first, so that a partial run already covers them.
TIMM_ISSUE = [
    "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0", "regnetx_002", "densenet121",
    "lcnet_050", "tinynet_e", "mobilevit_xxs", "edgenext_xx_small", "skresnet18", "resnet18",
    "convnext_atto", "vit_tiny_patch16_224", "ghostnet_100", "repvgg_a0", "res2net50_14w_8s",
    "seresnext26d_32x4d",
]
TIMM_MORE = [
    "tf_efficientnet_b0", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s",
    "efficientformerv2_s0", "mobilevitv2_050", "xception41", "hrnet_w18_small", "cspresnet50",
    "rexnet_100", "mixnet_s", "nf_resnet26", "resnest14d", "mobileone_s0", "fastvit_t8",
    "regnety_002", "dla34", "ecaresnet26t", "efficientvit_b0", "hgnetv2_b0", "semnasnet_050",
    "poolformerv2_s12", "ghostnetv2_100", "dpn48b", "gernet_s",
]
_TIMM_KWARGS = {
    "vit_tiny_patch16_224": dict(img_size=64), "deit_tiny_patch16_224": dict(img_size=64),
    "swin_tiny_patch4_window7_224": dict(img_size=64, window_size=4),
    "levit_128s": dict(img_size=64), "efficientformerv2_s0": dict(img_size=64),
}

MODELS: list[ZooModel] = [
    *(ZooModel(n, "timm", _timm(n, **_TIMM_KWARGS.get(n, {}))) for n in TIMM_ISSUE),
    ZooModel("tv_googlenet", "torchvision", _tv("googlenet", init_weights=True)),
    ZooModel("tv_inception_v3", "torchvision", _tv("inception_v3", init_weights=True), size=96),
    ZooModel("tv_mnasnet0_5", "torchvision", _tv("mnasnet0_5")),
    ZooModel("tv_efficientnet_b0", "torchvision", _tv("efficientnet_b0")),
    ZooModel("tv_mobilenet_v3_small", "torchvision", _tv("mobilenet_v3_small")),
    ZooModel("tv_regnet_x_400mf", "torchvision", _tv("regnet_x_400mf")),
    ZooModel("tv_shufflenet_v2_x0_5", "torchvision", _tv("shufflenet_v2_x0_5")),
    ZooModel("tv_squeezenet1_0", "torchvision", _tv("squeezenet1_0")),
    ZooModel("tv_convnext_tiny", "torchvision", _tv("convnext_tiny")),
    ZooModel("tv_resnet18_frozenbn", "torchvision", _tv_frozen_bn_resnet18),
    ZooModel("hf_bert", "transformers", _hf(
        "BertModel", "BertConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, **_TEXT), size=16, text=True),
    ZooModel("hf_distilbert", "transformers", _hf(
        "DistilBertModel", "DistilBertConfig", dim=64, n_layers=2, n_heads=4, hidden_dim=128,
        **_TEXT), size=16, text=True),
    ZooModel("hf_gpt2", "transformers", _hf(
        "GPT2Model", "GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=64, **_TEXT),
        size=16, text=True),
    ZooModel("hf_llama", "transformers", _hf(
        "LlamaModel", "LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **_TEXT),
        size=16, text=True),
    ZooModel("hf_vit", "transformers", _hf("ViTForImageClassification", "ViTConfig", **_HF_VIT)),
    ZooModel("hf_convnext", "transformers", _hf(
        "ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 2, 1], num_labels=10)),
    ZooModel("hf_resnet", "transformers", _hf(
        "ResNetForImageClassification", "ResNetConfig", embedding_size=16,
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)),
    ZooModel("hf_swin", "transformers", _hf(
        "SwinForImageClassification", "SwinConfig", image_size=64, patch_size=4, embed_dim=16,
        depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=10)),
    *(ZooModel(n, "timm", _timm(n, **_TIMM_KWARGS.get(n, {}))) for n in TIMM_MORE),
]
BY_NAME = {m.name: m for m in MODELS}

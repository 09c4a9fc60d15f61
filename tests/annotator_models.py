"""Tiny random-weight annotator models: the real transformers classes with small configs, saved to disk as
the table's weights would be (model + image processor, + tokenizer for OneFormer). Each builds and saves in
about a second; `TinyAnnotators(root)[key]` builds a module's folder(s) on first use and returns what to
pass as `annotators={key: ...}`.
"""
from __future__ import annotations

from pathlib import Path

import torch


def _save(path: Path, model, *processors) -> str:
    model.save_pretrained(path)
    for processor in processors:
        processor.save_pretrained(path)
    return str(path)


def dpt_hybrid(path: Path) -> str:
    from transformers import DPTConfig, DPTForDepthEstimation

    backbone = {"global_padding": "same", "layer_type": "bottleneck", "depths": [1, 1, 1],
                "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
                "hidden_sizes": [16, 16, 32, 32], "num_groups": 2}
    config = DPTConfig(image_size=64, patch_size=16, hidden_size=32, fusion_hidden_size=32, num_hidden_layers=4,
                       backbone_out_indices=[0, 1, 2, 3], num_attention_heads=4, intermediate_size=37, is_hybrid=True,
                       backbone_config=backbone, backbone=None, backbone_featmap_shape=[1, 32, 4, 4],
                       neck_hidden_sizes=[16, 16, 32, 32])
    return _save(path, DPTForDepthEstimation(config))


def depth_anything(path: Path) -> str:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                            image_size=518, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[16, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
    return _save(path, DepthAnythingForDepthEstimation(config))


def zoe(path: Path) -> str:
    from transformers import Dinov2Config, ZoeDepthConfig, ZoeDepthForDepthEstimation, ZoeDepthImageProcessorPil

    backbone = Dinov2Config(image_size=32, patch_size=16, hidden_size=4, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=8, out_features=["stage1", "stage2"], reshape_hidden_states=False)
    config = ZoeDepthConfig(backbone_config=backbone, backbone=None, neck_hidden_sizes=[2, 2], fusion_hidden_size=6,
                            bottleneck_features=6, num_out_features=[6, 6, 6, 6])
    return _save(path, ZoeDepthForDepthEstimation(config), ZoeDepthImageProcessorPil(size={"height": 64, "width": 64}))


def oneformer(path: Path, classes: int) -> str:
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation, OneFormerImageProcessorPil

    from engine.tiny import tiny_tokenizer

    config = OneFormerConfig(text_encoder_vocab_size=99, hidden_size=32, num_queries=10, num_labels=classes,
                             encoder_feedforward_dim=32, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                             id2label={i: f"class{i}" for i in range(classes)})
    backbone = config.backbone_config
    backbone.embed_dim, backbone.depths, backbone.hidden_size, backbone.num_heads = 16, [1, 1, 1, 1], 16, [1, 1, 2, 2]
    config.backbone = None
    config.hidden_dim = config.mask_dim = config.conv_dim = config.text_encoder_width = 32
    config.task_seq_len = config.max_seq_len = config.text_encoder_context_length = 77
    config.text_encoder_n_ctx = 4
    processor = OneFormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}, num_text=6,
                                           num_labels=classes)
    return _save(path, OneFormerForUniversalSegmentation(config), processor, tiny_tokenizer())


def upernet(path: Path) -> str:
    from transformers import ConvNextConfig, SegformerImageProcessorPil, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(num_channels=3, num_stages=4, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=16, num_labels=150,
                           id2label={i: f"class{i}" for i in range(150)})
    return _save(path, UperNetForSemanticSegmentation(config), SegformerImageProcessorPil(size={"height": 64, "width": 64}))


def vitpose(path: Path) -> str:
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessorPil

    backbone = VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37, out_indices=[2])
    return _save(path, VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17)),
                 VitPoseImageProcessorPil(size={"height": 64, "width": 48}))


def rtdetr(path: Path) -> str:
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessorPil, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
                                  out_features=["stage2", "stage3", "stage4"])
    config = RTDetrConfig(backbone_config=backbone, encoder_hidden_dim=16, encoder_in_channels=[8, 16, 16],
                          feat_strides=[8, 16, 32], encoder_layers=1, encoder_ffn_dim=16, encoder_attention_heads=2,
                          d_model=16, decoder_in_channels=[16, 16, 16], decoder_ffn_dim=16, num_queries=10,
                          decoder_layers=1, decoder_attention_heads=2, num_feature_levels=3, decoder_n_points=2,
                          num_denoising=0, anchor_image_size=None, id2label={0: "person"})
    return _save(path, RTDetrForObjectDetection(config), RTDetrImageProcessorPil(size={"height": 64, "width": 64}))


BUILDERS = {
    "depth": [dpt_hybrid], "depth_anything": [depth_anything], "depth_zoe": [zoe],
    "oneformer_ade20k": [lambda p: oneformer(p, 150)], "oneformer_coco": [lambda p: oneformer(p, 133)],
    "seg_upernet_ade20k": [upernet], "openpose": [vitpose, rtdetr],
}
SAME_WEIGHTS = {"normal_map": "depth", "depth_anything_v2": "depth_anything"}  # as in the table


class TinyAnnotators:
    """Module key -> the tiny folder(s) for `annotators=`, built on first use under `root`."""

    def __init__(self, root: Path):
        self.root, self.built = Path(root), {}

    def __getitem__(self, key: str) -> str:
        key = SAME_WEIGHTS.get(key, key)
        if key not in self.built:
            torch.manual_seed(0)
            folders = [build(self.root / f"{key}_{i}") for i, build in enumerate(BUILDERS[key])]
            self.built[key] = ",".join(folders)
        return self.built[key]

    def all(self) -> dict:
        return {key: self[key] for key in [*BUILDERS, *SAME_WEIGHTS]}

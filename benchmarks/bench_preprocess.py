"""Preprocessor time: ms per control map at 512x512, one row per model-backed module beside canny, one run.

`flock /tmp/heavy.lock python -m pytest benchmarks/bench_preprocess.py -p no:randomly --benchmark
--benchmark-json benchmarks/results/cpu-preprocess-$(date -u +%Y%m%d-%H%M%S).json` (its own file name: the
default, cpu-tiny-*, would pass for the newest tiny pipeline run in `python -m benchmarks.report`) builds each module's network at its real size with random
weights (the architecture of the table's default weights, written out below: no download), saves it to disk,
loads it through the table's Annotators as a user's weights would load, and times `engine.preprocess.run`
on a 512x512 picture at processor resolution 512 (the A1111 default), after one warm-up. Models are built,
timed and freed one at a time (the largest, Depth Anything/ZoeDepth, are ~1.3 GB in fp32). Each row records
the load time and MB of the models it loaded (none where it shares the row before's). The openpose row is RT-DETR on the picture plus ViTPose on its one
best-scoring person box (random weights find any number; a real picture adds ViTPose per person found).
Without --benchmark every row runs once on tiny configs at 64x64 (CI).
"""
from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from benchmarks.bench_pipeline import _record, _run

MODULES = ("canny", "depth", "normal_map", "depth_anything", "depth_anything_v2", "depth_zoe", "oneformer_ade20k",
           "oneformer_coco", "seg_upernet_ade20k", "openpose")
ROUNDS = 3
SAME_WEIGHTS = {"normal_map": "depth", "depth_anything_v2": "depth_anything"}


def _real_size(key: str, folder) -> str:
    """The default weights' architecture with random weights, saved to `folder`; returns what to load."""
    import transformers as tf

    from engine.tiny import tiny_tokenizer

    def save(model, *processors):
        model.save_pretrained(folder)
        for processor in processors:
            processor.save_pretrained(folder)
        return str(folder)

    if key == "depth":  # Intel/dpt-hybrid-midas: ViT-hybrid base on BiT-50
        return save(tf.DPTForDepthEstimation(tf.DPTConfig(is_hybrid=True, neck_hidden_sizes=[256, 512, 768, 768],
                                                          reassemble_factors=[1, 1, 1, 0.5])))
    if key == "depth_anything":  # LiheYoung/depth-anything-large-hf (v2 large is the same architecture)
        backbone = tf.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518,
                                   patch_size=14, out_indices=[5, 11, 17, 23], reshape_hidden_states=False)
        return save(tf.DepthAnythingForDepthEstimation(tf.DepthAnythingConfig(
            backbone_config=backbone, reassemble_hidden_size=1024, neck_hidden_sizes=[256, 512, 1024, 1024],
            fusion_hidden_size=256)))
    if key == "depth_zoe":  # Intel/zoedepth-nyu: BEiT-large backbone (the config's default)
        return save(tf.ZoeDepthForDepthEstimation(tf.ZoeDepthConfig()), tf.ZoeDepthImageProcessorPil())
    if key in ("oneformer_ade20k", "oneformer_coco"):  # shi-labs/oneformer_*_swin_large
        classes = 150 if key == "oneformer_ade20k" else 133
        config = tf.OneFormerConfig(num_labels=classes, num_queries=250 if classes == 150 else 150,
                                    id2label={i: str(i) for i in range(classes)})
        config.backbone_config = tf.SwinConfig(image_size=384, embed_dim=192, depths=[2, 2, 18, 2],
                                               num_heads=[6, 12, 24, 48], window_size=12,
                                               out_features=["stage1", "stage2", "stage3", "stage4"])
        processor = tf.OneFormerImageProcessorPil(size={"shortest_edge": 512, "longest_edge": 2048}, num_text=134,
                                                  num_labels=classes)
        return save(tf.OneFormerForUniversalSegmentation(config), processor, tiny_tokenizer())
    if key == "seg_upernet_ade20k":  # openmmlab/upernet-convnext-small
        backbone = tf.ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768],
                                     out_features=["stage1", "stage2", "stage3", "stage4"])
        config = tf.UperNetConfig(backbone_config=backbone, num_labels=150, id2label={i: str(i) for i in range(150)})
        return save(tf.UperNetForSemanticSegmentation(config), tf.SegformerImageProcessorPil(size={"height": 512, "width": 512}))
    if key == "openpose":  # usyd-community/vitpose-base-simple + PekingU/rtdetr_r50vd_coco_o365
        # COCO's 17 keypoints (VitPoseConfig's own default is 2 labels). The detector has one class, person:
        # its class bias starts at the prior 1 / (classes + 1), so with COCO's 80 random classes every score
        # is ~0.01, under the 0.3 person threshold (no person found); with one, ~0.5. The class head is a
        # small linear layer: the time is the same.
        pose = save(tf.VitPoseForPoseEstimation(tf.VitPoseConfig(num_labels=17)), tf.VitPoseImageProcessorPil())
        detector = folder.parent / f"{folder.name}_detector"
        tf.RTDetrForObjectDetection(tf.RTDetrConfig(id2label={0: "person"})).save_pretrained(detector)
        tf.RTDetrImageProcessorPil().save_pretrained(detector)
        return f"{pose},{detector}"
    raise KeyError(key)


def _one_person(boxes: np.ndarray) -> np.ndarray:
    if not len(boxes):
        raise AssertionError("the random-weight RT-DETR found no person box: the openpose row would time no ViTPose")
    return boxes[:1]  # the detector's best-scoring person


@pytest.fixture(scope="module")
def weights(bench_config, tmp_path_factory):
    """Module key -> its folder(s): real-size with --benchmark, tiny otherwise; built on first use."""
    from tests.annotator_models import TinyAnnotators

    if not bench_config.real:
        return TinyAnnotators(tmp_path_factory.mktemp("tiny-annotators"))
    root, built = tmp_path_factory.mktemp("annotators"), {}

    class Lazy:
        def __getitem__(self, key):
            key = SAME_WEIGHTS.get(key, key)
            if key not in built:
                built[key] = _real_size(key, root / key)
            return built[key]

    return Lazy()


@pytest.mark.parametrize("key", MODULES)
def test_preprocess(benchmark, bench_config, machine_info, matmul_rate, weights, key):
    from engine.preprocess import MODULES as TABLE
    from engine.preprocess import Annotators, loading, run

    module = TABLE[key]
    side = 512 if bench_config.real else 64
    benchmark.group = f"preprocess {side}px"
    picture = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    picture = np.ascontiguousarray(np.repeat(np.repeat(picture[::8, ::8], 8, 0), 8, 1))  # blocks: edges to find
    build_s = 0.0
    before = len(loading.loads())
    if module.model_backed:
        start = time.perf_counter()
        annotators = Annotators({key: weights[key]}, "cpu")
        build_s = time.perf_counter() - start
        annotator = annotators.get(module)  # load (timed in the load records, not in the rows)
        if key == "openpose" and bench_config.real:  # random weights find any number of "people"; time the map of exactly one
            find = annotator.people_boxes
            annotator.people_boxes = lambda image: _one_person(find(image))
    else:
        annotators = Annotators()
    # This row's loads (openpose loads two models; normal_map and depth_anything_v2 reuse the row before's,
    # and load nothing).
    loaded = loading.loads()[before:]
    _record(benchmark, bench_config, machine_info, matmul_rate, module=key, kind="preprocess", side=side,
            build_s=build_s, load_ms=sum(r["ms"] for r in loaded), model_mb=sum(r["mb"] for r in loaded),
            shares_weights_of=SAME_WEIGHTS.get(key))
    result = _run(benchmark, bench_config, lambda: run(module, picture, annotators, side), ROUNDS, warmups=1)
    assert result.shape == (side, side, 3) and result.dtype == np.uint8
    if module.model_backed and key not in SAME_WEIGHTS.values():  # free it before the next module's build
        loading.release()
        gc.collect()

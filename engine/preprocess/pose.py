"""Pose maps: ViTPose keypoints on RT-DETR's person boxes, drawn as OpenPose's 18-point body map.

The openpose ControlNets were trained on OpenPose renderings: a black canvas, 17 limbs drawn as filled
ellipses (4 pixels half-width) at 60% of their colour, then the 18 points as filled circles of radius 4
in OpenPose's colour order (sd-webui-controlnet `annotator/openpose/util.py` draws them so). ViTPose gives
COCO's 17 keypoints; OpenPose's order is nose, neck, right arm, left arm, right leg, left leg, eyes and
ears, with the neck the midpoint of the shoulders when both are seen (as DWPose derives it). Points below
KEYPOINT_THRESHOLD are not drawn, and neither are limbs touching them.
"""
from __future__ import annotations

import math

import numpy as np

from engine.preprocess.loading import shared

# OpenPose point i is COCO keypoint COCO_INDEX[i]; the neck (None) is derived from the shoulders (5, 6).
COCO_INDEX = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))  # OpenPose's order; limb k takes COLORS[k]
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
STICK_WIDTH, POINT_RADIUS = 4, 4
KEYPOINT_THRESHOLD = 0.3  # as DWPose in the extension
PERSON_THRESHOLD = 0.3  # RT-DETR score for a person box (transformers' ViTPose example uses 0.3)


def openpose_points(keypoints: np.ndarray, scores: np.ndarray, threshold: float = KEYPOINT_THRESHOLD) -> list:
    """COCO's 17 (x, y) keypoints and scores of one person -> OpenPose's 18 points, None where unseen."""
    seen = scores > threshold
    points = []
    for coco in COCO_INDEX:
        if coco is None:
            points.append(tuple((keypoints[5] + keypoints[6]) / 2) if seen[5] and seen[6] else None)
        else:
            points.append(tuple(keypoints[coco]) if seen[coco] else None)
    return points


def draw_bodies(height: int, width: int, people: list) -> np.ndarray:
    """OpenPose's body rendering of each person's 18 points (pixel (x, y) or None) on a black canvas."""
    import cv2

    canvas = np.zeros((height, width, 3), np.uint8)
    for points in people:
        for (a, b), color in zip(LIMBS, COLORS):
            if points[a] is None or points[b] is None:
                continue
            (xa, ya), (xb, yb) = points[a], points[b]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            polygon = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), STICK_WIDTH),
                                       int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
        for point, color in zip(points, COLORS):
            if point is not None:
                cv2.circle(canvas, (int(point[0]), int(point[1])), POINT_RADIUS, color, thickness=-1)
    return canvas


def load_vitpose(source: str, device):
    from transformers import AutoImageProcessor, VitPoseForPoseEstimation

    return VitPoseForPoseEstimation.from_pretrained(source).to(device).eval(), AutoImageProcessor.from_pretrained(source)


def load_rtdetr(source: str, device):
    from transformers import AutoImageProcessor, RTDetrForObjectDetection

    return RTDetrForObjectDetection.from_pretrained(source).to(device).eval(), AutoImageProcessor.from_pretrained(source)


class VitPoseOpenpose:
    person_threshold = PERSON_THRESHOLD
    keypoint_threshold = KEYPOINT_THRESHOLD

    def __init__(self, sources, device, module: str):
        self.device = device
        self.pose, self.pose_processor = shared(load_vitpose, sources[0], device, module)
        self.detector, self.detector_processor = shared(load_rtdetr, sources[1], device, module)
        labels = {name.lower(): i for i, name in self.detector.config.id2label.items()}
        self.person = labels.get("person", 0)

    def people_boxes(self, image: np.ndarray) -> np.ndarray:
        """Person boxes (N x 4, COCO x, y, width, height in pixels) found by the detector."""
        import torch

        inputs = self.detector_processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.detector(**inputs)
        found = self.detector_processor.post_process_object_detection(
            outputs, target_sizes=torch.tensor([image.shape[:2]]), threshold=self.person_threshold)[0]
        boxes = found["boxes"][found["labels"] == self.person].float().cpu().numpy()
        boxes[:, 2:] -= boxes[:, :2]
        return boxes

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        import torch

        boxes = self.people_boxes(image)
        people = []
        if len(boxes):
            inputs = self.pose_processor(images=image, boxes=[boxes], return_tensors="pt").to(self.device)
            experts = getattr(self.pose.config.backbone_config, "num_experts", 1)
            extra = {"dataset_index": torch.zeros(len(boxes), dtype=torch.long)} if experts > 1 else {}  # COCO
            with torch.no_grad():
                outputs = self.pose(**inputs, **extra)
            for person in self.pose_processor.post_process_pose_estimation(outputs, boxes=[boxes])[0]:
                people.append(openpose_points(person["keypoints"].float().cpu().numpy(),
                                              person["scores"].float().cpu().numpy(), self.keypoint_threshold))
        return draw_bodies(image.shape[0], image.shape[1], people)

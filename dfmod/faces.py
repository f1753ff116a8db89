"""The face stage: find the faces in a whole photo and crop each the way the training crops were made.

The detector was trained on face crops (faces256: a square around the face, resized to 256 px), so a 4000x3000
photo with a small face must not be squashed to 224x224 and judged as a face. :class:`FaceFinder` finds faces,
:func:`face_crops` cuts a square around each (the face box grown by :data:`CROP_MARGIN`, the ratio between a
training crop's side and the face box the detector draws on it), and the caller classifies every crop; the
image's verdict is its most-fake face, and an image without a face gets the state ``no_face`` instead of a guess.

The face detector is MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks") as packaged by ``facenet-pytorch``, whose wheel ships the three networks' weights
(``facenet_pytorch/data/{p,r,o}net.pt``): nothing is downloaded at run time. Licences: facenet-pytorch is MIT;
the MTCNN weights come from the authors' MIT-licensed release. Why not the others: current ``mediapipe`` wheels
(1.x) no longer ship BlazeFace's ``.tflite`` models, and the 0.10 wheels that do need numpy < 2 and jax;
OpenCV's bundled Haar cascade found 93.5 % of faces256 Validation crops (187 of 200) against MTCNN's 100 %
(see docs/model-card.md). A face's ``score`` is MTCNN's face probability.

Detection runs on a copy whose long side is at most ``detect_side`` pixels (MTCNN's image pyramid costs in
proportion to the pixels), and boxes are scaled back to the original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

NO_FACE = "no_face"
FACES = "faces"
# How faces256's training crops frame the face box MTCNN draws on them, medians over 200 Validation crops
# (`dfmod evaluate-faces` prints the margin it sees as crop_margin_median): the crop's side is 1.43 x the box's
# longer side, and its centre lies 0.097 box sides above the box's centre (the crops keep more forehead and
# hair than chin). A crop framed otherwise shows the classifier background it never saw beside a face.
CROP_MARGIN = 1.43
CROP_SHIFT_Y = -0.097


@dataclass(frozen=True)
class Face:
    """A face found in an image: its box (pixels, x0 y0 x1 y1 of the original image), the square crop box
    around it that the classifier sees, and the detector's score."""

    box: tuple[int, int, int, int]
    crop_box: tuple[int, int, int, int]
    score: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FaceResult:
    faces: list[Face] = field(default_factory=list)

    @property
    def state(self) -> str:
        return FACES if self.faces else NO_FACE


class FaceNotAvailable(RuntimeError):
    """The face stage is switched on but facenet-pytorch (the ``faces`` extra) is not installed."""


def square_crop_box(box: Sequence[float], image_size: tuple[int, int], margin: float = CROP_MARGIN,
                    shift_y: float = CROP_SHIFT_Y) -> tuple[int, int, int, int]:
    """A square of side ``margin`` x the face box's longer side, centred ``shift_y`` box sides below the box's
    centre (negative: above), moved (not shrunk) to stay inside the image where it can; shrunk only when the
    image is smaller than the square."""
    x0, y0, x1, y1 = box
    width, height = image_size
    box_side = max(x1 - x0, y1 - y0)
    side = max(1, min(int(round(box_side * margin)), width, height))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + shift_y * box_side
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return (left, top, left + side, top + side)


class FaceFinder:
    """Faces in PIL images, found by MTCNN on the CPU (or a given torch device)."""

    def __init__(self, *, detect_side: int = 1024, min_face: int = 20, min_score: float = 0.9,
                 max_faces: int = 16, margin: float = CROP_MARGIN, device: str = "cpu") -> None:
        try:
            from facenet_pytorch import MTCNN
        except ImportError as exc:  # the face stage is optional: say what to install
            raise FaceNotAvailable("the face stage needs facenet-pytorch: pip install 'dfmod[faces]'") from exc
        # The last stage's default threshold (0.7) lets through textures that look like faces at small scales.
        self._mtcnn = MTCNN(keep_all=True, min_face_size=min_face, device=device, select_largest=False)
        self.detect_side = detect_side
        self.min_score = min_score
        self.max_faces = max_faces
        self.margin = margin

    @property
    def description(self) -> str:
        return (f"MTCNN (facenet-pytorch), long side <= {self.detect_side} px, score >= {self.min_score}, "
                f"crop margin {self.margin}")

    def find(self, image: Image.Image) -> FaceResult:
        """Faces in ``image`` scoring at least ``min_score``, most confident first (at most ``max_faces``)."""
        import torch

        rgb = image.convert("RGB")
        width, height = rgb.size
        scale = min(1.0, self.detect_side / max(width, height))
        if scale < 1.0:
            rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
        with torch.inference_mode():
            boxes, scores = self._mtcnn.detect(rgb)
        faces = []
        if boxes is not None:
            for (x0, y0, x1, y1), score in zip(boxes, scores, strict=True):
                if score is None or score < self.min_score:
                    continue
                box = (max(0, int(x0 / scale)), max(0, int(y0 / scale)), min(width, int(round(x1 / scale))),
                       min(height, int(round(y1 / scale))))
                if box[2] <= box[0] or box[3] <= box[1]:
                    continue
                faces.append(Face(box, square_crop_box(box, (width, height), self.margin), float(score)))
        faces.sort(key=lambda face: face.score, reverse=True)
        return FaceResult(faces[: self.max_faces])


def scale_face(face: Face, frame: tuple[int, int], to: tuple[int, int]) -> Face:
    """``face`` found in an image of size ``frame``, in the pixels of the same image at size ``to`` (the decoder
    may have downscaled the photo before detection)."""
    if frame == to:
        return face
    sx, sy = to[0] / frame[0], to[1] / frame[1]

    def scaled(box):
        x0, y0, x1, y1 = box
        return (int(x0 * sx), int(y0 * sy), min(to[0], int(round(x1 * sx))), min(to[1], int(round(y1 * sy))))

    return Face(scaled(face.box), scaled(face.crop_box), face.score)


def face_crops(image: Image.Image, result: FaceResult) -> list[Image.Image]:
    """The square crop of every face, in the order of ``result.faces``."""
    rgb = image.convert("RGB")
    return [rgb.crop(face.crop_box) for face in result.faces]


def image_verdict(face_probabilities: Sequence[float]) -> float | None:
    """An image's fake probability from its faces': the most-fake face; None when it has no face."""
    return float(max(face_probabilities)) if len(face_probabilities) else None

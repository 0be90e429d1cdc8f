"""Real video clips as grey frames: Debian's ``opencv-doc`` clips, or any file OpenCV reads.

``read_clip(path, size=64)`` returns ``[F, size, size]`` uint8: each frame converted to grey,
cropped to its central square and resized with area averaging. The clips used for training
are :data:`TRAINING_CLIPS` (``vtest.avi``: pedestrians under a fixed camera, 795 frames at
10 fps; ``Megamind.avi``: an animated film excerpt, 270 frames at 24 fps). ``tree.avi``,
``box.mp4`` and ``cup.mp4`` of the same package (the last two gzipped, as ``opencv4/html/box.mp4.gz``) are
deliberately not used here: they are kept for an independent check. A ``.gz`` clip is read through a temporary
decompressed copy.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .._optional import require
from ..errors import MissingDataError

CLIP_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
ENV_VAR = "QUICKMERGE_VIDEO_DIR"
TRAINING_CLIPS = ("vtest.avi", "Megamind.avi")
# SHA-256 of the clips as Debian's opencv-doc 4.6.0 ships them.
SHA256 = {
    "vtest.avi": "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
    "Megamind.avi": "0057387cb7e75c8fd1663b62cfdc51fa53f527795d0fe3c1fea2fd159d3130b5",
}


def clip_dir() -> Path:
    """``$QUICKMERGE_VIDEO_DIR`` or where Debian's ``opencv-doc`` puts its example clips."""
    return Path(os.environ.get(ENV_VAR, CLIP_DIR))


def training_clip_paths() -> list[Path]:
    """Paths of :data:`TRAINING_CLIPS`; a clear error naming the package when they are missing."""
    base = clip_dir()
    missing = [name for name in TRAINING_CLIPS if not (base / name).is_file()]
    if missing:
        raise MissingDataError(
            f"video clips {missing} not found in {base}. Install them with `apt-get install -y opencv-doc` "
            f"(Debian/Ubuntu), or point ${ENV_VAR} at a directory holding {list(TRAINING_CLIPS)}."
        )
    return [base / name for name in TRAINING_CLIPS]


def checksums() -> dict[str, str]:
    """SHA-256 of the training clips, to record beside a model trained on them (checked against :data:`SHA256`)."""
    from .fashion_mnist import sha256

    out = {}
    for path in training_clip_paths():
        digest = sha256(path)
        if digest != SHA256[path.name]:
            raise ValueError(f"{path} is not the clip Debian's opencv-doc ships (SHA-256 {digest}, "
                             f"expected {SHA256[path.name]})")
        out[path.name] = digest
    return out


def read_clip(path: str | os.PathLike, size: int = 64, *, max_frames: int | None = None) -> torch.Tensor:
    """Grey frames ``[F, size, size]`` uint8 of the clip at ``path`` (central square, area-resized).

    ``path`` may be gzipped (``box.mp4.gz``); OpenCV cannot open that, so it is decompressed to a temporary file
    first. Warns when OpenCV decodes fewer frames than the file declares (Debian's ``tree.avi``: 68 of 444).
    """
    cv2 = require("cv2", "video", "Reading video clips")
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video: no file at {path}")
    if path.suffix == ".gz":
        with tempfile.TemporaryDirectory() as tmp:
            inner = Path(tmp) / path.stem  # box.mp4.gz -> box.mp4: OpenCV picks the demuxer by the extension too
            try:
                with gzip.open(path, "rb") as source, open(inner, "wb") as target:
                    shutil.copyfileobj(source, target)
            except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError; a cut file ends early
                raise ValueError(f"video: {path} ends in .gz but could not be decompressed ({error})") from error
            return _decode(cv2, inner, size, max_frames, shown=path)
    return _decode(cv2, path, size, max_frames, shown=path)


def _decode(cv2, path: Path, size: int, max_frames: int | None, *, shown: Path) -> torch.Tensor:
    """The frames of :func:`read_clip`; ``shown`` is the path named in errors and warnings."""
    capture = cv2.VideoCapture(str(path))
    declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))  # the container's count (0 or less: unknown)
    frames = []
    try:
        while max_frames is None or len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
            h, w = grey.shape
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            square = grey[top : top + side, left : left + side]
            frames.append(torch.from_numpy(cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)))
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"video: OpenCV read no frame from {shown} (unsupported codec or not a video)")
    if len(frames) < declared and (max_frames is None or len(frames) < max_frames):
        warnings.warn(f"video: OpenCV decoded {len(frames)} of the {declared} frames {shown.name} declares; the rest "
                      "could not be decoded (a damaged file or a codec this OpenCV build reads only in part) and is "
                      "left out", stacklevel=3)  # the caller of read_clip
    return torch.stack(frames)

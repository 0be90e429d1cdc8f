"""Reading real clips: shape, grey levels, central square, clear errors."""

import pytest
import torch

cv2 = pytest.importorskip("cv2")

from quickmerge.data import video  # noqa: E402
from quickmerge.errors import MissingDataError  # noqa: E402
from tests.conftest import write_clip as _write_clip  # noqa: E402

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_a_written_clip_reads_back_as_its_central_square(tmp_path):
    frames = torch.zeros(6, 48, 96, dtype=torch.uint8)
    frames[:, :, 24:72] = 200  # the central 48x48 square is bright, the sides dark
    frames[3:, :, 24:72] = 100
    _write_clip(tmp_path / "c.avi", frames)
    out = video.read_clip(tmp_path / "c.avi", size=16)
    assert out.shape == (6, 16, 16) and out.dtype == torch.uint8
    assert (out[:3].float() - 200).abs().max() < 12 and (out[3:].float() - 100).abs().max() < 12
    assert video.read_clip(tmp_path / "c.avi", size=16, max_frames=2).shape[0] == 2


def test_missing_clips_and_files_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(video.ENV_VAR, str(tmp_path))
    with pytest.raises(MissingDataError, match="opencv-doc"):
        video.training_clip_paths()
    with pytest.raises(FileNotFoundError, match="no file"):
        video.read_clip(tmp_path / "none.avi")
    (tmp_path / "text.avi").write_text("not a video")
    with pytest.raises(ValueError, match="no frame"):
        video.read_clip(tmp_path / "text.avi")


@pytest.mark.skipif(not (video.clip_dir() / "vtest.avi").is_file(), reason="opencv-doc clips not installed")
def test_the_training_clips_are_the_ones_debian_ships():
    assert video.checksums() == video.SHA256
    clip = video.read_clip(video.training_clip_paths()[1], 32, max_frames=5)
    assert clip.shape == (5, 32, 32) and clip.float().std() > 10  # real picture content


def test_a_clip_decoded_only_in_part_says_so(tmp_path):
    frames = torch.randint(0, 256, (12, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    _write_clip(tmp_path / "whole.avi", frames)
    data = (tmp_path / "whole.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])  # the header still declares 12 frames
    with pytest.warns(UserWarning, match=r"decoded \d+ of the 12 frames cut.avi declares") as record:
        out = video.read_clip(tmp_path / "cut.avi", size=16)
    assert record[0].filename == __file__  # the warning points at the caller of read_clip
    assert 0 < out.shape[0] < 12
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole clip, or the first frames asked for, read without a warning
        assert video.read_clip(tmp_path / "whole.avi", size=16).shape[0] == 12
        assert video.read_clip(tmp_path / "cut.avi", size=16, max_frames=2).shape[0] == 2


def test_a_gzipped_clip_reads_as_the_clip_and_errors_name_the_given_file(tmp_path):
    import gzip

    frames = torch.randint(0, 256, (5, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    _write_clip(tmp_path / "c.avi", frames)
    (tmp_path / "c.avi.gz").write_bytes(gzip.compress((tmp_path / "c.avi").read_bytes()))
    assert torch.equal(video.read_clip(tmp_path / "c.avi.gz", size=16), video.read_clip(tmp_path / "c.avi", size=16))
    (tmp_path / "text.avi.gz").write_bytes(gzip.compress(b"not a video"))
    with pytest.raises(ValueError, match=r"no frame from .*text\.avi\.gz"):
        video.read_clip(tmp_path / "text.avi.gz")
    (tmp_path / "plain.avi.gz").write_bytes((tmp_path / "c.avi").read_bytes())  # named .gz, not gzipped
    with pytest.raises(ValueError, match=r"plain\.avi\.gz ends in \.gz but could not be decompressed"):
        video.read_clip(tmp_path / "plain.avi.gz")
    whole = gzip.compress((tmp_path / "c.avi").read_bytes())
    (tmp_path / "cut.avi.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    with pytest.raises(ValueError, match="could not be decompressed"):
        video.read_clip(tmp_path / "cut.avi.gz")

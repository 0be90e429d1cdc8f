import gzip
import struct

import pytest
import torch

from quickmerge.data import fashion_mnist as fm

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def write_idx(path, data: torch.Tensor) -> None:
    header = struct.pack(">I", 0x0800 | data.dim()) + b"".join(struct.pack(">I", s) for s in data.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + data.to(torch.uint8).numpy().tobytes())


def test_reads_idx_files_and_checks_counts(tmp_path, monkeypatch):
    images = torch.randint(0, 256, (10_000, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (10_000,), dtype=torch.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    x, y = fm.load_fashion_mnist("test", verify=False)
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.uint8 and torch.equal(x[:, 0], images)
    assert y.dtype == torch.int64 and torch.equal(y, labels.long())
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:5])
    with pytest.raises(ValueError, match="expected 10000"):
        fm.load_fashion_mnist("test", verify=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:, None])  # wrong rank: magic says 2-d
    with pytest.raises(ValueError, match="idx file"):
        fm.load_fashion_mnist("test", verify=False)
    with pytest.raises(ValueError, match="not the original Fashion-MNIST"):
        fm.load_fashion_mnist("test")  # synthetic files fail the checksum


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fm.load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("validation")


def test_normalize_uses_training_statistics():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    out = fm.normalize(x)
    assert torch.allclose(out, (torch.tensor([0.0, 1.0]) - fm.MEAN) / fm.STD)


@pytest.mark.skipif(not (fm.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist absent")
def test_real_test_split_is_balanced():
    _, y = fm.load_fashion_mnist("test")
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))


@pytest.mark.skipif(not (fm.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist absent")
def test_installed_files_match_the_published_sums():
    assert fm.checksums() == fm.SHA256

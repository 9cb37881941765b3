"""ImageNet weights (model/pretrained.py): cache, PRETRAIN_PATH, download, checksum, offline.

No test here opens a connection. An autouse fixture points the torch hub folder at a fresh
temporary folder and replaces both the project's downloader (``model.pretrained.fetch_url``)
and ``torch.hub.download_url_to_file`` with functions that fail the test; tests of the download
path install a fake downloader that writes a small state dict whose file name carries the
SHA-256 prefix the test chose (``HUB_FILES`` is patched to that name).
"""
import hashlib
import io
import os
import urllib.error

import pytest
import torch

import model.pretrained as pretrained
from model.pretrained import (
    DOWNLOAD_ROOT,
    HUB_FILES,
    PretrainedWeightsError,
    find_imagenet_weights,
    hash_prefix,
    read_imagenet_weights,
)
from utils.config import build_config

REAL_FETCH_URL = pretrained.fetch_url  # taken before any fixture replaces it


def _refuse(*args, **kwargs):
    raise AssertionError("a test tried to download %r" % (args[:1],))


@pytest.fixture(autouse=True)
def hub(tmp_path, monkeypatch):
    """A fresh, empty torch hub folder; every real download path fails the test."""
    root = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(root))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    monkeypatch.setattr(pretrained, "fetch_url", _refuse)
    return root


def _state_bytes():
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.arange(6.0).reshape(1, 6), "fc.bias": torch.ones(2)}, buf)
    return buf.getvalue()


@pytest.fixture
def served(monkeypatch):
    """A fake torchvision file for resnet18: HUB_FILES names it ``resnet18-<sha256[:8]>.pth``,
    and ``calls`` records each (url, dst) the fake downloader was asked for."""
    data = _state_bytes()
    name = "resnet18-%s.pth" % hashlib.sha256(data).hexdigest()[:8]
    monkeypatch.setitem(HUB_FILES, "resnet18", (name,))
    calls = []

    def fake(url, dst, progress=True):
        calls.append((url, dst))
        with open(dst, "wb") as f:
            f.write(data)

    monkeypatch.setattr(pretrained, "fetch_url", fake)
    return {"name": name, "data": data, "calls": calls}


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_hash_prefix_of_torchvision_names():
    assert hash_prefix("resnet50-19c8e357.pth") == "19c8e357"
    assert hash_prefix("/x/y/resnet18-f37072fd.pth") == "f37072fd"
    assert hash_prefix("my_weights.pth") is None
    assert HUB_FILES["resnet50"][0] == "resnet50-19c8e357.pth"


def test_download_into_hub_cache(hub, served):
    path = find_imagenet_weights("resnet18")
    folder = str(hub / "checkpoints")
    assert path == os.path.join(folder, served["name"])
    [(url, dst)] = served["calls"]
    assert url == DOWNLOAD_ROOT + served["name"]
    assert os.path.dirname(dst) == folder and dst != path  # written under a temporary name
    assert _files(folder) == [served["name"]]
    with open(path, "rb") as f:
        assert f.read() == served["data"]
    assert torch.equal(read_imagenet_weights(path)["fc.bias"], torch.ones(2))
    # Cached now: a second call does not download again.
    assert find_imagenet_weights("resnet18", "", download=True) == path
    assert len(served["calls"]) == 1


def test_release_file_name_and_url(hub, monkeypatch):
    calls = []

    def fake(url, dst, progress=True):
        calls.append((url, progress))
        with open(dst, "wb") as f:
            f.write(b"not the release file")

    monkeypatch.setattr(pretrained, "fetch_url", fake)
    with pytest.raises(PretrainedWeightsError):
        find_imagenet_weights("resnet50")
    assert calls == [("https://download.pytorch.org/models/resnet50-19c8e357.pth", True)]


def _failed_download(hub, served, monkeypatch, fetch):
    """Run find_imagenet_weights with the downloader `fetch`, which must fail; check the error
    is one line naming the URL and the destination and that the cache folder stays empty (no
    partial or corrupt file kept); return the message."""
    monkeypatch.setattr(pretrained, "fetch_url", fetch)
    with pytest.raises(PretrainedWeightsError) as info:
        find_imagenet_weights("resnet18")
    text = str(info.value)
    folder = str(hub / "checkpoints")
    assert "\n" not in text
    assert DOWNLOAD_ROOT + served["name"] in text and os.path.join(folder, served["name"]) in text
    assert _files(folder) == []
    return text


def test_checksum_mismatch_leaves_nothing(hub, served, monkeypatch):
    bad = served["data"] + b"corrupt"

    def corrupt(url, dst, progress=True):
        with open(dst, "wb") as f:
            f.write(bad)

    text = _failed_download(hub, served, monkeypatch, corrupt)
    assert "checksum mismatch" in text and hashlib.sha256(bad).hexdigest()[:8] in text
    assert "MODEL.DOWNLOAD False" in text and "MODEL.PRETRAIN_PATH" in text


@pytest.mark.parametrize("error", [
    urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
    urllib.error.HTTPError("https://download.pytorch.org/x", 404, "Not Found", None, None),
    OSError("No space left on device"),
])
def test_failed_download_is_one_clear_line(hub, served, monkeypatch, error):
    def partial(url, dst, progress=True):
        with open(dst, "wb") as f:
            f.write(served["data"][:10])
        raise error

    text = _failed_download(hub, served, monkeypatch, partial)
    assert " ".join(str(error).split()) in text


def test_offline_never_downloads(hub, served):
    with pytest.raises(PretrainedWeightsError) as info:
        find_imagenet_weights("resnet18", "", download=False)
    text = str(info.value)
    folder = str(hub / "checkpoints")
    assert served["calls"] == []
    assert "\n" not in text
    assert "MODEL.DOWNLOAD is False" in text and "MODEL.DOWNLOAD True" in text
    assert DOWNLOAD_ROOT + served["name"] in text and folder in text
    assert "MODEL.PRETRAIN_PATH" in text and "MODEL.PRETRAINED False" in text
    assert _files(folder) == []


def test_cache_and_path_win_over_download(hub, served, tmp_path, monkeypatch):
    # PRETRAIN_PATH: used as given, cache empty, no download.
    own = str(tmp_path / "mine.pth")
    with open(own, "wb") as f:
        f.write(served["data"])
    assert find_imagenet_weights("resnet18", own) == own
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        find_imagenet_weights("resnet18", str(tmp_path / "missing.pth"))
    # A cached file under any known name: used, no download. A stale temporary is not.
    folder = hub / "checkpoints"
    folder.mkdir(parents=True)
    (folder / (served["name"] + ".abc.partial")).write_bytes(b"half")
    monkeypatch.setitem(HUB_FILES, "resnet18", (served["name"], "resnet18-f37072fd.pth"))
    newer = folder / "resnet18-f37072fd.pth"
    newer.write_bytes(served["data"])
    assert find_imagenet_weights("resnet18") == str(newer)
    assert served["calls"] == []


def test_unknown_arch_is_an_error_before_any_download(served):
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights known"):
        find_imagenet_weights("vgg16")
    assert served["calls"] == []


def test_default_fetch_url_is_torch_hub(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, progress=True: seen.append((url, dst, progress)))
    REAL_FETCH_URL("https://example.invalid/w.pth", str(tmp_path / "w"), progress=False)
    assert seen == [("https://example.invalid/w.pth", str(tmp_path / "w"), False)]


def test_config_default_downloads():
    assert build_config("sysu").MODEL.DOWNLOAD is True
    assert build_config("sysu", opts=["MODEL.DOWNLOAD", "False"]).MODEL.DOWNLOAD is False

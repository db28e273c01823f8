"""The fetcher: checksums, caching, manual placement, and one-line errors when offline."""

import hashlib
import io
import sys
import tarfile

import pytest

from zojax.data import fetch


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
  """A tiny sdist-like asset whose 'download' is a local copy, under a temp $ZOJAX_DATA."""
  monkeypatch.setenv("ZOJAX_DATA", str(tmp_path / "cache"))
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as t:
    data = b"hello\n"
    info = tarfile.TarInfo("pkg-1.0/file.txt")
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))
  archive = tmp_path / "pkg-1.0.tar.gz"
  archive.write_bytes(buf.getvalue())
  asset = fetch.Asset(name="fake", kind="sdist", package="pkg", version="1.0",
                      filename=archive.name, sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
                      licence="", manual_url="https://example.invalid/pkg")
  monkeypatch.setitem(fetch.ASSETS, "fake", asset)
  calls = []

  def command(a, dest):
    calls.append(a.name)
    return [sys.executable, "-c", f"import shutil; shutil.copy({str(archive)!r}, {str(dest)!r})"]

  monkeypatch.setattr(fetch, "_download_command", command)
  return asset, archive, calls


def test_fetch_unpacks_verifies_and_caches(fake_asset):
  asset, _, calls = fake_asset
  d = fetch.fetch("fake")
  assert (d / "pkg-1.0" / "file.txt").read_text() == "hello\n"
  assert fetch.fetch("fake") == d and calls == ["fake"]  # second call: cache hit, no download


def test_checksum_mismatch_is_refused(fake_asset, monkeypatch):
  asset, _, _ = fake_asset
  monkeypatch.setitem(fetch.ASSETS, "fake", fetch.dataclasses.replace(asset, sha256="0" * 64))
  with pytest.raises(fetch.AssetError, match="sha256.*refusing"):
    fetch.fetch("fake")
  assert not (fetch.data_dir() / "fake").exists()


def test_offline_error_names_asset_and_command(fake_asset, monkeypatch):
  monkeypatch.setattr(fetch, "_download_command", lambda a, d: [
      sys.executable, "-c", "import sys; print('ERROR: network unreachable', file=sys.stderr); sys.exit(1)"])
  with pytest.raises(fetch.AssetError) as e:
    fetch.fetch("fake")
  msg = str(e.value)
  assert "\n" not in msg and "'fake'" in msg and "python -m zojax.data.fetch fake" in msg
  assert "network unreachable" in msg and "downloads" in msg


def test_archive_placed_by_hand_is_used_offline(fake_asset, monkeypatch):
  _, archive, calls = fake_asset
  downloads = fetch.data_dir() / "downloads"
  downloads.mkdir(parents=True)
  (downloads / archive.name).write_bytes(archive.read_bytes())
  monkeypatch.setattr(fetch, "_download_command", lambda a, d: ["false"])
  assert (fetch.fetch("fake") / "pkg-1.0" / "file.txt").exists()


def test_unknown_asset_and_cli_exit_code(capsys):
  with pytest.raises(fetch.AssetError, match="unknown asset 'nope'"):
    fetch.fetch("nope")
  assert fetch.main(["nope"]) == 1
  assert capsys.readouterr().err.startswith("error: unknown asset")


def test_every_asset_has_a_notice():
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[2]
  for asset in fetch.ASSETS.values():
    assert (root / asset.licence).is_file(), asset.licence


def test_deb_falls_back_to_the_debian_pool_over_http(fake_asset, monkeypatch, tmp_path):
  asset, archive, _ = fake_asset
  monkeypatch.setitem(fetch.ASSETS, "fake", fetch.dataclasses.replace(
      asset, pool_path=f"pool/{archive.name}"))
  (tmp_path / "pool").mkdir()
  (tmp_path / "pool" / archive.name).write_bytes(archive.read_bytes())
  monkeypatch.setenv("ZOJAX_DEBIAN_MIRROR", tmp_path.as_uri())  # file:// mirror
  monkeypatch.setattr(fetch, "_download_command", lambda a, d: ["no-such-apt-get"])
  assert (fetch.fetch("fake") / "pkg-1.0" / "file.txt").exists()


def test_both_deb_routes_failing_reports_both(fake_asset, monkeypatch, tmp_path):
  asset, archive, _ = fake_asset
  monkeypatch.setitem(fetch.ASSETS, "fake", fetch.dataclasses.replace(asset, pool_path="pool/x.deb"))
  monkeypatch.setenv("ZOJAX_DEBIAN_MIRROR", tmp_path.as_uri())
  monkeypatch.setattr(fetch, "_download_command", lambda a, d: ["no-such-apt-get"])
  with pytest.raises(fetch.AssetError, match="no-such-apt-get.*not available.*GET file:"):
    fetch.fetch("fake")

"""`make data`: download and unpack, tested on a local archive shaped like the course's."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest

from meli.dataset import load_labelled
from meli.errors import InputError, MeliError
from meli.train.download import fetch_course_data, main


def course_archive(path):
    rows = [{"language": "spanish", "label_quality": "reliable", "title": f"Taladro {i}", "category": "DRILLS"} for i in range(3)]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    with tarfile.open(path, "w:bz2") as tar:
        for name in ("meli-challenge-2019/spanish.train.jsonl.gz", "meli-challenge-2019/spanish_token_to_index.json.gz"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_downloads_unpacks_and_loads(tmp_path):
    archive = course_archive(tmp_path / "meli-challenge-2019.tar.bz2")
    dest = tmp_path / "data"
    files = fetch_course_data(dest, url=archive.as_uri(), quiet=True)
    train = dest / "meli-challenge-2019" / "spanish.train.jsonl.gz"
    assert train in files and (dest / "meli-challenge-2019.tar.bz2").is_file()
    assert load_labelled(train).titles.to_pylist() == ["Taladro 0", "Taladro 1", "Taladro 2"]
    # a second run reuses the download
    assert fetch_course_data(dest, url=archive.as_uri(), quiet=True) == files


def test_bad_archive_and_unreachable_url(tmp_path):
    bad = tmp_path / "x.tar.bz2"
    bad.write_bytes(b"not a tar")
    with pytest.raises(InputError, match="not a readable tar archive"):
        fetch_course_data(tmp_path / "d", url=bad.as_uri(), quiet=True)
    with pytest.raises(MeliError, match="cannot download"):
        fetch_course_data(tmp_path / "d2", url=(tmp_path / "missing.tar.bz2").as_uri(), quiet=True)
    assert not list((tmp_path / "d2").glob("*"))  # no partial download left
    assert main(["--dest", str(tmp_path / "d3"), "--url", (tmp_path / "missing.tar.bz2").as_uri(), "--quiet"]) == 1

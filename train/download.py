"""`make data`: fetch the course's MeLi 2019 dataset (and optionally SBW word vectors).

The archive holds ``{spanish,portuguese}.{train,validation,test}.jsonl.gz`` and
``*_token_to_index.json.gz``; it is unpacked into ``data/meli-challenge-2019/``. Train on it
with ``make train DATA=...`` after linking or renaming the split you want to ``train.jsonl.gz``
/ ``validation.jsonl.gz``, or with ``meli-train --train ... --validation ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tarfile
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from meli.errors import InputError, MeliError
from meli.formats import AtomicWriter

log = logging.getLogger(__name__)

COURSE_DATA_URL = "https://cs.famaf.unc.edu.ar/~ccardellino/resources/diplodatos/meli-challenge-2019.tar.bz2"
SBW_URL = "https://cs.famaf.unc.edu.ar/~ccardellino/SBWCE/SBW-vectors-300-min5.txt.bz2"


def download(url: str, dest: Path, quiet: bool = False) -> Path:
    """Fetch `url` into `dest` atomically (a partial download never takes its place)."""
    if dest.is_file():
        log.info("%s already there", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, AtomicWriter(dest) as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(out.path, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=True if quiet else None) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            out.commit()
    except OSError as e:  # URLError is an OSError
        raise MeliError(f"cannot download {url}: {e}") from e
    return dest


def unpack(archive: Path, dest: Path) -> list[Path]:
    """Extract a .tar(.bz2/.gz) archive into `dest`; refuses members that escape it."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
            names = [m.name for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{archive}: not a readable tar archive ({e})") from e
    return [dest / n for n in names]


def fetch_course_data(dest: Path, url: str = COURSE_DATA_URL, sbw: bool = False, sbw_url: str = SBW_URL, quiet: bool = False) -> list[Path]:
    archive = download(url, dest / Path(url).name, quiet)
    files = unpack(archive, dest)
    if sbw:
        files.append(download(sbw_url, dest / Path(sbw_url).name, quiet))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path("data"))
    parser.add_argument("--url", default=COURSE_DATA_URL)
    parser.add_argument("--sbw", action="store_true", help="also fetch the SBW word vectors (~1 GB)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr)
    try:
        files = fetch_course_data(args.dest, args.url, args.sbw, quiet=args.quiet)
    except MeliError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())


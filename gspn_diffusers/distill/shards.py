"""img2dataset's ``webdataset`` output: ``.tar`` shards holding ``KEY.jpg`` + ``KEY.txt`` (+ ``KEY.json``).

Each shard is indexed in one pass over its headers (images located by offset, captions read). A shard
damaged by a cut-off copy or a disk error is read up to the damage, and what is lost is reported
(``Records.lost``) in the trainer's summary of skipped data, instead of the rest of it vanishing
silently (``tarfile`` ends its iteration without an error at a truncated header).
"""

from __future__ import annotations

import glob
import json
import logging
import tarfile
from pathlib import Path

from tqdm.auto import tqdm

from .records import (
    IMAGE_EXTENSIONS,
    DatasetLayoutError,
    ImageRecord,
    Records,
    TarMember,
    decode_text,
    has_caption,
    warn_missing_captions,
)

logger = logging.getLogger(__name__)


def _caption_from_json(data: bytes, caption_column: str) -> str | None:
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    for key in (caption_column, "caption", "text"):
        if isinstance(document.get(key), str):
            return document[key]
    return None


def _shard_damage(tar: tarfile.TarFile, shard: Path, size: int) -> str | None:
    """Why the archive stopped early, or None when it ends with tar's end-of-archive blocks.

    ``tarfile`` ends its iteration silently at a truncated or garbled header; a shard cut off at any byte
    is told apart from a whole one by the two zero blocks every tar writer puts at the end.
    """
    with open(shard, "rb") as f:
        f.seek(tar.offset)
        tail = f.read(2 * tarfile.BLOCKSIZE)
    if len(tail) == 2 * tarfile.BLOCKSIZE and not tail.strip(b"\0"):
        return None
    return f"no tar end-of-archive marker at byte {tar.offset} of {size}"


def _expected_samples(shard: Path) -> int | None:
    """img2dataset writes ``<shard>_stats.json`` beside each shard, with the number of samples it holds."""
    try:
        return int(json.loads(shard.with_name(f"{shard.stem}_stats.json").read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _index_tar_shard(shard: Path, caption_column: str) -> tuple[list[ImageRecord], str | None]:
    """One pass over the shard headers: image members are located, caption members are read.

    A damaged shard is read up to the damage; the second value then says where and how many samples are lost.
    """
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, str] = {}
    json_captions: dict[str, str] = {}
    size = shard.stat().st_size
    damage = None
    with tarfile.open(shard, "r:") as tar:
        try:
            for member in tar:
                if member.offset_data + member.size > size:
                    damage = f"{member.name} is cut off at byte {size}"
                    break
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not dot:
                    continue
                key, extension = f"{directory}/{stem}", "." + extension.lower()
                if extension in IMAGE_EXTENSIONS:
                    images[key] = member
                elif extension == ".txt":
                    text = decode_text(tar.extractfile(member).read(), f"{shard}:{member.name}")
                    captions[key] = text.strip()
                elif extension == ".json":
                    caption = _caption_from_json(tar.extractfile(member).read(), caption_column)
                    if caption is not None:
                        json_captions[key] = caption
        except (tarfile.TarError, EOFError) as error:
            damage = f"{error} after byte {tar.offset}"
        else:
            damage = damage or _shard_damage(tar, shard, size)
    records = []
    for key, member in images.items():
        caption = captions.get(key, json_captions.get(key))
        if not has_caption(caption):
            continue
        source = TarMember(shard, member.offset_data, member.size)
        records.append(ImageRecord(caption, f"{shard}:{member.name}", source))
    if damage is None:
        warn_missing_captions(len(images) - len(records), len(images), str(shard))
        return records, None
    expected = _expected_samples(shard)
    lost = f"{expected - len(records)} lost" if expected is not None else "the samples after it lost"
    return records, f"{shard.name}: damaged ({damage}); {len(records)} samples read before the damage, {lost}"


def _tar_shards(location: str) -> list[Path]:
    path = Path(location)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(location) if p.endswith(".tar"))


def webdataset_records(location: str, caption_column: str = "text") -> Records:
    """The samples of every shard; a damaged shard is read up to the damage and reported (``Records.lost``)."""
    shards = _tar_shards(location)
    records = Records([])
    for shard in tqdm(shards, desc="Indexing shards", disable=len(shards) < 8):
        try:
            found, damage = _index_tar_shard(shard, caption_column)
        except tarfile.TarError as error:  # not even the first header reads
            found, damage = [], f"{shard.name}: unreadable ({error}); all its samples lost"
        records.extend(found)
        if damage is not None:
            logger.warning("Damaged shard %s", damage)
            records.lost.append(damage)
    if not records:
        raise DatasetLayoutError(
            f"No image with a caption (.txt, or .json with a '{caption_column}'/'caption' key) found in the "
            f"{len(shards)} .tar shard(s) at {location!r}."
        )
    return records

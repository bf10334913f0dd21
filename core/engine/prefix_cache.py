"""Content hashes of full KV-cache blocks, so that requests sharing a prefix share its blocks.

A block's hash covers its token ids, the hash of the block before it (so equal blocks after
different prefixes differ) and the content keys of images whose placeholders start in it (the
placeholder ids are the same for every image). Hashes are blake2b digests, not Python's
``hash``: a collision would silently give one request another's context.
"""

from __future__ import annotations

import hashlib
from array import array

from vlm.engine.sequence import Sequence


def block_hash(parent: bytes, token_ids: list[int], extra: tuple[str, ...] = ()) -> bytes:
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    for key in extra:
        digest.update(b"\0image:" + key.encode())
    return digest.digest()


def image_starts(seq: Sequence) -> list[tuple[int, str]]:
    """(first placeholder position, image content key) of each image of the sequence."""
    if not seq.inputs.images or seq.placeholder_positions is None:
        return []
    starts, offset = [], 0
    for image in seq.inputs.images:
        starts.append((int(seq.placeholder_positions[offset]), image.key))
        offset += image.num_tokens
    return starts


def hashes_for(seq: Sequence, block_size: int, num_blocks: int, known: list[bytes]) -> list[bytes]:
    """Hashes of the sequence's first ``num_blocks`` full blocks, extending the ``known`` ones."""
    hashes = list(known)
    images = image_starts(seq)
    parent = hashes[-1] if hashes else b""
    for index in range(len(hashes), num_blocks):
        start, end = index * block_size, (index + 1) * block_size
        extra = tuple(key for position, key in images if start <= position < end)
        parent = block_hash(parent, seq.token_ids(start, end), extra)
        hashes.append(parent)
    return hashes

from __future__ import annotations

import uuid

from meshkit._core.ids import new_id


def test_ids_are_version_7_uuids_that_sort_by_creation() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    stamps = [u.int >> 80 for u in parsed]  # the 48-bit millisecond prefix never goes back
    assert stamps == sorted(stamps)

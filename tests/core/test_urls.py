"""The Redis URL check shared by the Redis broker and the Redis registry."""

from __future__ import annotations

import pytest

from meshkit._core.urls import redis_url
from meshkit.errors import ConfigurationError


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("http://h:6379/0", "not a Redis URL"),
        ("redis://:s3cret@h:port/0", "bad port in Redis broker URL"),
        ("redis://:s3cret@h:6379/orders", "bad database 'orders'"),
    ],
)
def test_bad_redis_urls_are_named_without_their_password(url: str, named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        redis_url(url, "Redis broker")
    assert named in str(info.value)
    assert "s3cret" not in str(info.value) and "s3cret" not in (info.value.hint or "")


def test_a_good_redis_url_gives_its_parts() -> None:
    parts = redis_url("rediss://u:p@cache.internal:6380/2", "Redis registry")
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("rediss", "cache.internal", 6380, "/2")

"""LocalDirectory keeps the directory contract in-process; build_directory picks the backend."""

from __future__ import annotations

import dataclasses

from relay.config import Config, DirectoryConfig
from relay.directory import (
    LocalDirectory,
    Owner,
    RedisDirectory,
    build_directory,
)
from relay.errors import CloseCode, DirectoryUnavailable, RelayError


def local() -> LocalDirectory:
    return LocalDirectory(
        DirectoryConfig(instance_id="solo", advertise_url="http://127.0.0.1:8080")
    )


async def test_register_then_lookup_returns_self() -> None:
    directory = local()
    await directory.start()

    epoch = await directory.register("org:m1")

    assert await directory.lookup("org:m1") == Owner("solo", "http://127.0.0.1:8080", epoch)
    assert await directory.lookup("org:other") is None
    assert directory.healthy


async def test_unregister_compares_epochs() -> None:
    directory = local()
    old = await directory.register("org:m1")
    new = await directory.register("org:m1")

    assert await directory.unregister("org:m1", old) is False
    assert (await directory.lookup("org:m1")) == Owner("solo", "http://127.0.0.1:8080", new)
    assert await directory.unregister("org:m1", new) is True
    assert await directory.lookup("org:m1") is None


async def test_revocations_are_delivered_locally_once_and_survive_a_bad_callback() -> None:
    directory = local()
    seen: list[tuple[str | None, str | None]] = []

    def broken(sub: str | None, host: str | None) -> None:
        raise RuntimeError("boom")

    directory.on_revocation(broken)
    directory.on_revocation(lambda sub, host: seen.append((sub, host)))

    await directory.publish_revocation("user-1", None)

    assert seen == [("user-1", None)]


async def test_describe_reports_backend_and_count() -> None:
    directory = local()
    await directory.register("org:m1")

    status = directory.describe()

    assert status == {
        "backend": "local", "instance_id": "solo", "advertise_url": "http://127.0.0.1:8080",
        "healthy": True, "registrations": 1,
    }
    await directory.close()
    assert directory.describe()["registrations"] == 0


def test_build_directory_picks_the_configured_backend() -> None:
    config = Config(directory=DirectoryConfig(instance_id="a", advertise_url="http://a:1"))
    assert isinstance(build_directory(config), LocalDirectory)

    redis_config = dataclasses.replace(
        config,
        directory=dataclasses.replace(
            config.directory, backend="redis", redis_url="redis://127.0.0.1:1/0"
        ),
    )
    directory = build_directory(redis_config)
    assert isinstance(directory, RedisDirectory)
    assert not directory.healthy  # not started


def test_directory_unavailable_asks_agents_to_retry() -> None:
    error = DirectoryUnavailable()

    assert isinstance(error, RelayError)
    assert error.status == 503
    assert error.close_code == CloseCode.TRY_AGAIN_LATER
    assert error.retry_after_s is not None and error.retry_after_s > 0
    assert error.to_json()["error"]["message"] == "relay directory unavailable; retry shortly"

"""relay: a WebSocket relay/tunnel proxy between clients and the host services behind agents."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("relay")
except PackageNotFoundError:  # pragma: no cover - run from a checkout that was never installed
    __version__ = "0+unknown"

"""The tunnel protocol's defaults, defined once: what a HELLO without a field means, and what
the relay's config, the session and the agent start from."""

from __future__ import annotations

VERSION = 1  # what a /tunnel request without `v` (and a HELLO without `version`) speaks
WINDOW = 262144  # initial credit per stream and direction, bytes
MAX_FRAME = 65536  # largest DATA payload
MAX_STREAMS = 256  # concurrent streams the relay opens on one tunnel
PING_INTERVAL_S = 10.0
KEEPALIVE_MISSES = 3
MAX_WS_MESSAGE = 4 << 20  # largest WebSocket message on a channel
OPEN_TIMEOUT_S = 10.0  # how long the relay waits for a ws HEAD
REQUEST_TIMEOUT_S = 120.0  # how long the relay waits for progress on an http exchange

"""Identity and access: bearer tokens to identities, host ids, and access decisions.

Pure-ish: keys, HTTP sessions, metrics and clocks are passed in; no aiohttp server code here.
Imports flow hostid/ttlcache -> keys -> devissuer -> tokens -> access. The package itself
imports none of them, so a command that needs one (``relay token``: the dev issuer) loads
neither the HTTP client nor the verifier.
"""

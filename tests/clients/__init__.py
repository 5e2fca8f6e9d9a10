"""Scripts that drive third-party ComfyUI clients from PyPI against the broker; each runs in
its own process (tests/proxy/test_clients.py), as a user would run it."""

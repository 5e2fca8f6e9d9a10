from tests.proxy.conftest import live, settings

__all__ = ["live", "settings"]

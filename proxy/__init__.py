"""oauth-sidecar: a local reverse proxy that holds one OAuth credential and injects a fresh token."""

__version__ = "0.1.0"

from .app import make_app
from .cli import main
from .config import Config, load_config

__all__ = ["Config", "__version__", "load_config", "main", "make_app"]

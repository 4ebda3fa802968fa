"""An OpenAI- and FauxPilot-compatible completion server over the continuous-batching scheduler, with a
playground page at ``/``. ``codegen-lm serve`` runs it; ``create_app`` builds it around any scheduler."""

from .app import ServerConfig, create_app, load_api_keys, serve
from .protocol import Limits

__all__ = ["Limits", "ServerConfig", "create_app", "load_api_keys", "serve"]

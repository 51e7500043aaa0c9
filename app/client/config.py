"""Where the client finds its server and API key: arguments, then ``LOWBIT_SERVER`` / ``LOWBIT_API_KEY``, then a
TOML file (``LOWBIT_CLIENT_CONFIG``, else ``$XDG_CONFIG_HOME/lowbit/client.toml``, else
``~/.config/lowbit/client.toml``) with ``server = "..."`` and ``api_key = "..."``.

These are the client's own variables: the server's settings (``app.settings``) never read them.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from app.client.errors import LowbitClientError

DEFAULT_SERVER = "http://127.0.0.1:8000"
ENV_SERVER = "LOWBIT_SERVER"
ENV_API_KEY = "LOWBIT_API_KEY"
ENV_CONFIG = "LOWBIT_CLIENT_CONFIG"


@dataclass(frozen=True)
class ClientConfig:
    server: str
    api_key: str | None


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "lowbit" / "client.toml"


def read_config_file(path: Path, required: bool) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise LowbitClientError(f"the client config file {path} ({ENV_CONFIG}) does not exist",
                                    code="client_config_missing") from None
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise LowbitClientError(f"cannot read the client config file {path}: {exc}",
                                code="invalid_client_config") from exc
    out: dict[str, str] = {}
    for key in ("server", "api_key"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise LowbitClientError(f"{path}: '{key}' must be a string", code="invalid_client_config")
        if value:
            out[key] = value
    return out


def normalize_server(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise LowbitClientError(f"the server URL '{url}' must start with http:// or https://",
                                code="invalid_server_url")
    return url


def resolve(server: str | None = None, api_key: str | None = None,
            env: Mapping[str, str] | None = None) -> ClientConfig:
    """Arguments win over the environment, which wins over the config file; the server defaults to
    http://127.0.0.1:8000 (what `lowbit serve` listens on)."""
    env = os.environ if env is None else env
    file: dict[str, str] = {}
    if not (server or env.get(ENV_SERVER)) or not (api_key or env.get(ENV_API_KEY)):
        file = read_config_file(config_path(env), required=bool(env.get(ENV_CONFIG)))
    chosen_server = server or env.get(ENV_SERVER) or file.get("server") or DEFAULT_SERVER
    chosen_key = api_key or env.get(ENV_API_KEY) or file.get("api_key") or None
    return ClientConfig(normalize_server(chosen_server), chosen_key)

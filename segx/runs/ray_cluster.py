"""The Ray a sweep runs on: one it starts for itself, or a running cluster it joins (`ray.init.address`: "auto",
"HOST:PORT", or $RAY_ADDRESS). Joining drops the settings only a new Ray takes, brings the node's Ray token along,
and refuses an address that does not answer or a token the cluster rejects in one paragraph, before Ray retries."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segx.core.errors import ConfigError, first_line

log = logging.getLogger(__name__)

#: ray.init arguments that only size a Ray this sweep starts; Ray refuses most of them when it joins a cluster.
STARTED_ONLY = ("num_cpus", "num_gpus", "object_store_memory", "include_dashboard", "dashboard_host",
                "dashboard_port", "resources", "labels", "_system_config", "_memory", "_plasma_directory", "_node_name",
                "_enable_object_reconstruction")
#: Seconds to wait for a cluster's port to accept a connection before calling it unreachable.
CONNECT_TIMEOUT_S = 10.0
AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def cluster_address(init: dict[str, Any], prefix: str = "hydra.launcher") -> str | None:
    """HOST:PORT of the running cluster this sweep would join, or None where it starts a Ray of its own: Ray's own
    rule (`local`: always its own; null: $RAY_ADDRESS, else the last cluster started here with `ray start`)."""
    from ray._private import services

    address = init.get("address")
    try:
        return services.canonicalize_bootstrap_address(address, init.get("_temp_dir"))
    except (ConnectionError, ValueError) as error:  # "auto" with no cluster here, an address that does not parse
        raise ConfigError(
            f"{prefix}.ray.init.address={address} names no Ray cluster this sweep can join: {first_line(error)}. "
            "Give the head node's HOST:PORT (the address `ray start --head` printed), start the cluster first, "
            "or leave the address null (or local) to run the sweep on a Ray of its own.") from None


def _token_source() -> str | None:
    """Where Ray would read a token from on this machine, or None."""
    for name in TOKEN_VARIABLES:
        if os.environ.get(name):
            return f"${name}"
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def _use_token_if_available() -> str | None:
    """Token mode for this process where RAY_AUTH_MODE is unset and a token is at hand, as Ray itself does for a
    cluster it finds on its own (and not for an explicit address): a cluster without authentication accepts it too."""
    if os.environ.get(AUTH_MODE) is not None:
        return None
    source = _token_source()
    if source is None:
        return None
    os.environ[AUTH_MODE] = "token"
    from ray._raylet import Config

    Config.initialize("")  # Ray caches its settings at import: read RAY_AUTH_MODE again
    return source


def _check_reachable(address: str, option: str) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            return
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"Cannot join the Ray cluster at {address} ({option}): nothing answers there ({error}). Start the head "
            "node first (`ray start --head --port=6379`), check the address and that the port is open from this "
            "machine, or run the sweep on a Ray of its own with "
            f"{option.split('=')[0]}=local. Nothing was started.") from None


def _auth_advice(address: str) -> str:
    mode, source = os.environ.get(AUTH_MODE), _token_source()
    if mode is not None and mode.lower() != "token":
        here = f"RAY_AUTH_MODE={mode} is set here; export RAY_AUTH_MODE=token"
    elif source is None:
        here = ("no token was found here (not in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); put "
                "the head's token in ~/.ray/auth_token (or export RAY_AUTH_TOKEN=<token>) and export "
                "RAY_AUTH_MODE=token")
    else:
        here = (f"the token read from {source} is not the cluster's; replace it with the head's token (on the head, "
                "`ray get-auth-token` prints it; it is ~/.ray/auth_token there)")
    return (f"The Ray cluster at {address} refused this sweep's authentication token: {here}. Every node and every "
            "driver of a cluster that uses token authentication needs the same token. Run the same command again "
            "once it is in place. Nothing was started.")


def _check_token(address: str) -> None:
    """One request to the cluster's GCS: a rejected token fails here at once, where ray.init would retry for a
    while and print a line a second."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RayError

    try:
        GcsClient(address=address)
    except AuthenticationError:
        raise ConfigError(_auth_advice(address)) from None
    except RayError as error:  # a port that answers but is no Ray GCS
        raise ConfigError(f"Cannot join the Ray cluster at {address}: {first_line(error)}. Check that the address "
                          "is the head node's (the one `ray start --head` printed). Nothing was started.") from None


def start_or_join(init: dict[str, Any], prefix: str, say: Callable[[str], None] = log.info) -> str | None:
    """ray.init for a sweep: join the running cluster `init` names (returns its HOST:PORT), or start a Ray of its
    own (returns None) with every setting of `init`. `prefix` is where the options live, for the messages."""
    import ray

    if ray.is_initialized():  # a caller's own Ray (a test, a notebook): used as it is
        return None
    address = cluster_address(init, prefix)
    if address is None:
        ray.init(**{k: v for k, v in init.items() if v is not None or k == "address"})
        return None
    option = f"{prefix}.ray.init.address={init.get('address') or '$RAY_ADDRESS'}"
    ignored = [k for k in STARTED_ONLY if init.get(k) is not None]
    if ignored:
        say(f"Joining the Ray cluster at {address}: it keeps the resources it was started with, so "
            f"{', '.join(f'{prefix}.ray.init.{k}' for k in ignored)} {'is' if len(ignored) == 1 else 'are'} not "
            "applied")
    source = _use_token_if_available()
    if source is not None:
        say(f"Using the Ray authentication token from {source} (RAY_AUTH_MODE=token)")
    _check_reachable(address, option)
    _check_token(address)
    try:
        ray.init(address=address, **{k: v for k, v in init.items() if k not in (*STARTED_ONLY, "address")
                                      and v is not None})
    except (ConnectionError, RuntimeError, ValueError) as error:  # e.g. another Ray or Python version there
        ray.shutdown()
        raise ConfigError(f"Cannot join the Ray cluster at {address} ({option}): {first_line(error)}. Every node "
                          "and this machine need the same Ray and Python versions. Nothing was started.") from None
    return address

"""Pretrained weights from the Hugging Face Hub, without the hub's retries when there is no network.

A pretrained tag names one file on the hub (`HubWeights`, from the library's own pretrained config). When that file is
already in the local Hugging Face cache, the library loads it with the hub switched off: no network at all. Otherwise
a short connection probe (a few seconds at most, through the proxy when one is set) runs before the library's own
download, so that without a network `tune` fails at once with one sentence that names the file and both ways out,
instead of printing the hub's retries for most of a minute.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from promptune.errors import BackboneError

PROBE_TIMEOUT_S = 3.0  # a hub that answers at all answers well within this


@dataclass(frozen=True)
class HubWeights:
    """Where a tag's weights come from: a file of a hub repo (tried in the library's order), or a plain URL."""

    label: str  # what the user asked for, e.g. "ViT-B-16 / openai"
    repo_id: str | None  # e.g. "timm/vit_base_patch16_clip_224.openai" (None: a plain URL)
    filenames: tuple[str, ...] = ()  # e.g. ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    revision: str | None = None
    url: str = ""  # the download when there is no hub repo
    url_cache: str = ""  # where the library keeps a URL download

    @property
    def source(self) -> str:
        """The file the hub would serve, e.g. "open_clip_model.safetensors of timm/vit_base_patch16_clip_224.openai"."""
        if self.repo_id is None:
            return self.url.rsplit("/", 1)[-1]
        return f"{self.filenames[0]} of {self.repo_id}" if self.filenames else self.repo_id

    def cached_file(self) -> str | None:
        """The file in the local cache that the library would load, or None (then it needs the network)."""
        if self.repo_id is None:
            return self.url_cache if self.url_cache and os.path.isfile(self.url_cache) else None
        from huggingface_hub import try_to_load_from_cache

        for filename in self.filenames:
            found = try_to_load_from_cache(self.repo_id, filename, revision=self.revision)
            if isinstance(found, str):
                return found
        return None


@contextlib.contextmanager
def hub_access(weights: HubWeights) -> Iterator[None]:
    """Run the library's loading of `weights` inside this block: from the cache with the hub switched off when the file
    is there, else only after the probe found the hub reachable (a `BackboneError` sentence when it is not)."""
    if weights.cached_file() is not None:
        with _hub_offline():
            yield
        return
    problem = unreachable_reason(weights)
    if problem is not None:
        raise BackboneError(
            f"The {weights.label} weights ({weights.source}) are not in the local Hugging Face cache and {problem}; "
            f"pass a downloaded copy with --weights FILE, or run once with internet so that the cache fills."
        )
    yield


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode (HF_HUB_OFFLINE=1) for this block: cached files only, no request at all."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def unreachable_reason(weights: HubWeights) -> str | None:
    """Why the weights cannot be downloaded now ("HF_HUB_OFFLINE is set", "huggingface.co cannot be resolved"), or None
    when the server (or the proxy in front of it) accepts a connection within `PROBE_TIMEOUT_S`."""
    from huggingface_hub import constants

    if weights.repo_id is not None and constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    address = urlsplit(constants.ENDPOINT if weights.repo_id is not None else weights.url)
    host = address.hostname or ""
    port = address.port or (443 if address.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(address.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        through = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        problem = _probe(through.hostname or "", through.port or 80)
        return None if problem is None else f"its proxy {through.hostname} {problem}"
    problem = _probe(host, port)
    return None if problem is None else f"{host} {problem}"


def _probe(host: str, port: int) -> str | None:
    """None when `host:port` accepts a TCP connection within the timeout, else what went wrong, e.g. "cannot be
    resolved". Name resolution has no timeout of its own, so the probe runs in a thread that is not waited for longer."""
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except socket.gaierror:
            outcome.append("cannot be resolved (no network?)")
        except socket.timeout:
            outcome.append(f"did not answer within {PROBE_TIMEOUT_S:g} s")
        except OSError as error:
            outcome.append(f"cannot be reached ({error.strerror or type(error).__name__})")

    thread = threading.Thread(target=connect, name="promptune-hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return outcome[0] if outcome else f"did not answer within {PROBE_TIMEOUT_S:g} s"

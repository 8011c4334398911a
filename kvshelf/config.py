"""The one typed configuration boundary.

Settings come from, lowest precedence first: defaults, a YAML file named by
``KVSHELF_CONFIG_FILE``, ``KVSHELF_*`` environment variables, and a dict (vLLM's
``kv_connector_extra_config``). LMCache's key names are accepted as aliases so an
LMCache user can switch by changing only the connector name. An unknown key or a bad
value raises :class:`ConfigError` naming the key and the nearest valid one.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

ENV_PREFIX = "KVSHELF_"
CONFIG_FILE_ENV = "KVSHELF_CONFIG_FILE"
GB = 1_000_000_000
GIB = 2**30


class ConfigError(ValueError):
    """A bad configuration key or value; the message says how to fix it."""


class KVShelfConfig(BaseModel):
    """Every kvshelf setting. Frozen: build it once, pass it around."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_size: int = Field(256, gt=0, description="tokens per cache entry")
    cpu_bytes: ByteSize = Field(
        ByteSize(5 * GB), ge=0, description="memory tier budget; 0 disables it"
    )
    disk_path: Path | None = Field(None, description="disk tier directory; unset disables it")
    disk_bytes: ByteSize = Field(ByteSize(50 * GB), gt=0, description="disk tier budget")
    disk_fsync: bool = Field(
        True,
        description="fsync each entry before publishing it and drop it from the page cache: "
        "writes go at the disk's pace instead of filling the page cache in bursts that slow "
        "the whole host; off: buffered writes",
    )
    remote_url: str | None = Field(
        None, description="redis://, rediss://, unix:// or redis+cluster:// URL"
    )
    remote_password: SecretStr | None = Field(None, description="overrides the URL's password")
    remote_password_env: str | None = Field(
        None, description="name of an env var holding the remote password"
    )
    remote_ca_certs: Path | None = None
    remote_certfile: Path | None = None
    remote_keyfile: Path | None = None
    remote_timeout_s: float = Field(
        0.5, gt=0, description="connect, each reply wait, and each part's send"
    )
    remote_ttl_s: int | None = Field(None, gt=0, description="expire remote entries")
    remote_part_bytes: ByteSize = Field(
        ByteSize(8 * 2**20),
        ge=2**16,
        le=512 * 2**20,
        description="split remote values into parts of this size",
    )
    remote_connections: int = Field(
        4, ge=1, le=64, description="connections one remote load or save uses at once"
    )
    save_queue_bytes: ByteSize | None = Field(
        None,
        gt=0,
        description="bytes of saves waiting for disk/remote outside the memory tier (saves "
        "in memory wait there, bounded by cpu_bytes); more are dropped. Default: cpu_bytes, "
        "or 2 GB without a memory tier",
    )
    flush_on_stop_s: float = Field(
        10.0, ge=0, description="on shutdown, wait this long for queued disk/remote writes"
    )
    kv_storage_dtype: Literal["auto", "fp8_e4m3"] = Field(
        "auto",
        description="how entries hold the KV: auto = as vLLM's cache holds it (lossless); "
        "fp8_e4m3 = float8 with a scale per token and head (half of bf16's bytes, lossy)",
    )
    save_threads: int = Field(2, ge=1, le=32)
    prefetch: bool = Field(
        True,
        description="read disk/remote hits into memory (and verify them) before "
        "reporting the hit to the scheduler; off: report existence, read at load time",
    )
    lookup_timeout_s: float = Field(2.0, gt=0, description="scheduler->worker lookup RPC")
    lookup_wait_s: float = Field(
        0.2,
        ge=0,
        description="how long a lookup waits for disk/remote reads before answering "
        "'ask again' (vLLM then retries the request next step)",
    )
    hold_timeout_s: float = Field(120.0, gt=0, description="release prefetched hits after this")
    log_requests: bool = Field(True, description="one INFO line per request with hit tokens")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("disk_path", mode="before")
    @classmethod
    def _strip_file_scheme(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("file://"):
            return value[len("file://") :]
        return value

    def __repr__(self) -> str:  # SecretStr already masks; keep the URL's password out too
        fields = ", ".join(f"{k}={v!r}" for k, v in self._public_items())
        return f"KVShelfConfig({fields})"

    __str__ = __repr__

    def __repr_args__(self):  # what rich and other pretty-printers show
        return list(self._public_items())

    def _public_items(self):
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "remote_url" and value:
                value = redact_url(value)
            yield name, value

    def save_queue_limit(self) -> int:
        """``save_queue_bytes``, or its default."""
        if self.save_queue_bytes is not None:
            return int(self.save_queue_bytes)
        return int(self.cpu_bytes) or 2 * GB

    def password(self) -> str | None:
        """The remote password: explicit setting, then the named env var, then none."""
        if self.remote_password is not None:
            return self.remote_password.get_secret_value()
        if self.remote_password_env:
            return os.environ.get(self.remote_password_env)
        return None


def redact_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}"


FIELDS = tuple(KVShelfConfig.model_fields)
_SECRET_FIELDS = ("remote_password", "remote_url")  # values kept out of error messages


def _gib(value: Any) -> int:
    # LMCache reads its "GB" sizes as GiB (value * 1024**3); so do we, for the same budget.
    return int(float(value) * GIB)


def _local_cpu(value: Any) -> int | None:
    # LMCache's local_cpu=False turns the memory tier off; True keeps the budget.
    return None if _truthy(value) else 0


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


# LMCache key -> (our key, converter). A converter returning None means "no change";
# a target of None means the key is accepted and has nothing to set.
ALIASES: dict[str, tuple[str | None, Any]] = {
    "max_local_cpu_size": ("cpu_bytes", _gib),
    "max_local_disk_size": ("disk_bytes", _gib),
    "local_disk": ("disk_path", lambda v: v or None),
    "local_cpu": ("cpu_bytes", _local_cpu),
    "save_unfull_chunk": (None, None),  # kvshelf always saves partial chunks at cut points
}


def _nearest(key: str) -> str:
    names = list(FIELDS) + list(ALIASES)
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.0)
    return match[0] if match else FIELDS[0]


def _normalise(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Map aliases onto our keys; reject unknown keys with the nearest valid one."""
    out: dict[str, Any] = {}
    aliases: dict[str, Any] = {}
    for key, value in raw.items():
        if key in FIELDS:
            out[key] = value
        elif key in ALIASES:
            aliases[key] = value
        else:
            raise ConfigError(
                f"unknown kvshelf setting {key!r} in {source}; did you mean {_nearest(key)!r}?"
            )
    explicit = set(out)
    # local_cpu goes last so local_cpu=False wins over a max_local_cpu_size beside it;
    # an explicit kvshelf key always beats its LMCache alias.
    for key in sorted(aliases, key=lambda k: k == "local_cpu"):
        target, convert = ALIASES[key]
        if target is None or target in explicit:
            continue
        try:
            converted = convert(aliases[key])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad value {aliases[key]!r} for {key!r} in {source}: {exc}") from exc
        if converted is not None:
            out[target] = converted
    return out


def _from_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {CONFIG_FILE_ENV}={path}: {exc}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    return _normalise(data, path)


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    raw = {
        name[len(ENV_PREFIX) :].lower(): value
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX) and name != CONFIG_FILE_ENV
    }
    return _normalise(raw, "environment (KVSHELF_*)")


def load_config(
    extra: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> KVShelfConfig:
    """Build the config from file, env and ``extra`` (highest precedence)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    if environ.get(CONFIG_FILE_ENV):
        merged.update(_from_file(environ[CONFIG_FILE_ENV]))
    merged.update(_from_env(environ))
    merged.update(_normalise(dict(extra or {}), "kv_connector_extra_config"))
    try:
        return KVShelfConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "?"
        got = "<hidden>" if key in _SECRET_FIELDS else repr(err.get("input"))
        lines.append(f"bad kvshelf setting {key!r}: {err['msg']} (got {got})")
    return "; ".join(lines)

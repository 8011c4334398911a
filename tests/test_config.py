"""The config boundary: sources and precedence, LMCache aliases, errors, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
import rich.pretty
from pydantic import ValidationError

from kvshelf.config import GB, GIB, ConfigError, KVShelfConfig, load_config, redact_url


def _write_yaml(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "kvshelf.yaml"
    path.write_text(text)
    return {"KVSHELF_CONFIG_FILE": str(path)}


def test_defaults_with_nothing_set():
    config = load_config(environ={})
    assert config == KVShelfConfig()
    assert config.chunk_size == 256
    assert config.disk_path is None
    assert config.remote_url is None


def test_from_yaml_file(tmp_path):
    environ = _write_yaml(
        tmp_path,
        "chunk_size: 128\ncpu_bytes: 2GiB\ndisk_path: /tmp/kv\ndisk_fsync: false\n",
    )
    config = load_config(environ=environ)
    assert config.chunk_size == 128
    assert config.cpu_bytes == 2 * 2**30
    assert config.disk_path == Path("/tmp/kv")
    assert config.disk_fsync is False


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(environ=_write_yaml(tmp_path, "")) == KVShelfConfig()


def test_from_env_vars():
    environ = {
        "KVSHELF_CHUNK_SIZE": "64",
        "KVSHELF_DISK_BYTES": "10GB",
        "KVSHELF_DISK_FSYNC": "false",
        "KVSHELF_REMOTE_TIMEOUT_S": "1.5",
        "UNRELATED": "ignored",
    }
    config = load_config(environ=environ)
    assert config.chunk_size == 64
    assert config.disk_bytes == 10 * GB
    assert config.disk_fsync is False
    assert config.remote_timeout_s == 1.5


def test_from_dict():
    config = load_config({"chunk_size": 32, "save_threads": 4}, environ={})
    assert (config.chunk_size, config.save_threads) == (32, 4)


def test_process_environment_is_the_default(monkeypatch):
    monkeypatch.setenv("KVSHELF_CHUNK_SIZE", "48")
    assert load_config().chunk_size == 48


def test_precedence_file_then_env_then_dict(tmp_path):
    environ = _write_yaml(tmp_path, "chunk_size: 16\nsave_threads: 3\ncpu_bytes: 1000\n")
    environ |= {"KVSHELF_CHUNK_SIZE": "32", "KVSHELF_SAVE_THREADS": "5"}
    config = load_config({"chunk_size": 64}, environ=environ)
    assert config.chunk_size == 64  # dict beats env and file
    assert config.save_threads == 5  # env beats file
    assert config.cpu_bytes == 1000  # file beats defaults


# -- LMCache aliases --------------------------------------------------------------------


def test_lmcache_config_file_works_unchanged(tmp_path):
    environ = _write_yaml(
        tmp_path,
        "chunk_size: 512\n"
        "local_cpu: true\n"
        "max_local_cpu_size: 2.5\n"
        'local_disk: "file:///var/cache/kv/"\n'
        "max_local_disk_size: 20\n"
        'remote_url: "redis://cache:6379"\n'
        "save_unfull_chunk: false\n",
    )
    config = load_config(environ=environ)
    assert config.chunk_size == 512
    assert config.cpu_bytes == int(2.5 * GIB)  # LMCache's sizes are GiB
    assert config.disk_path == Path("/var/cache/kv/")
    assert config.disk_bytes == 20 * GIB
    assert config.remote_url == "redis://cache:6379"


def test_lmcache_names_as_env_vars():
    environ = {"KVSHELF_MAX_LOCAL_CPU_SIZE": "1", "KVSHELF_LOCAL_DISK": "file://relative/dir"}
    config = load_config(environ=environ)
    assert config.cpu_bytes == GIB
    assert config.disk_path == Path("relative/dir")


@pytest.mark.parametrize("value", [False, "false", "0", "no"])
def test_local_cpu_false_disables_the_memory_tier(value):
    config = load_config({"local_cpu": value, "max_local_cpu_size": 4}, environ={})
    assert config.cpu_bytes == 0


def test_local_cpu_true_keeps_the_budget():
    assert (
        load_config({"local_cpu": True, "max_local_cpu_size": 4}, environ={}).cpu_bytes == 4 * GIB
    )
    assert load_config({"local_cpu": True}, environ={}).cpu_bytes == KVShelfConfig().cpu_bytes


def test_kvshelf_key_beats_its_lmcache_alias():
    config = load_config({"cpu_bytes": 1234, "max_local_cpu_size": 4}, environ={})
    assert config.cpu_bytes == 1234


def test_empty_local_disk_leaves_the_disk_tier_off():
    assert load_config({"local_disk": ""}, environ={}).disk_path is None


def test_file_scheme_stripped_from_disk_path():
    assert load_config({"disk_path": "file:///x/y"}, environ={}).disk_path == Path("/x/y")


# -- errors -------------------------------------------------------------------------------


def test_unknown_key_in_dict_names_it_and_the_nearest():
    with pytest.raises(ConfigError) as err:
        load_config({"chunk_sise": 16}, environ={})
    message = str(err.value)
    assert "'chunk_sise'" in message and "'chunk_size'" in message
    assert "kv_connector_extra_config" in message


def test_unknown_key_in_env_names_it_and_the_nearest():
    with pytest.raises(ConfigError, match=r"'disk_pth'.*'disk_path'") as err:
        load_config(environ={"KVSHELF_DISK_PTH": "/x"})
    assert "KVSHELF_" in str(err.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    environ = _write_yaml(tmp_path, "max_local_cpu_sizes: 3\n")
    with pytest.raises(ConfigError, match=r"'max_local_cpu_sizes'.*'max_local_cpu_size'") as err:
        load_config(environ=environ)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": "many"}, "chunk_size"),
        ({"cpu_bytes": "12 parsecs"}, "cpu_bytes"),
        ({"save_threads": 99}, "save_threads"),
        ({"remote_timeout_s": -1}, "remote_timeout_s"),
        ({"max_local_cpu_size": "lots"}, "max_local_cpu_size"),
        ({"max_local_disk_size": None}, "max_local_disk_size"),
    ],
)
def test_bad_value_names_the_key(extra, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(extra, environ={})


def test_bad_env_value_names_the_key():
    with pytest.raises(ConfigError, match="'chunk_size'"):
        load_config(environ={"KVSHELF_CHUNK_SIZE": "abc"})


def test_unreadable_or_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(environ={"KVSHELF_CONFIG_FILE": str(tmp_path / "missing.yaml")})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(environ=_write_yaml(tmp_path, "chunk_size: [1,\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(environ=_write_yaml(tmp_path, "- chunk_size\n"))


def test_config_is_frozen():
    config = load_config(environ={})
    with pytest.raises(ValidationError):
        config.chunk_size = 1


# -- secrets ------------------------------------------------------------------------------

_SECRET = "hunter2-s3cret"


def test_password_never_in_repr_or_str():
    config = load_config(
        {"remote_url": f"redis://alice:{_SECRET}@cache:6379/0", "remote_password": _SECRET},
        environ={},
    )
    for text in (repr(config), str(config), f"{config}", rich.pretty.pretty_repr(config)):
        assert _SECRET not in text
        assert "cache:6379" in text  # the rest of the URL stays useful
    assert config.password() == _SECRET
    assert config.remote_url.endswith(f"{_SECRET}@cache:6379/0")  # the value itself is intact


def test_password_from_a_named_env_var(monkeypatch):
    monkeypatch.setenv("MY_REDIS_PASSWORD", _SECRET)
    config = load_config({"remote_password_env": "MY_REDIS_PASSWORD"}, environ={})
    assert config.password() == _SECRET
    assert _SECRET not in repr(config)
    assert load_config(environ={}).password() is None


def test_bad_password_value_is_not_echoed():
    """Regression: a YAML password that parses as a number was quoted back in the
    ConfigError message."""
    with pytest.raises(ConfigError, match="'remote_password'") as err:
        load_config({"remote_password": 98765432}, environ={})
    assert "98765432" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://u:pw@h:1", "redis://u:***@h:1"),
        ("rediss://:pw@h:1/0", "rediss://***@h:1/0"),
        ("redis://h:1", "redis://h:1"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("redis://u:p@ss@h:1", "redis://u:***@h:1"),  # '@' inside the password
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvstore.config import StoreConfig, parse_duration, parse_size
from kvstore.errors import ConfigError

from .conftest import examples


def test_defaults_and_normalisation(tmp_path):
    c = StoreConfig(path=str(tmp_path), host_bytes="512MiB", disk_ttl_s="2d", zstd_level="3",
                    block_shape="30,2,3,64,64", dtype="bfloat16", byte_split="false")
    assert c.path == Path(tmp_path) and c.block_tokens == 64
    assert c.host_bytes == 512 << 20 and c.disk_ttl_s == 2 * 86400 and c.zstd_level == 3
    assert c.block_shape == (30, 2, 3, 64, 64) and c.byte_split is False


@pytest.mark.parametrize("text, expect", [("1GiB", 1 << 30), ("10GB", 10**10), ("512", 512),
                                          ("1.5MiB", 3 << 19), (4096, 4096)])
def test_sizes(text, expect):
    assert parse_size(text) == expect


@pytest.mark.parametrize("text, expect", [("90s", 90), ("6h", 21600), ("2d", 172800),
                                          ("1.5h", 5400), (30, 30), ("10m", 600)])
def test_durations(text, expect):
    assert parse_duration(text) == expect


@pytest.mark.parametrize("key, value, fragment", [
    ("host_bytes", "lots", "host_bytes: expected a size"),
    ("host_bytes", -1, "host_bytes: expected a size >= 0"),
    ("disk_ttl_s", "forever", "disk_ttl_s: expected a duration"),
    ("block_tokens", 0, "block_tokens: expected an integer in [1"),
    ("block_tokens", 6.5, "block_tokens"),
    ("compression", "lz4", "compression: expected one of zstd-hi, zstd, none"),
    ("zstd_level", 40, "zstd_level"),
    ("dtype", "float64", "dtype: expected one of"),
    ("block_shape", "a,b", "block_shape"),
    ("namespace", "", "namespace"),
    ("byte_split", "maybe", "byte_split"),
    ("remote_url", "http://cache:6379", "remote_url: expected redis://"),
    ("remote_url", "redis://:hunter2@cache:notaport", "remote_url: expected redis://"),
    ("remote_url", 6379, "remote_url: expected a URL string"),
    ("remote_timeout_s", 0, "remote_timeout_s: expected a duration in (0, 60]"),
    ("remote_timeout_s", "soon", "remote_timeout_s: expected a duration"),
    ("remote_compression", "lz4", "remote_compression: expected one of zstd-hi, zstd, none"),
])
def test_bad_values_name_the_key(tmp_path, key, value, fragment):
    with pytest.raises(ConfigError) as e:
        StoreConfig(path=tmp_path, **{key: value})
    assert fragment in str(e.value)


def test_from_file_reads_toml_and_rejects_unknown_keys(tmp_path):
    f = tmp_path / "kv.toml"
    f.write_text('path = "store"\nhost_bytes = "1GiB"\ndisk_ttl_s = "12h"\n')
    c = StoreConfig.from_file(f)
    assert c.path == tmp_path / "store" and c.disk_ttl_s == 43200
    f.write_text('[kvstore]\npath = "/x"\nhost_byte = 5\n')
    with pytest.raises(ConfigError, match="unknown key.*host_byte.*allowed: path"):
        StoreConfig.from_file(f)
    f.write_text('path = \n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        StoreConfig.from_file(f)
    with pytest.raises(ConfigError, match="cannot read"):
        StoreConfig.from_file(tmp_path / "missing.toml")
    f.write_text('host_bytes = 5\n')
    with pytest.raises(ConfigError, match="missing required key 'path'"):
        StoreConfig.from_file(f)


def test_from_env_with_file_and_overrides(tmp_path):
    f = tmp_path / "kv.toml"
    f.write_text(f'path = "{tmp_path}/a"\nzstd_level = 2\nhost_bytes = 100\n')
    env = {"KVSTORE_CONFIG": str(f), "KVSTORE_HOST_BYTES": "2KiB", "HOME": "/root"}
    c = StoreConfig.from_env(env, zstd_level=5)
    assert c.path == tmp_path / "a" and c.host_bytes == 2048 and c.zstd_level == 5
    with pytest.raises(ConfigError, match="KVSTORE_HOST_BYTE: unknown setting"):
        StoreConfig.from_env({"KVSTORE_PATH": "/x", "KVSTORE_HOST_BYTE": "1"})
    with pytest.raises(ConfigError, match="missing required key 'path'"):
        StoreConfig.from_env({})


@settings(max_examples=examples(200), deadline=None)
@given(st.dictionaries(st.sampled_from(StoreConfig.keys() + ("bogus",)),
                       st.one_of(st.text(max_size=12), st.integers(-5, 1 << 40), st.floats(),
                                 st.booleans(), st.none(), st.lists(st.integers(-2, 70), max_size=6))))
@example({"bogus": 1})
@example({"host_bytes": 4096, "bogus": None})
def test_random_config_values_only_raise_config_error(tmp_path_factory, values):
    values = {"path": "/tmp/kvstore-fuzz", **values} if "path" not in values else values
    try:
        c = StoreConfig.from_mapping(values)
    except ConfigError as e:
        assert any(k in str(e) for k in values), (values, str(e))  # the error names the key
        return
    assert "bogus" not in values  # an unknown key never passes
    for k, v in values.items():  # no silent fallback to a default: a whole number given is kept
        if isinstance(v, int) and not isinstance(v, bool) and isinstance(getattr(c, k), int):
            assert getattr(c, k) == v, (k, v, getattr(c, k))


def test_a_bad_remote_url_is_refused_without_echoing_its_password(tmp_path):
    with pytest.raises(ConfigError) as e:
        StoreConfig(path=tmp_path, remote_url="redis://u:hunter2@cache:notaport")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)


@pytest.mark.parametrize("url", ["", "redis://127.0.0.1:6379", "rediss://u:p@cache.example:6380/0",
                                 "unix:///run/valkey.sock", "redis://a:7000,redis://b:7001"])
def test_remote_urls_accepted(tmp_path, url):
    assert StoreConfig(path=tmp_path, remote_url=url).remote_url == url

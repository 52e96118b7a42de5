"""The server's configuration file and key file: values taken, mistakes named."""

import pytest

from engine_adapter.server import read_config
from engine_adapter.tenants import Tenants
from kvstore import ConfigError


def test_config_file_tables(tmp_path):
    f = tmp_path / "server.toml"
    f.write_text('[kvstore]\nhost_bytes = "64MiB"\n[server]\nmax_queue = 3\nhit_price_per_mtok = 0.2\n')
    store, server = read_config(str(f), str(tmp_path / "kv"))
    assert store.host_bytes == 64 << 20 and store.path == tmp_path / "kv"
    assert server.max_queue == 3 and server.hit_price_per_mtok == 0.2 and server.default_max_tokens == 256


@pytest.mark.parametrize("text, fragment", [
    ("[servr]\n", "unknown table(s) ['servr']"),
    ("[server]\nmax_que = 3\n", "[server] max_que: unknown key"),
    ('[server]\nmax_queue = "3"\n', "[server] max_queue: expected int"),
    ("[server]\nmax_queue = -1\n", "max_queue and answer_book must be >= 0"),
    ('[kvstore]\npath = "x"\n', "give the store directory with --store"),
    ('[kvstore]\nhost_byte = "1GiB"\n', "unknown key(s) host_byte"),
    ("[server\n", "not TOML"),
])
def test_config_mistakes_are_named(tmp_path, text, fragment):
    f = tmp_path / "server.toml"
    f.write_text(text)
    with pytest.raises((ValueError, ConfigError)) as e:
        read_config(str(f), str(tmp_path / "kv"))
    assert fragment in str(e.value)


def test_key_file(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text('"k1" = "a"\n"k2" = "b"\n')
    t = Tenants.from_file(f)
    assert t.tenant("Bearer k1") == "a" and t.tenant("Bearer k2") == "b"
    assert t.tenant("Bearer k3") is None and t.tenant(None) is None and t.tenant("k1") is None
    assert Tenants().tenant(None) == ""  # no key file: one tenant
    for bad, fragment in [("", "no keys"), ('"k" = 3\n', "non-empty string salt"), ('"k" = ""\n', "non-empty")]:
        f.write_text(bad)
        with pytest.raises(ValueError, match=fragment):
            Tenants.from_file(f)


def test_device_choice():
    import torch

    from engine_adapter.server import resolve_device
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cpu:0", "cuda:x", ""):
        with pytest.raises(ValueError, match="--device: expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA device is available"):
            resolve_device("cuda")

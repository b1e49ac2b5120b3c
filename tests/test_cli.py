"""`python -m runtime` configuration: TOML file + flags -> ServerConfig, and the server's
start/stop on SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from runtime.__main__ import is_loopback, main
from runtime.cli import build_parser, load_toml, parse_args, parse_size
from runtime.config import ConfigError, LoraPathSpec, ServerConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_flags_override_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'port = 1234\nhost = "0.0.0.0"\nmax_loras_per_batch = 4\n')
    c = parse_args(["--config", str(cfg), "--port", "999", "--max_loras_per_batch", "6"])
    assert (c.port, c.host, c.max_loras_per_batch) == (999, "0.0.0.0", 6)


def test_every_field_has_a_flag_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(ServerConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
        assert f.metadata["help"].split()[0] in out
    assert "--disable-lora-overlap-loading" in out


def test_lists_and_lora_path_forms(tmp_path: Path) -> None:
    c = parse_args([
        "--lora-paths", "a=/x", "/models/b/", '{"lora_name":"c","lora_path":"/z","pinned":true}',
        "--lora-target-modules", "q_proj", "v_proj", "--max-lora-rank", "8",
        "--lora-roots", "/r1", "/r2", "--max-loras-per-batch", "3",
    ])
    # a bare path names its adapter by itself, as SGLang does (requests then send the path)
    assert c.lora_paths == (LoraPathSpec("a", "/x"), LoraPathSpec("/models/b/", "/models/b/"),
                            LoraPathSpec("c", "/z", True))
    assert c.lora_target_modules == ("q_proj", "v_proj")
    assert c.lora_roots == ("/r1", "/r2")
    assert c.is_lora_enabled


def test_vllm_option_names(tmp_path: Path) -> None:
    """vLLM's names of the same options (a vLLM launch command's LoRA flags work as they are),
    its --lora-modules JSON object among the adapter forms; one option under both names in
    one place is an error naming both, and a flag under either name overrides the file."""
    c = parse_args([
        "--lora-modules", "a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}',
        "--max-loras", "3", "--max-cpu-loras", "5", "--max-lora-rank", "8",
        "--max-num-seqs", "7", "--max-model-len", "512", "--gpu-memory-utilization", "0.5",
        "--tensor-parallel-size", "1", "--enforce-eager", "--seed", "4", "--enable-lora",
    ])
    assert c.lora_paths == (LoraPathSpec("a", "/x"), LoraPathSpec("b", "/y"))
    assert (c.max_loras_per_batch, c.max_loaded_loras, c.max_running_requests) == (3, 5, 7)
    assert (c.context_length, c.mem_fraction_static, c.tp_size) == (512, 0.5, 1)
    assert c.disable_cuda_graph and c.random_seed == 4
    cfg = write(tmp_path, "max_loras = 2\nmax_cpu_loras = 6\nlora_modules = ['c=/z']\n")
    c = parse_args(["--config", str(cfg), "--max-loras-per-batch", "4"])
    assert (c.max_loras_per_batch, c.max_loaded_loras) == (4, 6)
    assert c.lora_paths == (LoraPathSpec("c", str(Path("/z"))),)
    with pytest.raises(ConfigError, match="max_loras: the same option as max_loras_per_batch"):
        parse_args(["--max-loras", "2", "--max-loras-per-batch", "2"])
    with pytest.raises(ConfigError, match="lora_modules.*lora_paths"):
        parse_args(["--config", str(write(tmp_path, "lora_paths = ['a=/x']\n"
                                                    "lora_modules = ['b=/y']\n"))])
    with pytest.raises(ConfigError, match=r"unknown keys \['lora_name'\]"):
        parse_args(["--lora-modules", '{"name": "b", "path": "/y", "lora_name": "c"}'])
    with pytest.raises(ConfigError, match="lora_modules|lora_paths"):
        parse_args(["--lora-modules", '{"name": "b"}'])


def test_allow_auto_truncate_flag_and_key(tmp_path: Path) -> None:
    """SGLang's option name: off by default, a presence flag (either spelling), a TOML key."""
    assert parse_args([]).allow_auto_truncate is False
    assert parse_args(["--allow-auto-truncate"]).allow_auto_truncate is True
    assert parse_args(["--allow_auto_truncate"]).allow_auto_truncate is True
    cfg = write(tmp_path, "allow_auto_truncate = true\n")
    assert parse_args(["--config", str(cfg)]).allow_auto_truncate is True
    with pytest.raises(ConfigError, match="allow_auto_truncate"):
        load_toml(write(tmp_path, 'allow_auto_truncate = "yes"\n'))


def test_booleans_tristate_sizes() -> None:
    c = parse_args(["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all",
                    "--disable-cuda-graph", "--max-lora-host-bytes", "2GiB",
                    "--kv-cache-cpu-bytes", "512MB", "--enable-lora-overlap-loading"])
    assert c.enable_lora and c.disable_cuda_graph and c.enable_lora_overlap_loading is True
    assert c.max_lora_host_bytes == 2 << 30 and c.kv_cache_cpu_bytes == 512 * 10**6
    assert parse_args(["--disable-lora-overlap-loading"]).enable_lora_overlap_loading is False
    assert parse_args([]).enable_lora_overlap_loading is None
    assert parse_size("1.5k", "x") == 1536 and parse_size(7, "x") == 7


def test_toml_types_tables_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "adapters" / "one").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    cfg = write(tmp_path, """
model_path = "model"
enable_lora_overlap_loading = false
max_lora_host_bytes = "1GiB"
lora_roots = ["adapters"]
lora_target_modules = ["q_proj"]
lora_paths = [
  "one=adapters/one",
  "org/hub-adapter",
  { lora_name = "two", lora_path = "./adapters/two", pinned = true },
]
""")
    c = parse_args(["--config", str(cfg)])
    assert c.model_path == str(tmp_path / "model")
    assert c.enable_lora_overlap_loading is False and c.max_lora_host_bytes == 1 << 30
    assert c.lora_roots == (str(tmp_path / "adapters"),)
    one, hub, two = c.lora_paths
    assert one == LoraPathSpec("one", str(tmp_path / "adapters" / "one"))
    assert hub == LoraPathSpec("org/hub-adapter", "org/hub-adapter")  # hub ids stay as they are
    assert two == LoraPathSpec("two", str(tmp_path / "adapters" / "two"), True)
    bundled = write(tmp_path, 'model_path = "bundled:smollm2-135m-instruct"\n')
    assert load_toml(bundled)["model_path"] == "bundled:smollm2-135m-instruct"


@pytest.mark.parametrize("argv, option", [
    (["--no-such-flag", "1"], "--no-such-flag"),
    (["--port", "eighty"], "port"),
    (["--port", "0"], "port"),
    (["--device", "tpu"], "device"),
    (["--max-lora-host-bytes", "lots"], "max_lora_host_bytes"),
    (["--lora-paths", "{bad json"], "lora_paths"),
    (["--lora-paths", '{"lora_name": "x"}'], "lora_paths"),
    (["--lora-target-modules", "q_proj", "--lora-paths", "a=/x", "--max-lora-rank", "2000"],
     "max_lora_rank"),
    (["--mem-fraction-static", "2"], "mem_fraction_static"),
    (["--max-total-tokens", "8"], "max_total_tokens"),  # under one page (16)
    (["--max-loaded-loras", "2", "--max-loras-per-batch", "4"], "max_loaded_loras"),
    (["--tp-size", "2", "--disable-lora-overlap-loading"], "enable_lora_overlap_loading"),
    (["--model-path", "/m", "--lora-paths", "/m=/x"], "base model's name"),
    (["--served-model-name", "s", "--lora-paths", "s=/x"], "base model's name"),
    (["--port"], "--port"),
])
def test_bad_flags_name_the_option(argv: list[str], option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        parse_args(argv)


@pytest.mark.parametrize("text, option", [
    ("nope = 1\n", "nope"),
    ('port = "80"\n', "port"),
    ("enable_lora = 1\n", "enable_lora"),
    ('lora_paths = "a=/x"\n', "lora_paths"),
    ("lora_paths = [{ lora_name = 'a' }]\n", "lora_paths"),
    ("lora_target_modules = [1]\n", "lora_target_modules"),
    ("mem_fraction_static = true\n", "mem_fraction_static"),
    ("port = \n", "TOML"),
])
def test_bad_toml_names_the_option(tmp_path: Path, text: str, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        parse_args(["--config", str(write(tmp_path, text))])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        parse_args(["--config", str(tmp_path / "absent.toml")])


def test_main_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "x"]) == 2
    assert "port" in capsys.readouterr().err


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_and_sigterm(tmp_path: Path) -> None:
    from tests.models import make_model

    model = make_model(tmp_path / "model")
    port = _free_port()
    cfg = write(tmp_path, f'model_path = "model"\ndevice = "cpu"\ndtype = "float32"\n'
                          f'port = {port}\nkv_cache_cpu_bytes = "16MiB"\n')
    assert model.exists()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "loraserve ready at" in line or not line:
                break
        assert f"loraserve ready at http://127.0.0.1:{port}" in lines[-1], "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""A real Prometheus server scrapes a live `python -m runtime` every second; after known
traffic its query API must report exactly that traffic (the histogram counts, the per-adapter
counter, requests by adapter residency). Skips where no `prometheus` binary is installed
(.ci/run installs the Debian package)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.live import SERVED_NAME, LiveServer, free_port, running_server
from tests.models import make_adapter, make_model

NUM_ADAPTER_REQUESTS = 3  # N, on lora0
NUM_BASE_REQUESTS = 2  # M
START_TIMEOUT_S = 60.0
QUERY_TIMEOUT_S = 30.0
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).exists(),
    reason="no prometheus binary (apt-get install prometheus; .ci/run installs it)",
)

SCRAPE_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: loraserve
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("prom-live")
    model = make_model(root / "model")
    loras = root / "loras"
    make_adapter(model, loras / "lora0", seed=1)
    startup = [{"lora_name": "lora0", "lora_path": str(loras / "lora0")}]
    with running_server(root, model, loras, lora_paths=startup) as server:
        yield server


@pytest.fixture
def prometheus(live: LiveServer, tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping `live` every second; yields its base URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(SCRAPE_CONFIG.format(port=live.port))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if requests.get(url + "/-/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError("prometheus did not become ready:\n" + log.read_text())


def query(url: str, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
    """An instant query's vector as {sorted labels: value}."""
    r = requests.get(url + "/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return {tuple(sorted(s["metric"].items())): float(s["value"][1])
            for s in body["data"]["result"]}


def scalar(url: str, promql: str) -> float | None:
    """The single value of a one-series query; None while it has no series."""
    result = query(url, promql)
    assert len(result) <= 1, result
    return next(iter(result.values()), None)


def send_traffic(live: LiveServer) -> None:
    for i in range(NUM_ADAPTER_REQUESTS):  # the OpenAI route with base:adapter
        r = requests.post(live.url + "/v1/completions", timeout=60, json={
            "model": f"{SERVED_NAME}:lora0", "prompt": f"Request {i}", "max_tokens": 4,
            "temperature": 0})
        assert r.status_code == 200, r.text
    for i in range(NUM_BASE_REQUESTS):  # the native route, base model
        r = requests.post(live.url + "/generate", timeout=60, json={
            "text": f"Base {i}", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
        assert r.status_code == 200, r.text


def test_prometheus_scrapes_traffic(live: LiveServer, prometheus: str) -> None:
    n, m = NUM_ADAPTER_REQUESTS, NUM_BASE_REQUESTS
    send_traffic(live)
    queries = {
        "up": 'up{job="loraserve"}',
        "ttft": "sum(loraserve:time_to_first_token_seconds_count)",
        "ttft_inf": 'sum(loraserve:time_to_first_token_seconds_bucket{le="+Inf"})',
        "e2e": "sum(loraserve:e2e_request_latency_seconds_count)",
        "adapter": 'loraserve:adapter_requests_total{adapter="lora0"}',
        "base": 'loraserve:adapter_requests_total{adapter="base"}',
        "lora": 'sum(loraserve:lora_requests_total{residency!="base"})',
        "lora_base": 'loraserve:lora_requests_total{residency="base"}',
        "running": "loraserve:num_running_reqs",
    }
    expected = {"up": 1.0, "ttft": n + m, "ttft_inf": n + m, "e2e": n + m, "adapter": n,
                "base": m, "lora": n, "lora_base": m, "running": 0.0}
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    while True:  # until a scrape after the traffic has landed
        got = {k: scalar(prometheus, q) for k, q in queries.items()}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == expected
    by_residency = {dict(k)["residency"]: v for k, v in query(
        prometheus, "loraserve:lora_requests_total").items()}
    assert set(by_residency) == {"gpu", "host", "disk", "base"}  # zeros exported up front
    # Sequential requests: the adapter stays in its GPU slot, so all but the first hit it there.
    assert by_residency["gpu"] >= n - 1
    assert by_residency["gpu"] + by_residency["host"] + by_residency["disk"] == n

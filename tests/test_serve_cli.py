"""`tinysaver serve` from the command line, as the README runs it: start, query with HTTP, stop."""
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, free_port, need, need_package, png, post_answered
from tinysaver.data import FASHION_MNIST_DIR


def test_serve_command_answers_and_stops_on_ctrl_c(tmp_path):
    need_package("ray")
    need_package("httpx")
    need(FASHION_MNIST_DIR.is_dir(), "Fashion-MNIST (apt-get install -y dataset-fashion-mnist)")
    import httpx

    from tinysaver.data import load_dataset

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tinysaver", "serve", "--zoo", "fashion-mnist", "--base", "resnet10t",
                             "--port", str(port), "--num-cpus", "0.5", "--audit", "0.1"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        # quiet, the service is up in about 30 s; with a matmul loop beside the tests, the stage
        # replicas of this 2-core VM took 2.5 minutes to load their models
        up_by = time.monotonic() + 480
        while True:
            try:
                h = httpx.get(f"{url}/healthz", timeout=2)
                if h.status_code == 200:
                    break
                if h.status_code == 503 and "application/json" in h.headers.get("content-type", ""):
                    # the ingress is up before its stages: it must not call itself healthy yet
                    assert h.json()["status"] == "starting" and h.json()["waiting_for"], h.text
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            if time.monotonic() > up_by:
                pytest.fail("the service did not come up in 8 minutes")
            time.sleep(0.5)
        img = load_dataset("fashion-mnist:test", progress=False, limit=1).images[0]
        with httpx.Client(base_url=url, timeout=60) as client:
            r = post_answered(client, png(img))
        assert r.status_code == 200 and set(r.json()) >= {"class", "name", "confidence", "exit_stage", "stage_name",
                                                          "latency_ms"}
        assert httpx.get(f"{url}/metrics", timeout=10).json()["requests"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)  # replicas drain for up to 30 s each; a loaded machine is slower
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("tinysaver serve did not stop on Ctrl-C")
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]

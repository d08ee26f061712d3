"""`tinysaver serve` from the command line, as the README runs it: start, query with HTTP, stop."""
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, need, need_package
from tests.test_serve import free_port, png
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
        for _ in range(240):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the service did not come up in 2 minutes")
        img = load_dataset("fashion-mnist:test", progress=False, limit=1).images[0]
        r = httpx.post(f"{url}/predict", content=png(img), headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200 and set(r.json()) >= {"class", "name", "confidence", "exit_stage", "stage_name",
                                                          "latency_ms"}
        assert httpx.get(f"{url}/metrics", timeout=10).json()["requests"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("tinysaver serve did not stop on Ctrl-C")
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]

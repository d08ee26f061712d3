"""`tinysaver serve` from the command line, as the README runs it: start, query with HTTP, stop."""
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, free_port, need, need_package, png, post_answered
from tinysaver.sources import FASHION_MNIST_DIR

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # starts Ray: select with -m 'not ray' for a quick run


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """``tinysaver serve`` (in Ray Serve's high-throughput mode, with gRPC) and ``serve run`` with
    the builder (Serve's default mode), started side by side (each its own local Ray) so that their
    start-ups overlap; each test stops its own. Yields
    {"tinysaver": (proc, port), "serve-run": proc or a reason it was not started}; a process's
    output goes to a file (``proc.log``), which no idle pipe can fill and block."""
    import os
    import shutil
    import socket

    need_package("ray")
    need_package("httpx")
    need(FASHION_MNIST_DIR.is_dir(), "Fashion-MNIST (apt-get install -y dataset-fashion-mnist)")
    logs = tmp_path_factory.mktemp("serve-cli")

    def start(name, cmd, **kw):
        with (logs / f"{name}.log").open("w") as out:  # the child keeps its own copy of the file
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, **kw)
        proc.log = logs / f"{name}.log"
        return proc

    port, grpc_port = free_port(), free_port()
    # in a process group of its own, as a container's or systemd's service is: its stop signals the group
    procs = {"tinysaver": (start("tinysaver", [sys.executable, "-m", "tinysaver", "serve", "--zoo", "fashion-mnist",
                                               "--base", "resnet10t", "--port", str(port), "--num-cpus", "0.5",
                                               "--audit", "1.0", "--adapt", "--grpc-port", str(grpc_port),
                                               "--high-throughput"], start_new_session=True),
                           port, grpc_port)}
    with socket.socket() as s:  # serve run listens on Serve's default port
        taken = s.connect_ex(("127.0.0.1", 8000)) == 0
    serve_cli = shutil.which("serve")
    if taken:
        procs["serve-run"] = "port 8000 is taken on this machine"
    elif serve_cli is None:
        procs["serve-run"] = "Ray Serve's 'serve' command is not on PATH"
    else:
        # what a platform runs: the config `serve build` writes for the module-level app, run by `serve run`
        # (the token from the environment, as the builder reads it)
        built = logs / "serve.yaml"
        done = subprocess.run([serve_cli, "build", "tinysaver.serve.default:app", "-o", str(built)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        env = {**os.environ, "RAY_worker_niceness": "0", "TINYSAVER_TOKEN": "s3cret"}
        procs["serve-run"] = start("serve-run", [serve_cli, "run", str(built)], env=env)
    yield procs
    for p in (procs["tinysaver"][0], procs["serve-run"]):
        if isinstance(p, subprocess.Popen) and p.poll() is None:
            p.kill()
            p.wait(timeout=60)


def wait_until_up(proc, url: str, what: str, live: bool = False, every_s: float = 0.5) -> None:
    """Until /healthz says 200. Quiet, a service is up in about 30 s; with a matmul loop beside the
    tests, the stage replicas of this 2-core VM took 2.5 minutes to load their models. ``live``:
    once /v2/health/live has answered 200, it answers 200 at every poll after, through the port's
    hand-over to Serve's proxy (a liveness probe never fails once the command is running)."""
    import httpx

    up_by, alive, failed = time.monotonic() + 480, False, []
    while True:
        if live:
            try:
                got = str(httpx.get(f"{url}/v2/health/live", timeout=10).status_code)
            except httpx.HTTPError as e:
                got = type(e).__name__
            alive = alive or got == "200"
            if alive and got != "200":
                failed.append(got)
        try:
            h = httpx.get(f"{url}/healthz", timeout=2)
            if h.status_code == 200:
                assert alive or not live, "the liveness route never answered before the service was up"
                assert not failed, f"liveness failed during start-up after it had answered: {failed}"
                return
            if h.status_code == 503 and "application/json" in h.headers.get("content-type", ""):
                # the ingress is up before its stages: it must not call itself healthy yet
                assert h.json()["status"] == "starting" and h.json()["waiting_for"], h.text
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.log.read_text()[-3000:]
        if time.monotonic() > up_by:
            pytest.fail(f"{what} did not come up in 8 minutes")
        time.sleep(every_s)


def stream_while_stopping(proc, url: str, img: bytes, clients: int = 16, settle_s: float = 2.0) -> dict:
    """``clients`` threads post ``img`` to /predict back to back; after ``settle_s`` the service's
    process group gets SIGTERM. Counts every HTTP status until the process has exited, the refused
    connections after it, and keeps the body of any answer that is neither 200 nor 503, and each
    request cut off without an answer ("dropped": the proxy stopped with it inside)."""
    import os
    import threading
    from collections import Counter

    import httpx

    counts, odd, done = Counter(), [], threading.Event()

    def client():
        with httpx.Client(base_url=url, timeout=60) as c:
            while not done.is_set():
                try:
                    r = c.post("/predict", content=img, headers={"content-type": "image/png"})
                except httpx.ConnectError:  # the service is gone: nothing listens any more
                    counts["refused"] += 1
                    time.sleep(0.05)
                    continue
                except httpx.TransportError as e:  # sent, and cut off without an answer
                    counts["dropped"] += 1
                    odd.append(f"dropped: {type(e).__name__}: {e}")
                    continue
                counts[r.status_code] += 1
                if r.status_code == 503 and r.headers.get("retry-after") and "error" in r.json():
                    continue
                if r.status_code != 200:
                    odd.append(f"{r.status_code} {r.headers.get('content-type')} {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(settle_s)
    answered_before = counts[200]
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # what systemd, Docker and Kubernetes send
    try:
        proc.wait(timeout=120)
    finally:
        exit_s = time.monotonic() - t0
        done.set()
        for t in threads:
            t.join()
    return {"counts": dict(counts), "odd": odd, "answered_before": answered_before, "exit_s": exit_s}


def test_serve_command_answers_and_drains_on_sigterm_to_its_group(services):
    import httpx

    from tinysaver.data import load_dataset

    proc, port, grpc_port = services["tinysaver"]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(proc, url, "tinysaver serve")
        img = load_dataset("fashion-mnist:test", progress=False, limit=1).images[0]
        with httpx.Client(base_url=url, timeout=60) as client:
            r = post_answered(client, png(img))
        assert r.status_code == 200 and set(r.json()) >= {"class", "name", "confidence", "exit_stage", "stage_name",
                                                          "latency_ms"}
        assert httpx.get(f"{url}/metrics.json", timeout=10).json()["requests"] == 1
        # no --backend: the fused layout took ONNX Runtime, which the bundled zoo vouches for, and said so
        assert "layout: fused; backends: mobilenetv3_small_075 on onnxruntime, resnet10t on onnxruntime" \
            in proc.log.read_text()
        from tinysaver.serve.grpc_api import METHOD, predict

        g = predict(f"127.0.0.1:{grpc_port}", png(img))  # the same image over gRPC: the same answer
        assert (g["class"], g["exit_stage"]) == (r.json()["class"], r.json()["exit_stage"])
        for _ in range(120):  # /healthz can say 200 a moment before the command sees the app running
            if (f"gRPC at 127.0.0.1:{grpc_port} ({METHOD} and the Open Inference Protocol's "
                    "inference.GRPCInferenceService)") in proc.log.read_text():
                break
            time.sleep(0.5)
        else:
            raise AssertionError(proc.log.read_text()[-3000:])
        # shifted traffic, end to end: the audit calls drift, --adapt raises the threshold (which
        # starts a fresh audit), and the terminal of `tinysaver serve` says so
        import torch
        from concurrent.futures import ThreadPoolExecutor

        shifted = torch.roll(load_dataset("fashion-mnist:test", progress=False, limit=60).images, 8, dims=3)
        with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda im: post_answered(client, png(im)), shifted))
        for _ in range(120):
            out = proc.log.read_text()
            if "tinysaver: adapt: threshold" in out:
                break
            time.sleep(0.5)
        h = httpx.get(f"{url}/healthz", timeout=10).json()
        first = h["audit"]["adapt"]["switches"][0]
        assert first["why"] == "drift" and (first["to"] is None or first["to"] > first["from"]), h
        assert f"tinysaver: adapt: threshold {first['from']:g} → " in out and "requests (drift)" in out, out[-3000:]
        # the stop: SIGTERM to the group at concurrency 16. Every answer is 200, or 503 with
        # Retry-After and an error body while draining; never Ray's 404 or anything else
        got = stream_while_stopping(proc, url, png(img))
    finally:
        if proc.poll() is None:  # the test failed before its stop: stop it as a service manager would
            import os

            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    out = proc.log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert got["odd"] == [] and got["counts"].get(200, 0) > got["answered_before"] > 0, got
    assert "tinysaver: drained in" in out and "still unanswered" not in out, out[-3000:]
    # it says how many it answered before the stop, not "stopped before the service was up"
    assert re.search(r"tinysaver: stopping after [\d,]+ answers: new requests get 503", out), out[-3000:]
    # the old stop lost Ray's GCS to the group's signal and waited 60 s for it
    assert "Failed to connect to GCS" not in out and "graceful_shutdown failed" not in out, out[-3000:]
    # Ray's own start-up chatter, for a Ray the command started itself, is for --verbose only
    assert "Connecting to existing Ray cluster" not in out and "will not be applied" not in out, out[-3000:]
    print(f"stopped {got['exit_s']:.1f} s after SIGTERM; answers {got['counts']}")


def test_serve_run_of_the_config_serve_build_wrote(services):
    """What the README shows for Ray-native deployment: serve build, then serve run of its config."""
    import httpx

    from tinysaver.data import load_dataset

    proc = services["serve-run"]
    if isinstance(proc, str):
        if "taken" in proc:
            pytest.skip(proc)
        pytest.fail(proc)
    try:
        wait_until_up(proc, "http://127.0.0.1:8000", "serve run")
        img = png(load_dataset("fashion-mnist:test", progress=False, limit=1).images[0])
        with httpx.Client(base_url="http://127.0.0.1:8000", timeout=60) as c:
            assert c.post("/predict", content=img, headers={"content-type": "image/png"}).status_code == 401
            r = c.post("/predict", content=img, headers={"content-type": "image/png",
                                                          "authorization": "Bearer s3cret"})
            assert r.status_code == 200 and r.json()["stage_name"] in ("mobilenetv3_small_075", "resnet10t"), r.text
            h = c.get("/healthz").json()  # open without the token
            assert h["layout"] == "fused" and h["stages"][-1] == "resnet10t"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_taken_port_is_refused_in_one_line_before_ray_starts(capsys):
    import socket

    from tests.helpers import run_here

    need_package("ray")
    free = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_here(capsys, "serve", "--base", "resnet10t", "--port", str(port))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"cannot listen on 127.0.0.1:{port}: address already in use; choose another --port" in out.stderr
        out = run_here(capsys, "serve", "--base", "resnet10t", "--port", str(free), "--grpc-port", str(port))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"cannot listen on 127.0.0.1:{port}: address already in use; choose another --grpc-port" in out.stderr
    out = run_here(capsys, "serve", "--base", "resnet10t", "--port", str(free), "--grpc-port", str(free))
    assert out.returncode == 2 and f"--grpc-port {free} is also --port" in out.stderr
    import ray

    assert not ray.is_initialized()  # refused before Ray started
    out = run_here(capsys, "serve", "--base", "resnet10t", "--port", "99999")
    assert out.returncode == 2 and "a TCP port is 1-65535, got 99999" in out.stderr
    out = run_here(capsys, "serve", "--base", "resnet10t", "--high-throughput", "--address", "127.0.0.1:1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nodes were started with RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in out.stderr


def _serve(*extra, port):
    return subprocess.Popen([sys.executable, "-m", "tinysaver", "serve", "--zoo", "fashion-mnist", "--base",
                             "resnet10t", "--port", str(port), "--num-cpus", "0.5", *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_an_unschedulable_replica_stops_the_command_at_once_and_sigterm_works_during_start_up():
    """A replica no node of a local Ray can hold (a GPU this machine lacks, a custom resource nobody
    has) ends the command at once, naming the stage and the resource, however long --startup-timeout
    is; SIGTERM while the replicas load stops it cleanly."""
    need_package("ray")
    # the three commands run side by side (each starts its own local Ray): a third of the wall time
    timed = _serve("--resources", '{"nowhere": 1}', "--startup-timeout", "600", port=free_port())
    gpu = _serve("--num-gpus", "1", port=free_port())
    proc = _serve("--verbose", port=free_port())  # --verbose: Ray's own "Started Serve" line marks the moment
    try:
        lines = []
        for line in proc.stdout:  # Serve is up and the replica is waiting for its resource
            lines.append(line)
            if "Started Serve" in line or "Connecting to existing Serve app" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        out, _ = timed.communicate(timeout=300)  # not 600 s: the command fails before deploying
        out_gpu, _ = gpu.communicate(timeout=300)
    finally:
        for p in (proc, timed, gpu):
            p.kill()
    assert timed.returncode == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last == ("tinysaver: error: the service cannot start: the fused replica (every stage) needs nowhere=1; "
                    "the largest node of this cluster has nowhere=0"), out[-3000:]
    last = out_gpu.strip().splitlines()[-1]
    assert last.startswith("tinysaver: error: the service cannot start: the fused replica (every stage) needs GPU=1;") \
        and last.endswith("has GPU=0"), out_gpu[-3000:]
    assert "Traceback" not in out + out_gpu and "Started Serve" not in out + out_gpu
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "stopped before the service was up" in out or "tinysaver: drained in" in out, out[-3000:]
    assert "Traceback" not in out and "Aborted" not in out


def test_liveness_is_answered_from_the_first_answer_until_the_service_is_up(tmp_path):
    """In Serve's default mode the command's start-up server shares the port with Serve's proxy
    and hands it over once the application answers: every liveness poll after the first 200 is
    200 again, through Ray's start, the proxy's bind and the models' load; then SIGTERM stops it."""
    need_package("ray")
    need_package("httpx")
    port = free_port()
    with (tmp_path / "serve.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tinysaver", "serve", "--zoo", "fashion-mnist", "--base",
                                 "resnet10t", "--port", str(port), "--num-cpus", "0.5"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    proc.log = tmp_path / "serve.log"
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}", "tinysaver serve", live=True, every_s=0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out = proc.log.read_text()
    assert proc.returncode == 0 and "tinysaver: drained in" in out and "Traceback" not in out, out[-3000:]


def test_a_machine_that_never_ran_ray_gets_a_token_before_ray_start(tmp_path, monkeypatch):
    """Ray's token authentication is on by default, and ``ray start --head`` fails where no token
    was ever written: the service writes one first, unless the user gave one or turned it off."""
    need_package("ray")
    from tinysaver.ray_local import ensure_ray_token

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / "home" / ".ray" / "auth_token"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ensure_ray_token()
    assert not token.exists()
    monkeypatch.delenv("RAY_AUTH_MODE")
    ensure_ray_token()
    first = token.read_text()
    assert len(first.strip()) >= 32
    ensure_ray_token()  # an existing token is kept: nodes that joined with it stay valid
    assert token.read_text() == first

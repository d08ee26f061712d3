"""The life of a service on Ray: start a local Ray of its own (or join a cluster), deploy, wait
until it runs, and on SIGTERM or Ctrl-C drain and stop within a bounded time.

A local Ray runs in a session of its own. systemd, Docker and Kubernetes signal the whole process
group of a service; had Ray's GCS, raylet and replicas been in it, they would die at once while
the command still needed them to drain (the stop then waited 60 s for a GCS that was gone). So
only this process hears the signal, refuses new requests with 503 (`tinysaver.serve.drain`),
answers what it admitted, closes the proxy's listener (`tinysaver.serve.listener`) and then stops
its Ray by the process it started.

Ray is an optional extra (``.[serve]``), so it is imported inside the functions that use it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ServeError
from ..ray_local import RAY_CLI, ensure_ray_token, set_local_ray_env
from . import grpc_api, listener, routes
from .builders import unschedulable
from .reaper import in_session
from .starting import STARTING_HEADER, StartingServer

log = logging.getLogger("tinysaver.serve")

# --- a local Ray for the service --------------------------------------------------------------------

# Serve's controller gives a starting HTTP proxy 5 s to report ready and 10 s per health check,
# then kills it. On a busy 2-core machine a proxy can need longer just to import FastAPI (seen in CI
# with a training job beside the tests; 62 s with a matmul loop beside them), so a local instance
# gives it more.
PROXY_START_S = 300
PROXY_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": str(PROXY_START_S), "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}
# Ray Serve's high-throughput mode (Ray ≥ 2.55): HAProxy in front, ingress replicas that take HTTP
# themselves, gRPC between deployments. Every process of the instance must see these, so they are
# set before Ray starts, or by whoever starts a cluster's nodes.
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def local_ray_env() -> None:
    """Settings for a Ray instance this process starts to serve from (call before ``ray.init``):
    replicas at the default priority (`tinysaver.ray_local`) and a patient proxy start-up.
    Values the user set in the environment are kept."""
    set_local_ray_env(PROXY_ENV)


def start_serve(http_options: dict, wait_s: float = PROXY_START_S, grpc_port: int | None = None) -> None:
    """``serve.start(http_options=...)``, waiting up to ``wait_s`` seconds for the HTTP proxies;
    with ``grpc_port``, Serve's gRPC proxy also listens there with the service's method (``grpc_api``).

    ``serve.start`` waits a fixed 60 s for its proxies and then raises, although the controller it
    started goes on and the proxy comes up later. On a starved machine we therefore connect to that
    controller and wait for Serve to report every proxy healthy. Raises TimeoutError past ``wait_s``.
    """
    from ray import serve

    kw = {"http_options": http_options}
    if grpc_port:
        kw["grpc_options"] = {"port": int(grpc_port), "grpc_servicer_functions": grpc_api.servicers()}
    t0 = time.monotonic()
    try:
        serve.start(**kw)
        return
    except TimeoutError as e:
        if "proxies not available" not in str(e):
            raise
        log.warning("Serve's HTTP proxy is slow to start (%s); waiting up to %.0f s in all", e, wait_s)
    serve.start(**kw)  # the controller is running now: this connects to it
    while True:
        proxies = serve.status().proxies
        if proxies and all(st == "HEALTHY" for st in proxies.values()):  # ProxyStatus is a str enum
            return
        if time.monotonic() - t0 > wait_s:
            raise TimeoutError(f"Serve's HTTP proxies were not healthy after {wait_s:.0f} s: {proxies}")
        time.sleep(1.0)


APP = "tinysaver"
HEAD_START_S = 120.0  # a local Ray's head comes up in about 5 s here; a starved machine takes longer
STARTUP_TIMEOUT_S = 120.0  # how long a service may take to be running before the command gives up
DRAIN_TIMEOUT_S = 15.0  # from SIGTERM to exit: drain, close the listener, stop Ray
STOP_RESERVE_S = 3.0  # of --drain-timeout, kept for stopping Ray once the replicas are drained
CLOSE_S = 1.0  # of --drain-timeout, for the connections open when the listener closes to get their answers
# a running application answers through the proxy within a second or two: past this the port is the proxy's anyway
HAND_OVER_S = 60.0


def check_port(host: str, port: int, option: str = "--port") -> None:
    """Refuse a port that is taken before Ray starts (Ray's own failure comes 35 s later, as a trace)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:  # the port is not the trouble: the address is not this machine's
                raise ServeError(f"--host {host}: not an address of this machine (give 127.0.0.1, 0.0.0.0 or one "
                                 "of its own addresses)") from None
            raise ServeError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}; "
                             f"choose another {option}") from None


def claim_ports(host: str, port: int, grpc_port: int | None = None, hold: bool = True) -> StartingServer | None:
    """Refuse a taken or shared port in one line, before anything starts; with ``hold``, answer the
    HTTP port's liveness from now on (`tinysaver.serve.starting`) until Serve's proxy takes it."""
    check_port(host, port)
    if grpc_port:
        if grpc_port == port:
            raise ServeError(f"--grpc-port {grpc_port} is also --port: give the gRPC proxy a port of its own")
        check_port(host, grpc_port, "--grpc-port")
    return StartingServer(host, port, share=proxy_shares_port()) if hold else None


def proxy_shares_port() -> bool:
    """Whether Serve's HTTP proxy will bind its port with ``SO_REUSEPORT`` (Ray's default, read
    from the environment the local Ray inherits), so that `StartingServer` may listen beside it;
    HAProxy (``--high-throughput``) binds alone unless told otherwise."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1":
        return os.environ.get("SERVE_SOCKET_REUSE_PORT_ENABLED", "0") == "1"
    return os.environ.get("SERVE_SOCKET_REUSE_PORT_ENABLED", "1") == "1"


def hand_over(starting: StartingServer, url: str, timeout_s: float, stop: list) -> bool:
    """Give the port to Serve's proxy once it answers ``url`` (a liveness route) through it; until
    then `StartingServer` keeps answering. After ``timeout_s`` (or a stop) the port goes to the proxy
    anyway. Returns whether the proxy answered."""
    deadline = time.monotonic() + timeout_s
    while not stop and time.monotonic() < deadline:
        if starting.hand_over(lambda: _proxy_answers(url)):
            return True
        time.sleep(0.25)
    starting.close()
    return False


def _proxy_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200 and STARTING_HEADER not in r.headers
    except (OSError, urllib.error.HTTPError):
        return False


ADDRESS_WAIT_S = 15.0  # how long --address may take to answer before the command gives up


def check_address(address: str, timeout_s: float = ADDRESS_WAIT_S) -> None:
    """Refuse a cluster address that does not answer, within ``timeout_s``: ray.init waits on an
    address that never answers for minutes, deaf to Ctrl-C. Only ``host:port`` is probed; ``auto``
    and ``ray://`` addresses are Ray's to resolve."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or "://" in address or not host:
        return
    deadline, why = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:
            why = (e.strerror or str(e) or type(e).__name__).lower()
            if isinstance(e, socket.gaierror):
                break
        time.sleep(0.5)
    raise ServeError(f"--address {address}: no Ray cluster answers there ({why}, for {timeout_s:g} s); start one "
                     "with 'ray start --head', or leave --address out to start a local one")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ``ray start --block`` stops the whole node when one of its processes exits, and these listen on
# fixed default ports: a second Ray on the machine (another service, a test's) would take them first
OWN_PORTS = ("dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port")


class LocalHead:
    """A one-node Ray started with ``ray start --head --block`` in a session of its own, stopped by
    the pid of that process (which stops the node's processes), then its process group killed."""

    def __init__(self, timeout_s: float = HEAD_START_S):
        self.port = _free_port()
        # a temp dir of its own: ``ray start`` records its address in the default one, where every
        # later ray.init() on the machine would find it and join this service's Ray
        remove_stale_heads()
        self.dir = Path(tempfile.mkdtemp(prefix=HEAD_PREFIX))
        self.log = self.dir / "head.log"
        ensure_ray_token()
        env = dict(os.environ)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", RAY_CLI, "start", "--head", "--block", f"--port={self.port}",
                 "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                 f"--temp-dir={self.dir}", *(f"--{name}={_free_port()}" for name in OWN_PORTS)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                preexec_fn=_die_with_parent)
        (self.dir / OWNER).write_text(f"{os.getpid()} {self.proc.pid}")  # the command's pid, and its node's session
        # a kill -9 of this command leaves nothing to stop the node: the reaper, a process of its own, does
        self.reaper = subprocess.Popen([sys.executable, "-m", "tinysaver.serve.reaper", str(os.getpid()),
                                        str(self.proc.pid), str(self.dir)], start_new_session=True,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = " ".join(self.log.read_text(errors="replace").split()[-40:])
                self.stop(5.0)
                raise ServeError(f"the local Ray did not start: {tail[-400:]}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{self.port}"

    def check(self) -> None:
        """ServeError with the head's last words when its ``ray start`` has exited (it takes the node
        with it, so nothing would answer again)."""
        if self.proc.poll() is not None:
            tail = " ".join(self.log.read_text(errors="replace").split()[-60:])
            raise ServeError(f"the local Ray stopped (exit {self.proc.returncode}): {tail[-500:]}")

    def stop(self, timeout_s: float) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(max(timeout_s, 0.1))
            except subprocess.TimeoutExpired:
                pass
        # whatever of the node outlived its ``ray start``: the session is its pid, and a process that
        # made a group of its own in it (Serve's HAProxy in the high-throughput mode, restarted
        # while the node stops) would hold its ports after the node is gone
        for _ in range(3):
            left = in_session(self.proc.pid)
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not left:
                break
            time.sleep(0.2)
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        reaper = getattr(self, "reaper", None)
        if reaper is not None:  # it leaves by itself once the session is empty
            with contextlib.suppress(subprocess.TimeoutExpired):
                reaper.wait(5.0)


HEAD_PREFIX, OWNER = "tinysaver-ray-", "owner.pid"


def remove_stale_heads(tmp: str | None = None) -> list[Path]:
    """Remove the temp folders of local heads whose command has died (a ``kill -9`` leaves its
    folder behind, as nothing of it runs to remove it). A folder is stale when the command's pid it
    records is gone and no process runs in its node's session any more; the folders removed are
    returned."""
    gone = []
    for d in Path(tmp or tempfile.gettempdir()).glob(HEAD_PREFIX + "*"):
        try:
            pid, head = (int(x) for x in (d / OWNER).read_text().split())
        except (OSError, ValueError):
            continue  # not ours to judge (an older tinysaver's, or one being made now)
        if Path(f"/proc/{pid}").exists() or in_session(head):
            continue  # its command runs, or its node is still stopping
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


def _die_with_parent() -> None:
    """In the child: the kernel sends SIGTERM when the command dies, even by SIGKILL, so that a
    local Ray never outlives the service that started it."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the stop path still stops it
        pass


def wait_running(name: str, timeout_s: float, stop: list, needs: dict | None, head: LocalHead | None = None) -> None:
    """Until the application runs; a deployment that fails, or is still not running at the
    deadline, is a ServeError. A replica no node can hold (a missing GPU or custom resource) is
    named at once on a local Ray, which no autoscaler grows, and at the deadline on a cluster.
    Returns on Ctrl-C or SIGTERM."""
    import ray
    from ray import serve

    local = head is not None
    deadline = time.monotonic() + timeout_s
    while not stop:
        if head:
            head.check()
        app = serve.status().applications.get(name)
        state = str(getattr(app, "status", ""))
        if state.endswith("RUNNING"):
            return
        if needs and (local or time.monotonic() > deadline):
            why = unschedulable(needs, ray.nodes())
            if why:
                raise ServeError(f"the service cannot start: {why}" if local
                                 else f"the service was not running after {timeout_s:.0f} s: {why}")
        if state.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            why = [f"{d}: {st.message}" for d, st in (app.deployments if app else {}).items()
                   if str(st.status) != "HEALTHY" and st.message] or [getattr(app, "message", "") or state]
            first = " ".join(why[0].split())[:400]
            verb = "failed to start" if state.endswith("DEPLOY_FAILED") else f"was not running after {timeout_s:.0f} s"
            raise ServeError(f"the service {verb}: {first}")
        time.sleep(0.5)


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def answered(url: str) -> int | None:
    """How many images the service at ``url`` (its /healthz) has answered; None when it does not say."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while starting or draining: the body still says
        try:
            body = json.loads(e.read())
        except Exception:  # noqa: BLE001
            return None
    except Exception:  # noqa: BLE001 - no answer from a service that is going
        return None
    n = body.get("answered") if isinstance(body, dict) else None
    return n if isinstance(n, int) else None


class AuditWatch:
    """Prints the audit's state changes on this terminal (they also go to the service's log),
    reading the open /healthz at most every 2 s."""

    def __init__(self, url: str, every_s: float = 2.0):
        self.url, self.every_s, self.next, self.state = url, every_s, 0.0, None
        self.switches = 0

    def poll(self) -> None:
        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.every_s
        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                audit = json.loads(r.read())["audit"]
        except urllib.error.HTTPError as e:  # 503 while starting or draining: the body still has the audit
            try:
                audit = json.loads(e.read())["audit"]
            except Exception:  # noqa: BLE001
                return
        except Exception:  # noqa: BLE001 - a busy or restarting service: look again later
            return
        adapt = audit.get("adapt") or {}
        new = adapt.get("switch_count", 0) - self.switches
        for sw in adapt.get("switches", [])[-new:] if new > 0 else []:
            shown = ["∞ (the base alone)" if t is None else f"{t:g}" for t in (sw["from"], sw["to"])]
            print(f"tinysaver: adapt: threshold {shown[0]} → {shown[1]} after {sw['request']} requests "
                  f"({sw['why']})", file=sys.stderr, flush=True)
        self.switches += max(new, 0)
        state = audit.get("state")
        if state in (None, "off") or state == self.state:
            return
        if self.state is not None or state != "uncertain":
            b = audit.get("loss_points") or {}
            more = f"; about {audit['more_requests']:,} more requests would certify it" \
                if state == "uncertain" and audit.get("more_requests") else ""
            print(f"tinysaver: audit {state} after {audit['requests']} requests: loss against the base in "
                  f"[{b.get('lower', 0):.2f}, {b.get('upper', 100):.2f}] points, tolerance "
                  f"{audit['tolerance_points']:.2f}{more}", file=sys.stderr, flush=True)
        self.state = state


def drain(app: str, timeout_s: float, log=print) -> int:
    """Ask ``app``'s ingress replicas to refuse new requests (503), then wait until they have
    answered every request they admitted, at most ``timeout_s`` seconds. Returns how many requests
    were still held at the deadline (0: all answered)."""
    from . import drain as flag

    flag.start_drain(app)
    deadline = time.monotonic() + timeout_s
    time.sleep(min(2.5 * flag.POLL_S, max(timeout_s, 0)))  # every replica has looked at the flag
    while True:
        try:
            left = flag.held(app)
        except Exception:  # noqa: BLE001 - the store gone: nothing more can be answered anyway
            return 0
        if left == 0 or time.monotonic() >= deadline:
            if left:
                log(f"tinysaver: {left} request(s) still unanswered after the drain time (--drain-timeout)")
            return left
        time.sleep(flag.POLL_S / 2)


def run_service(app, models, *, host: str = "127.0.0.1", port: int = 8000, grpc_port: int | None = None,
                address: str | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                drain_timeout_s: float = DRAIN_TIMEOUT_S,
                needs: dict | None = None, verbose: bool = False, starting: StartingServer | None = None) -> int:
    """Start Ray (or join ``address``) and Serve, run ``app`` until Ctrl-C or SIGTERM, then drain
    and stop within ``drain_timeout_s``. ``needs``: what each deployment's replica asks Ray for (to
    name one that can never start); ``verbose``: let Ray's and Serve's own INFO lines through
    ("Connecting to existing Ray cluster" for the Ray this command just started, say);
    ``starting``: the ports already claimed (`claim_ports`), held until the proxy takes them."""
    import ray
    from ray import serve

    if not verbose:  # the command says what matters itself; Ray's chatter is for --verbose
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)

    stop: list = []

    def request_stop(signum, frame):  # Ctrl-C or SIGTERM (a container stopping), even when inherited ignored
        stop.append(signum)

    def catch_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, request_stop)

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if starting is None:  # the port answers liveness while a local Ray starts (a probe would restart a slow start)
        starting = claim_ports(host, port, grpc_port, hold=not address)
    catch_signals()
    head = None
    if address:
        check_address(address)
    else:
        local_ray_env()  # settings for the local instance about to start
        head = LocalHead()
    try:
        if head:
            ray.init(address=head.address, log_to_driver=False, _node_ip_address="127.0.0.1",
                     logging_level=logging.INFO if verbose else logging.WARNING)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.INFO if verbose else logging.WARNING)
        catch_signals()  # ray.init installs a SIGTERM handler that dumps a C++ stack and aborts
        if stop:
            say("tinysaver: stopped before the service was up")
            return 0
        from . import drain as flag

        flag.clear(APP)  # a cluster that outlived an earlier service keeps its flag
        if head and needs:  # nothing can add a node to a local Ray: a replica that fits none never will
            why = unschedulable(needs, ray.nodes())
            if why:
                raise ServeError(f"the service cannot start: {why}")
        if starting and not starting.shared:
            starting.close()  # the proxy takes the port now; a shared one is handed over once the service answers
        start_serve({"host": host, "port": port}, grpc_port=grpc_port)
        if hasattr(serve, "run_many"):  # deploy, then wait here, where a deadline and Ctrl-C apply
            serve.run_many([serve.RunTarget(app, name=APP, route_prefix="/")], wait_for_applications_running=False)
            wait_running(APP, startup_timeout_s, stop, needs, head)
        else:
            serve.run(app, name=APP, route_prefix="/")
        health = f"http://{_local(host)}:{port}{routes.HEALTH}"
        if starting and starting.shared:
            hand_over(starting, f"http://{_local(host)}:{port}{routes.LIVE}", HAND_OVER_S, stop)
        if stop:  # during start-up: a replica that is up may have admitted requests, so it drains too
            n = answered(health)  # a slow start can answer before this command sees it running
            say(f"tinysaver: stopped after {n:,} answer{'s' if n != 1 else ''}, before the command saw the service "
                "fully up" if n else "tinysaver: stopped before the service was up")
        else:
            grpc_line = f", and gRPC at {host}:{grpc_port} ({grpc_api.listing()})" if grpc_port else ""
            say(f"tinysaver: serving {' → '.join(models)} at http://{host}:{port} ({routes.listing()}){grpc_line}; "
                "Ctrl-C stops")
        watch = AuditWatch(health)
        while not stop:
            time.sleep(0.2)
            watch.poll()
            if head:
                head.check()
        t0, n = time.monotonic(), answered(health)
        after = f" after {n:,} answer{'s' if n != 1 else ''}" if n is not None else ""
        say(f"tinysaver: stopping{after}: new requests get 503; answering those admitted (at most {drain_timeout_s:g} s)")
        # the listener is closed only on a local Ray of the command's own (a cluster's proxy is not ours)
        drain(APP, max(drain_timeout_s - STOP_RESERVE_S - (CLOSE_S if head else 0.0), 0.0), say)
        if head:  # the proxy would be killed with requests in it: refuse new connections, answer the open ones
            shut = listener.close_listener(in_session(head.proc.pid), port)
            left = listener.settle(port, CLOSE_S)
            if verbose:
                say(f"tinysaver: closed {shut} listener(s) on port {port}; {left} connection(s) still open")
        say(f"tinysaver: drained in {time.monotonic() - t0:.1f} s; stopping Ray")
        return 0
    finally:
        if starting:
            starting.close()  # (again, for a start that failed before the proxy took the port)
        with listener.kept_closed(lambda: in_session(head.proc.pid), port) if head and stop else contextlib.nullcontext():
            if ray.is_initialized():
                if not head:  # a shared cluster keeps its Serve; our application goes, stopped or failed
                    try:
                        serve.delete(APP, _blocking=False)
                    except Exception:  # noqa: BLE001 - the error being reported matters more
                        pass
                ray.shutdown()
            if head:
                head.stop(STOP_RESERVE_S)


__all__ = ["APP", "DRAIN_TIMEOUT_S", "STARTUP_TIMEOUT_S", "HIGH_THROUGHPUT_ENV", "PROXY_START_S", "local_ray_env", "start_serve", "AuditWatch", "LocalHead", "check_address", "check_port", "claim_ports", "drain", "hand_over", "proxy_shares_port", "remove_stale_heads",
           "run_service", "wait_running"]

"""Two Ray nodes on one machine: profiling and serving survive losing the second one.

One cluster for the module (``ray.cluster_utils.Cluster``): a head, and per test a second node
with its own CPU and a ``node2`` resource. The node is killed, workers and all, while work runs.
"""
import numpy as np
import pytest

from tests.helpers import free_port, image_folder, need, need_package, png, post_answered, tiny_profile_config
from tinysaver.sources import FASHION_MNIST_DIR
from tinysaver.profiler import profile
from tinysaver.zoo import load_zoo

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    need_package("ray")
    import ray
    from ray.cluster_utils import Cluster

    from tinysaver.ray_local import ensure_ray_token, set_local_ray_env

    set_local_ray_env()
    ensure_ray_token()  # Cluster starts its head with ``ray start``, which writes no token of its own
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def second_node(c, cpus: float = 1):
    node = c.add_node(num_cpus=cpus, resources={"node2": 1})
    c.wait_for_nodes()
    return node


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    dataset = image_folder(tmp_path_factory.mktemp("clusterimgs"), classes=2, per_class=24, seed=4, size=(32, 32))
    return tiny_profile_config("cz", dataset, classes=2)


def kill_node(c, node) -> list[int]:
    """A node loss: its worker processes die with it. ``Cluster.remove_node`` stops the node's own
    processes (raylet, agents) but leaves the workers they started running, so those go first."""
    import os
    import signal

    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    workers = {p.pid: " ".join(p.cmdline()) for p in raylet.children(recursive=True)}
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    c.remove_node(node, allow_graceful=False)
    return workers


def test_profile_spreads_over_two_nodes_and_survives_losing_one(cluster, cfg, tmp_path):
    import ray

    from tinysaver.profile_ray import profile_on_ray

    c = cluster
    node2 = second_node(c)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    seen, removed = [], []

    def remove_node2_once(unit, pid):
        seen.append(pid)
        # one worker per node (1 CPU each), each given a unit at the start: after two results,
        # node2's worker holds a unit (running it, or about to be given its next) when node2 goes
        if len(seen) == 2 and not removed:
            kill_node(c, node2)
            removed.append(len(seen))

    counts = profile_on_ray(cfg, tmp_path, shards=4, progress=False, log=lambda s: None, on_unit=remove_node2_once)
    # every unit was run and merged although a node and its worker went away mid-run
    assert counts["merged"] == 2 and counts["run"] == counts["units"] == 8, counts
    assert removed and removed[0] < 8, (removed, seen)  # the node went while units were left
    assert counts["workers_lost"] >= 1 and counts["retries"] >= 1
    local = tmp_path / "local"
    profile(cfg, local, progress=False, log=lambda s: None)
    a, b = load_zoo("cz", tmp_path), load_zoo("cz", local)
    for m in b.models:
        pa, pb = a.predictions(m, "val"), b.predictions(m, "val")
        assert list(pa.ids) == list(pb.ids) and np.array_equal(pa.pred, pb.pred)
        assert np.allclose(pa.conf, pb.conf, atol=1e-5)
        assert a.models[m]["flops"] == b.models[m]["flops"]


def test_serve_with_the_base_pinned_to_the_second_node_answers_or_says_retry_when_it_is_lost(cluster):
    """Per-stage layout, the base's replica pinned to node2 by its custom resource. Under load the
    node is killed: every request gets an answer or the documented 503 'retry', none hangs, early
    answers go on, and the service counts what it could not answer."""
    need_package("httpx")
    need(FASHION_MNIST_DIR.is_dir(), "Fashion-MNIST (apt-get install -y dataset-fashion-mnist)")
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from ray import serve

    from tinysaver.data import load_dataset
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.serve import ServeOptions, build_app

    c = cluster
    node2 = second_node(c, cpus=0)  # no CPU: only what asks for node2 (the base) is placed there
    zoo = load_zoo("fashion-mnist")
    sel = select(zoo, "resnet10t", SelectorConfig()).best
    bodies = [png(img) for img in load_dataset("fashion-mnist:test", progress=False, limit=80).images]
    port = free_port()
    # one proxy, on the head: the nodes share this machine's ports, so a proxy per node would clash
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    o = ServeOptions(layout="per-stage", num_cpus=[0.2, 0.0], ingress_num_cpus=0.1, resources=[{}, {"node2": 0.5}],
                     request_timeout_s=3.0)
    serve.run(build_app(sel, zoo, o), name="pinned", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)  # a hang fails the test
    try:
        post = lambda b: client.post("/predict", content=b, headers={"content-type": "image/png"})  # noqa: E731
        with ThreadPoolExecutor(6) as pool:
            # before the loss a 503 can only mean a starved machine: retry as a client would
            before = list(pool.map(lambda b: post_answered(client, b), bodies[:40]))
            assert all(r.status_code == 200 for r in before), [r.text for r in before if r.status_code != 200][:2]
            assert {r.json()["exit_stage"] for r in before} == {0, 1}  # both stages answer, the base on node2
            killed = kill_node(c, node2)
            assert any(f"ServeReplica:pinned:stage1-{sel.base}" in cmd for cmd in killed.values()), killed
            after = list(pool.map(post, bodies[40:]))
        codes = [r.status_code for r in after]
        assert set(codes) <= {200, 503}, [r.text for r in after if r.status_code not in (200, 503)][:2]
        lost = [r for r in after if r.status_code == 503]
        assert lost and all("retry" in r.json()["error"] for r in lost)
        # the saver is on the head: its answers never needed node2
        assert any(r.status_code == 200 and r.json()["exit_stage"] == 0 for r in after)
        m = client.get("/metrics.json").json()
        assert m["unavailable"] >= len(lost) and m["requests"] == len(before) + codes.count(200)
    finally:
        # no serve.shutdown(): it would wait 30 s for the base's replica, which has no node to
        # stop on; the module's cluster teardown ends every process anyway
        client.close()

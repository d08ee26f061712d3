"""Two Ray nodes on one machine: profile --backend ray spreads over both and survives losing one.

One cluster for the module (``ray.cluster_utils.Cluster``): a head and a second node with its own
CPU and a ``node2`` resource. The node is removed while units run, as a node loss would.
"""
import numpy as np
import pytest

from tests.helpers import need_package, png_bytes
from tinysaver.models import ModelSpec
from tinysaver.profiler import ProfileConfig, profile
from tinysaver.zoo import load_zoo

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    need_package("ray")
    import ray
    from ray.cluster_utils import Cluster

    from tinysaver.ray_local import set_local_ray_env

    set_local_ray_env()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node2 = c.add_node(num_cpus=1, resources={"node2": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, node2
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    rng = np.random.default_rng(4)
    root = tmp_path_factory.mktemp("clusterimgs")
    for c in range(2):
        (root / f"c{c}").mkdir()
        for i in range(24):
            arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            (root / f"c{c}" / f"{i}.png").write_bytes(png_bytes(arr))
    common = dict(num_classes=2, input_size=32)
    return ProfileConfig(zoo="cz", splits={"val": f"imagefolder:{root}"},
                         models=[ModelSpec("test_efficientnet", **common), ModelSpec("test_resnet", **common)],
                         batch_sizes=[1], eval_batch_size=4, topk=2, latency_min_run_time=0.01)


def kill_node(c, node) -> list[int]:
    """A node loss: its worker processes die with it. ``Cluster.remove_node`` stops the node's own
    processes (raylet, agents) but leaves the workers they started running, so those go first."""
    import os
    import signal

    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    workers = [p.pid for p in raylet.children(recursive=True)]
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    c.remove_node(node, allow_graceful=False)
    return workers


def test_profile_spreads_over_two_nodes_and_survives_losing_one(cluster, cfg, tmp_path):
    import ray

    from tinysaver.profile_ray import profile_on_ray

    c, node2 = cluster
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

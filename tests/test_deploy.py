"""What a platform reads: the KubeRay RayService's Serve config, and `serve build` of the default app."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, need_package

ROOT = Path(__file__).resolve().parent.parent


def test_the_kuberay_service_config_validates_and_builds_the_cascade():
    need_package("ray")
    from ray.serve.schema import ServeDeploySchema

    from tinysaver.serve import app

    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    [application] = config.applications
    assert application.import_path == "tinysaver.serve:app"
    built = app(dict(application.args))  # what the cluster's controller calls
    assert built.__class__.__name__ == "Application"
    assert [d.name for d in application.deployments] == ["Ingress"]
    # the replicas scale (Serve's autoscaler, and the cluster's for the workers they need), and the
    # gRPC method is served as `tinysaver serve --grpc-port` serves it
    scaling = application.deployments[0].autoscaling_config
    assert scaling["min_replicas"] < scaling["max_replicas"]
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    from tinysaver.serve import grpc_api, oip_grpc

    assert config.grpc_options.grpc_servicer_functions == [grpc_api.SERVICER, oip_grpc.SERVICER]


def test_serve_build_writes_a_config_of_the_default_cascade(tmp_path):
    need_package("ray")
    cli = shutil.which("serve")
    if cli is None:
        pytest.skip("Ray Serve's 'serve' command is not on PATH")
    out = tmp_path / "serve.yaml"
    from tinysaver.serve import grpc_api, oip_grpc

    servicers = [grpc_api.SERVICER, oip_grpc.SERVICER]
    # the command of the KubeRay guide: the config carries the gRPC options `tinysaver serve --grpc-port` has
    assert "--grpc-servicer-functions " + " \\\n    --grpc-servicer-functions ".join(servicers) in \
        (REPO / "docs" / "guides" / "kuberay.md").read_text()
    done = subprocess.run([cli, "build", "tinysaver.serve.default:app", "-o", str(out),
                           *(x for s in servicers for x in ("--grpc-servicer-functions", s))], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    assert config.grpc_options.grpc_servicer_functions == servicers
    [application] = config.applications
    assert application.import_path == "tinysaver.serve.default:app"
    [ingress] = application.deployments
    assert ingress.name == "Ingress" and ingress.ray_actor_options.num_cpus == 1.0

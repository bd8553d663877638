"""Deployment manifests for the model repository `python -m serve` runs locally: Docker Compose for the NGC
Triton container, Kubernetes (Deployment, Service, HorizontalPodAutoscaler, Prometheus scraping), and a KServe
InferenceService on KServe's own Triton runtime.

The repository is not rewritten: the same folder is mounted read-only (Compose, a PersistentVolumeClaim) or
read from storage (Triton itself: s3://, gs://, as://; KServe's storage initializer: s3://, gs://, pvc://). Its
configs are read first, so a manifest that could not serve them (a TensorRT plan or GPU instances without
--gpus) is refused before it is written. The manifests are validated offline in the tests: Kubernetes against
kubernetes-validate's schemas for KUBERNETES_VERSION, Compose against the Compose specification's JSON schema,
custom resources (which kubernetes-validate has no schema for) against the CRD schemas vendored in
serve/schemas.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import yaml

from expertfuse.contract import check_model_name
from expertfuse.errors import UserError
from expertfuse.files import write_text
from serve.repository import read_config
from serve.server import DEFAULT_IMAGE, tritonserver_args

KUBERNETES_VERSION = "1.30"  # the schemas the emitted manifests are validated against
APP = "expertfuse-triton"
MOUNT = "/models"
STORE_SCHEMES = {"s3": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"],
                 "gs": ["GOOGLE_APPLICATION_CREDENTIALS"],
                 "as": ["AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY"]}
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
EXIT_TIMEOUT_S = 30  # in-flight requests get this long after SIGTERM (Kubernetes' default grace period)
# KServe's Triton runtime (ClusterServingRuntime kserve-tritonserver) starts `tritonserver
# --model-store=/mnt/models --grpc-port=9000 --http-port=8080` on the image NGC_TRITON:<runtimeVersion>, and
# scrapes metrics on Triton's default port; a model's `args` are appended to the runtime's.
NGC_TRITON = DEFAULT_IMAGE.rpartition(":")[0]
KSERVE_MOUNT = "/mnt/models"
KSERVE_PORTS = {"http": 8080, "grpc": 9000, "metrics": 8002}
KSERVE_RUNTIME_FLAGS = ("--model-repository", "--http-port", "--grpc-port")
KSERVE_SCHEMES = ("s3", "gs", "pvc")
SCHEMAS = Path(__file__).parent / "schemas"
CUSTOM_RESOURCE_SCHEMAS = {("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice_v1beta1.json.gz",
                           ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_v1.json.gz"}


def check_repository(repository: Path, gpus: int) -> list[str]:
    """Model names in the repository, or a UserError naming a model the deployment could not serve."""
    repository = Path(repository)
    if not repository.is_dir():
        raise UserError(f"model repository not found: {repository}")
    names = []
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg = read_config(model_dir)  # a RepositoryError is already a one-line UserError
        check_model_name(cfg.name)
        needs_gpu = cfg.platform == "tensorrt_plan" or cfg.backend == "tensorrt" or \
            any(g.kind == g.KIND_GPU for g in cfg.instance_group)
        if needs_gpu and gpus < 1:
            raise UserError(f"model {cfg.name!r} needs a GPU (TensorRT plan or GPU instances): pass --gpus N")
        names.append(cfg.name)
    if not names:
        raise UserError(f"{repository} holds no models (export one with python -m export.onnx)")
    return names


def repository_source(uri: str | None) -> str:
    """What Triton's --model-repository gets: the mounted folder, or an object-store URI it reads natively."""
    if uri is None:
        return MOUNT
    if uri.partition("://")[0] not in STORE_SCHEMES or not uri.partition("://")[2]:
        raise UserError(f"--repository-uri must be s3://, gs:// or as:// (what Triton reads natively); got {uri!r}")
    return uri


def triton_command(source: str, ports: dict[str, int]) -> list[str]:
    """tritonserver as `python -m serve` runs it, listening on every interface inside the container."""
    return ["tritonserver",
            *tritonserver_args(source, ports["http"], ports["grpc"], ports["metrics"], exit_timeout_s=EXIT_TIMEOUT_S)]


def ready_probe_command(http_port: int) -> list[str]:
    """Health check inside the NGC image (python3 is there for the python backend; curl may not be)."""
    return ["CMD", "python3", "-c", "import urllib.request; urllib.request.urlopen("
            f"'http://localhost:{http_port}/v2/health/ready', timeout=4)"]


def compose(repository: Path, out: Path, image: str, ports: dict[str, int], gpus: int, replicas: int,
            uri: str | None) -> dict:
    """A Compose file for the NGC container. One replica publishes the fixed ports; more replicas publish
    container ports only (Docker picks the host ports; put a load balancer in front)."""
    source = repository_source(uri)
    service = {"image": image, "command": triton_command(source, ports), "shm_size": "1g",
               "ulimits": {"memlock": -1, "stack": 67108864},
               "ports": [f"{p}:{p}" if replicas == 1 else str(p) for p in ports.values()],
               "healthcheck": {"test": ready_probe_command(ports["http"]), "interval": "10s", "timeout": "5s",
                               "retries": 3, "start_period": "120s"},
               "restart": "unless-stopped", "deploy": {"replicas": replicas}}
    if uri is None:
        relative = os.path.relpath(Path(repository).resolve(), Path(out).resolve())
        service["volumes"] = [{"type": "bind", "source": relative, "target": MOUNT, "read_only": True}]
    else:
        service["environment"] = STORE_SCHEMES[uri.partition("://")[0]]
    if gpus > 0:
        service["deploy"]["resources"] = {"reservations": {"devices": [
            {"driver": "nvidia", "count": gpus, "capabilities": ["gpu"]}]}}
    return {"name": APP, "services": {"triton": service}}


def probe(path: str, period_s: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "failureThreshold": failures}


def resources(gpus: int) -> dict:
    """What one Triton replica asks of the cluster (Deployment and InferenceService alike): GPUs as limits."""
    spec = {"requests": {"cpu": "1", "memory": "2Gi"}}
    if gpus > 0:
        spec["limits"] = {"nvidia.com/gpu": gpus}
    return spec


def container(image: str, source: str, ports: dict[str, int], gpus: int, uri: str | None) -> dict:
    """The Triton container: probes on Triton's own health endpoints."""
    spec = {"name": "triton", "image": image, "command": triton_command(source, ports),
            "ports": [{"name": name, "containerPort": port} for name, port in ports.items()],
            "startupProbe": probe("/v2/health/ready", 10, 60),  # up to 10 minutes to load the models
            "readinessProbe": probe("/v2/health/ready", 5, 3),
            "livenessProbe": probe("/v2/health/live", 10, 3),
            "resources": resources(gpus),
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    if uri is None:
        spec["volumeMounts"].append({"name": "model-repository", "mountPath": MOUNT, "readOnly": True})
    else:
        spec["envFrom"] = [{"secretRef": {"name": f"{APP}-storage", "optional": True}}]
    return spec


def deployment(image: str, ports: dict[str, int], gpus: int, replicas: int, uri: str | None) -> dict:
    labels = {"app.kubernetes.io/name": APP}
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    if uri is None:
        volumes.append({"name": "model-repository",
                        "persistentVolumeClaim": {"claimName": f"{APP}-models", "readOnly": True}})
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(ports["metrics"]),
              "prometheus.io/path": "/metrics"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": APP, "labels": labels},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": scrape},
                                  "spec": {"containers": [container(image, repository_source(uri), ports, gpus, uri)],
                                           "volumes": volumes}}}}


def service(ports: dict[str, int]) -> dict:
    labels = {"app.kubernetes.io/name": APP}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": APP, "labels": labels},
            "spec": {"selector": labels, "ports": [{"name": name, "port": port, "targetPort": name}
                                                   for name, port in ports.items()]}}


def autoscaler(replicas: int, max_replicas: int) -> dict:
    """Scale on CPU utilisation (what every cluster has); Triton's queue time needs a metrics adapter (README)."""
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": APP},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
                     "minReplicas": replicas, "maxReplicas": max_replicas,
                     "metrics": [{"type": "Resource", "resource": {
                         "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]}}


def claim(repository: Path) -> dict:
    """The volume the repository is copied into once; ReadWriteMany so replicas on any node share it."""
    size = sum(f.stat().st_size for f in Path(repository).rglob("*") if f.is_file())
    gib = max(1, math.ceil(2 * size / 2**30))
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{APP}-models"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{gib}Gi"}}}}


def service_monitor(ports: dict[str, int]) -> dict:
    """Prometheus Operator's CRD (not in Kubernetes' own schemas, so kubernetes-validate cannot check it)."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": APP},
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": APP}},
                     "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}]}}


def kubernetes(repository: Path, image: str, ports: dict[str, int], gpus: int, replicas: int, max_replicas: int,
               uri: str | None) -> list[dict]:
    """[PersistentVolumeClaim,] Deployment, Service, HorizontalPodAutoscaler."""
    volume = [claim(repository)] if uri is None else []
    return [*volume, deployment(image, ports, gpus, replicas, uri), service(ports), autoscaler(replicas, max_replicas)]


def runtime_version(image: str) -> str:
    """KServe's runtimeVersion: the tag of the NGC Triton release the configs were written for (--image)."""
    repository, _, tag = image.rpartition(":")
    if repository != NGC_TRITON or not tag:
        raise UserError(f"--emit kserve runs KServe's Triton runtime, whose image is {NGC_TRITON}: --image may "
                        f"change only its tag (the runtimeVersion); got {image!r}")
    return tag


def kserve_storage_uri(repository: Path, uri: str | None) -> str:
    """Where KServe's storage initializer fetches the repository from (a pvc:// claim is mounted instead)."""
    if uri is None or "://" not in uri or uri.startswith("file://"):
        raise UserError(f"--emit kserve: no cluster can read the local path {uri or repository}; copy the repository "
                        "to storage and pass --repository-uri s3://BUCKET/PATH, gs://BUCKET/PATH or pvc://CLAIM/PATH")
    if uri.partition("://")[0] not in KSERVE_SCHEMES or not uri.partition("://")[2]:
        raise UserError(f"--emit kserve: --repository-uri must be s3://, gs:// or pvc:// (what KServe's storage "
                        f"initializer reads); got {uri!r}")
    return uri


def kserve_args() -> list[str]:
    """Our Triton flags less those the runtime already passes (it sets the repository and the two ports)."""
    flags = tritonserver_args(KSERVE_MOUNT, KSERVE_PORTS["http"], KSERVE_PORTS["grpc"], KSERVE_PORTS["metrics"],
                              exit_timeout_s=EXIT_TIMEOUT_S)
    return [flag for flag in flags if flag.partition("=")[0] not in KSERVE_RUNTIME_FLAGS]


def inference_service(repository: Path, image: str, gpus: int, replicas: int, max_replicas: int,
                      uri: str | None) -> dict:
    """The repository as one KServe predictor on the Triton runtime; KServe's autoscaler between the bounds."""
    model = {"modelFormat": {"name": "triton"}, "protocolVersion": "v2",  # older KServe defaults to v1
             "runtimeVersion": runtime_version(image), "storageUri": kserve_storage_uri(repository, uri),
             "args": kserve_args(), "resources": resources(gpus)}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": APP, "labels": {"app.kubernetes.io/name": APP}},
            "spec": {"predictor": {"minReplicas": replicas, "maxReplicas": max_replicas, "model": model}}}


def kserve_access(manifest: Path, names: list[str]) -> list[str]:
    """What to run after writing: apply, reach a predictor pod on the runtime's ports, send a request."""
    http, grpc = KSERVE_PORTS["http"], KSERVE_PORTS["grpc"]
    pod = f"$(kubectl get pod -l serving.kserve.io/inferenceservice={APP} -o name | head -n 1)"
    return [f"kubectl apply -f {manifest}; then, from this machine:",
            f"  kubectl port-forward {pod} {http} {grpc}",
            *(f"  HTTP  http://127.0.0.1:{http}/v2/models/{name}/infer" for name in names),
            f"  gRPC  127.0.0.1:{grpc}",
            f"  python -m serve.client -u 127.0.0.1:{http} -m {names[0]} IMAGE    "
            f"(gRPC: -i grpc -u 127.0.0.1:{grpc})"]


def custom_resource_schema(document: dict) -> dict:
    """The JSON Schema (Draft 7) of a custom resource we emit, vendored with its source in serve/schemas/README.md."""
    name = CUSTOM_RESOURCE_SCHEMAS[document["apiVersion"], document["kind"]]
    return json.loads(gzip.decompress((SCHEMAS / name).read_bytes()))


class _PlainDumper(yaml.SafeDumper):
    """No &anchors / *aliases for dicts shared between resources (labels): manifests read as written."""

    def ignore_aliases(self, data) -> bool:
        return True


def write_yaml(path: Path, documents: list[dict]) -> Path:
    return write_text(path, yaml.dump_all(documents, Dumper=_PlainDumper, sort_keys=False))


def replica_bounds(replicas: int, max_replicas: int | None) -> tuple[int, int]:
    """The autoscaler's (minimum, maximum): the maximum defaults to 4 x replicas and is never below the minimum."""
    if replicas < 1:
        raise UserError(f"--replicas must be >= 1; got {replicas}")
    if max_replicas is None:
        return replicas, 4 * replicas
    if max_replicas < replicas:
        raise UserError(f"--max-replicas must be >= --replicas ({replicas}); got {max_replicas}")
    return replicas, max_replicas


def emit(kind: str, repository: Path, out: Path, image: str = DEFAULT_IMAGE, ports: dict[str, int] | None = None,
         gpus: int = 0, replicas: int = 1, max_replicas: int | None = None, uri: str | None = None) -> list[Path]:
    """Write the manifests of `kind` (compose | k8s | kserve) into `out`; returns the files written."""
    ports = ports or DEFAULT_PORTS
    if gpus < 0:
        raise UserError(f"--gpus must be >= 0; got {gpus}")
    replicas, max_replicas = replica_bounds(replicas, max_replicas)
    if any(not 0 < p < 65536 for p in ports.values()) or len(set(ports.values())) != 3:
        raise UserError("--http-port, --grpc-port and --metrics-port must be three different ports in 1..65535")
    check_repository(repository, gpus)
    out = Path(out)
    if kind == "compose":
        return [write_yaml(out / "compose.yaml", [compose(repository, out, image, ports, gpus, replicas, uri)])]
    if kind == "k8s":
        return [write_yaml(out / "triton.yaml", kubernetes(repository, image, ports, gpus, replicas, max_replicas,
                                                          uri)),
                write_yaml(out / "servicemonitor.yaml", [service_monitor(ports)])]
    if kind == "kserve":
        if ports != DEFAULT_PORTS:
            raise UserError(f"--emit kserve: KServe's Triton runtime fixes its ports (HTTP {KSERVE_PORTS['http']}, "
                            f"gRPC {KSERVE_PORTS['grpc']}); drop --http-port, --grpc-port and --metrics-port")
        return [write_yaml(out / "inferenceservice.yaml",
                           [inference_service(repository, image, gpus, replicas, max_replicas, uri)])]
    raise UserError(f"--emit must be compose, k8s or kserve; got {kind!r}")


def emit_manifests(args) -> None:
    """`python -m serve --emit ...`: write the manifests and print what was written (UserError on bad input)."""
    ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    try:
        files = emit(args.emit, args.repository, args.out, args.image, ports, args.gpus, args.replicas,
                     args.max_replicas, args.repository_uri)
    except OSError as exc:
        raise UserError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    for path in files:
        print(f"wrote {path}")
    if args.emit == "kserve":
        print("\n".join(kserve_access(files[0], check_repository(args.repository, args.gpus))))

"""Deployment manifests from a model repository, validated offline against the real schemas:
Kubernetes with kubernetes-validate (serve.deploy.KUBERNETES_VERSION), Compose with check-jsonschema's
vendored Compose specification schema (`vendor.compose-spec`), custom resources (KServe's InferenceService,
Prometheus Operator's ServiceMonitor) with jsonschema against the CRD schemas vendored in serve/schemas. Each
validator is also shown to fail on a broken manifest, so a pass means something."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

from expertfuse.errors import UserError
from serve.deploy import KUBERNETES_VERSION, custom_resource_schema, emit
from serve.repository import ServingOptions, TensorSpec, model_config, write_model
from serve.server import DEFAULT_IMAGE
from tests.helpers import run_module

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return str(path)


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", str(path)],
                          capture_output=True, text=True)


def compose_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)


def crd_errors(document: dict) -> list[str]:
    """'path: message' for every violation of the custom resource's vendored CRD schema."""
    validator = Draft7Validator(custom_resource_schema(document))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def add_model(repo: Path, name: str, platform: str = "onnxruntime_onnx", kind: str = "cpu") -> None:
    """A model written by the repository writer (the artifact's content does not matter to a manifest)."""
    artifact = repo.parent / f"{name}.bin"
    artifact.write_bytes(b"\0" * 64)
    cfg = model_config(name, platform, [TensorSpec("image", "UINT8", [32, 32, 3], "NHWC")],
                       [TensorSpec("logits", "FP32", [10], labels=True)], ServingOptions(instance_kind=kind))
    write_model(repo, cfg, {"model.onnx" if platform == "onnxruntime_onnx" else "model.plan": artifact},
                labels=[str(i) for i in range(10)])


@pytest.fixture
def repository(tmp_path) -> Path:
    repo = tmp_path / "model_repository"
    add_model(repo, "ncl")
    add_model(repo, "ncl_expert0")
    return repo


def documents(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}


def test_kubernetes_manifests_pass_the_real_schemas_and_wire_triton_up(repository, tmp_path):
    files = emit("k8s", repository, tmp_path / "deploy", gpus=2, replicas=2, max_replicas=6)
    triton, monitor = files
    result = kubernetes_validate(triton)
    assert result.returncode == 0, result.stdout + result.stderr
    docs = documents(triton)
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"}
    pod = docs["Deployment"]["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["image"] == DEFAULT_IMAGE and "--model-repository=/models" in c["command"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and docs["Deployment"]["spec"]["replicas"] == 2
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] and volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert {p["name"] for p in docs["Service"]["spec"]["ports"]} == set(ports)
    assert docs["Service"]["spec"]["selector"] == pod["metadata"]["labels"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    # ServiceMonitor is Prometheus Operator's CRD: kubernetes-validate has no schema for it; the vendored one.
    assert crd_errors(documents(monitor)["ServiceMonitor"]) == []
    sm = documents(monitor)["ServiceMonitor"]["spec"]
    assert sm["selector"]["matchLabels"] == docs["Service"]["metadata"]["labels"]
    assert sm["endpoints"][0]["port"] in ports


def test_object_store_repository_replaces_the_volume(repository, tmp_path):
    triton, _ = emit("k8s", repository, tmp_path / "deploy", uri="s3://bucket/model_repository")
    assert kubernetes_validate(triton).returncode == 0
    docs = documents(triton)
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "--model-repository=s3://bucket/model_repository" in c["command"] and "PersistentVolumeClaim" not in docs
    assert "limits" not in c["resources"] and all(m["mountPath"] != "/models" for m in c["volumeMounts"])
    compose_file, = emit("compose", repository, tmp_path / "deploy", uri="gs://bucket/repo")
    assert compose_validate(compose_file).returncode == 0
    assert "GOOGLE_APPLICATION_CREDENTIALS" in yaml.safe_load(compose_file.read_text())["services"]["triton"]["environment"]


def test_kubernetes_validation_fails_on_a_broken_manifest(repository, tmp_path):
    triton, _ = emit("k8s", repository, tmp_path / "deploy")
    docs = list(yaml.safe_load_all(triton.read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = "two"
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/typo"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    result = kubernetes_validate(broken)
    assert result.returncode != 0 and "replicas" in result.stdout + result.stderr


def test_compose_file_passes_the_compose_spec_and_reserves_gpus(repository, tmp_path):
    out = tmp_path / "deploy"
    path, = emit("compose", repository, out, gpus=1)
    result = compose_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    triton = yaml.safe_load(path.read_text())["services"]["triton"]
    volume = triton["volumes"][0]
    assert volume["read_only"] and volume["target"] == "/models"
    assert (out / volume["source"]).resolve() == repository.resolve()  # relative: the folder moves with the manifests
    assert triton["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert triton["ports"] == ["8000:8000", "8001:8001", "8002:8002"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    cpu_only, = emit("compose", repository, tmp_path / "cpu", replicas=3)
    triton = yaml.safe_load(cpu_only.read_text())["services"]["triton"]
    assert "resources" not in triton["deploy"] and triton["ports"] == ["8000", "8001", "8002"]


def test_compose_validation_fails_on_a_broken_file(repository, tmp_path):
    path, = emit("compose", repository, tmp_path / "deploy", gpus=1)
    spec = yaml.safe_load(path.read_text())
    spec["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = 1.5
    spec["services"]["triton"]["healthcheck"]["url"] = "/v2/health/ready"
    path.write_text(yaml.safe_dump(spec))
    result = compose_validate(path)
    assert result.returncode != 0 and "healthcheck" in result.stdout + result.stderr


def test_serve_cli_emits_and_refuses_what_could_not_serve(repository, tmp_path):
    proc = run_module("serve", "--emit", "k8s", "--repository", str(repository), "--gpus", "1", "--out",
                      str(tmp_path / "k8s"))
    assert "triton.yaml" in proc.stdout and kubernetes_validate(tmp_path / "k8s" / "triton.yaml").returncode == 0
    add_model(repository, "ncl_trt", platform="tensorrt_plan", kind="gpu")
    proc = run_module("serve", "--emit", "compose", "--repository", str(repository), "--out", str(tmp_path / "c"),
                      check=False)
    assert proc.returncode == 2 and "ncl_trt" in proc.stderr and "--gpus" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "c" / "compose.yaml").exists()
    proc = run_module("serve", "--emit", "k8s", "--repository", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: model repository not found")
    proc = run_module("serve", "--emit", "k8s", "--repository", str(repository), "--gpus", "1",
                      "--repository-uri", "http://x/y", "--out", str(tmp_path / "u"), check=False)
    assert proc.returncode == 2 and "s3://" in proc.stderr


def test_autoscaler_bounds_that_contradict_are_refused(repository, tmp_path):
    for bounds in (["--replicas", "3", "--max-replicas", "2"], ["--max-replicas", "-1"], ["--max-replicas", "0"]):
        proc = run_module("serve", "--emit", "k8s", "--repository", str(repository), *bounds,
                          "--out", str(tmp_path / "k8s"), check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --max-replicas"), proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "k8s").exists()
    triton, _ = emit("k8s", repository, tmp_path / "k8s", replicas=3, max_replicas=3)
    assert kubernetes_validate(triton).returncode == 0
    assert documents(triton)["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 3


def test_kserve_inference_service_passes_its_crd_schema_and_runs_triton_as_the_k8s_emit_does(repository, tmp_path):
    image = "nvcr.io/nvidia/tritonserver:25.01-py3"
    manifest, = emit("kserve", repository, tmp_path / "kserve", image, gpus=2, replicas=2, max_replicas=6,
                     uri="s3://bucket/model_repository")
    isvc = documents(manifest)["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and crd_errors(isvc) == []
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["storageUri"] == "s3://bucket/model_repository"
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 6)
    triton, _ = emit("k8s", repository, tmp_path / "k8s", image, gpus=2)
    c = documents(triton)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == f"nvcr.io/nvidia/tritonserver:{model['runtimeVersion']}"
    assert model["resources"] == c["resources"]
    # KServe appends args to its runtime's own (repository /mnt/models, HTTP 8080, gRPC 9000): ours, less those.
    assert "--disable-auto-complete-config" in model["args"] and set(model["args"]) < set(c["command"])
    assert not any(a.startswith(("--model-repository", "--http-port", "--grpc-port")) for a in model["args"])
    on_claim, = emit("kserve", repository, tmp_path / "pvc", uri="pvc://expertfuse-models/model_repository")
    isvc = documents(on_claim)["InferenceService"]
    assert crd_errors(isvc) == [] and "limits" not in isvc["spec"]["predictor"]["model"]["resources"]
    assert isvc["spec"]["predictor"]["model"]["runtimeVersion"] == DEFAULT_IMAGE.rpartition(":")[2]
    assert (isvc["spec"]["predictor"]["minReplicas"], isvc["spec"]["predictor"]["maxReplicas"]) == (1, 4)


def test_crd_schemas_catch_a_misspelled_field_and_a_wrong_type(repository, tmp_path):
    manifest, = emit("kserve", repository, tmp_path / "kserve", uri="gs://bucket/model_repository")
    isvc = documents(manifest)["InferenceService"]
    isvc["spec"]["predictor"]["model"]["storageURI"] = isvc["spec"]["predictor"]["model"].pop("storageUri")
    isvc["spec"]["predictor"]["maxReplicas"] = "four"
    errors = crd_errors(isvc)
    assert any(e.startswith("spec.predictor.model:") and "'storageURI' was unexpected" in e for e in errors), errors
    assert any(e.startswith("spec.predictor.maxReplicas:") and "not of type 'integer'" in e for e in errors), errors
    _, monitor = emit("k8s", repository, tmp_path / "k8s")
    sm = documents(monitor)["ServiceMonitor"]
    sm["spec"]["endpoints"][0]["intervall"] = "30s"
    sm["spec"]["endpoints"][0]["port"] = 8002
    errors = crd_errors(sm)
    assert any(e.startswith("spec.endpoints.0:") and "'intervall' was unexpected" in e for e in errors), errors
    assert any(e.startswith("spec.endpoints.0.port:") and "not of type 'string'" in e for e in errors), errors


def test_kserve_cli_prints_the_runtime_ports_and_refuses_what_no_cluster_can_read(repository, tmp_path):
    proc = run_module("serve", "--emit", "kserve", "--repository", str(repository), "--repository-uri",
                      "s3://bucket/model_repository", "--out", str(tmp_path / "kserve"))
    urls = [word for word in proc.stdout.split() if "127.0.0.1:" in word]
    assert {f"http://127.0.0.1:8080/v2/models/{name}/infer" for name in ("ncl", "ncl_expert0")} <= set(urls)
    assert "127.0.0.1:9000" in urls and all(":8080" in u or ":9000" in u for u in urls), proc.stdout
    assert crd_errors(documents(tmp_path / "kserve" / "inferenceservice.yaml")["InferenceService"]) == []
    proc = run_module("serve", "--emit", "kserve", "--repository", str(repository), "--out", str(tmp_path / "local"),
                      check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--repository-uri s3://" in proc.stderr
    assert str(repository) in proc.stderr and not (tmp_path / "local").exists()
    refused = {"/data/model_repository": "no cluster can read the local path", "file:///data/repo": "local path",
               "as://account/repo": "s3://, gs:// or pvc://", "pvc://": "s3://, gs:// or pvc://"}
    for uri, reason in refused.items():
        with pytest.raises(UserError, match=reason):
            emit("kserve", repository, tmp_path / "refused", uri=uri)
    for image in ("my.registry/tritonserver:24.10-py3", "nvcr.io/nvidia/tritonserver"):
        with pytest.raises(UserError, match="may change only its tag"):
            emit("kserve", repository, tmp_path / "refused", image, uri="s3://b/r")
    with pytest.raises(UserError, match="fixes its ports"):
        emit("kserve", repository, tmp_path / "refused", ports={"http": 8080, "grpc": 9000, "metrics": 8002},
             uri="s3://b/r")
    for replicas, max_replicas in ((3, 2), (1, -1)):
        with pytest.raises(UserError, match="--max-replicas must be >= --replicas"):
            emit("kserve", repository, tmp_path / "refused", replicas=replicas, max_replicas=max_replicas,
                 uri="s3://b/r")
    assert not (tmp_path / "refused").exists()

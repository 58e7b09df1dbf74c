"""infra/ checked statically (no docker, no cluster): the compose files, the Kubernetes manifests,
the work-pool templates and the Dockerfile parse, and refer only to images, ports, environment
variables, routes, pins and secrets that exist. Every rule is also fed a small bad document, so
each can fail, and names the file and the offending item when it does."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
K8S = INFRA / "k8s"
COMPOSE_FILES = ["compose.yaml", "compose.gpu.yaml"]
SECRET_NAME = "mnemo-secrets"
PROJECT_IMAGE_K8S = "mnemo"  # kustomization.yaml `images:` gives it registry and tag
PLACEHOLDER = "change-me"
SECRETISH = re.compile(r"PASSWORD|SECRET|KEY|TOKEN")
CREDENTIALS_IN_URL = re.compile(r"://[^:/@\s]+:(\$\{[^}]*\}|[^@\s/]+)@")  # ://user:password@
INTERPOLATION = re.compile(r"\$\{[^}]*\}")
URL_HOST_PORT = re.compile(r"://(?:[^@/\s]*@)?([A-Za-z0-9.-]+):(\d+)")

# Variables the engines read, beyond mnemo's own (collected from its source below). PREFECT_* and
# MLFLOW_* names are checked against the installed packages; these AWS names are read by boto3
# (MLflow's S3 artifact store) and by lance's object_store (LanceDB on S3).
AWS_NAMES = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ALLOW_HTTP",
}
MLFLOW_SOURCES = ["environment_variables.py", "cli/__init__.py", "utils/cli_args.py"]


# -- reading the project ----------------------------------------------------------------------


def _pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` in a requirements-style text (pyproject, constraints)."""
    return {
        m[1].lower(): m[2] for m in re.finditer(r"^\s*\"?([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s\";,]+)", text, re.M)
    }


PYPROJECT = (REPO / "pyproject.toml").read_text()
PINS = _pins(PYPROJECT)
CONSTRAINTS = _pins((REPO / "constraints.txt").read_text())
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M)[1]
SERVE_PORT = yaml.safe_load((REPO / "params.yaml").read_text())["serve"]["port"]


def project_env_names() -> set[str]:
    """Environment variables mnemo's own code reads: os.environ.get / [] / getenv, typer envvar=."""
    names: set[str] = set()
    pattern = re.compile(r"""(?:environ\.get\(|environ\[|getenv\(|envvar=)\s*["']([A-Z][A-Z0-9_]+)["']""")
    for path in [*REPO.glob("components/**/*.py"), *REPO.glob("flows/**/*.py")]:
        names |= set(pattern.findall(path.read_text()))
    from components.workspace import Settings  # the one reader of MNEMO_* (pydantic-settings)

    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else (prefix + name).upper())
    return names


def engine_reads(name: str) -> bool:
    """Whether Prefect, MLflow, boto3 or lance reads `name` (the installed Prefect and MLflow say so)."""
    if name.startswith("PREFECT_"):
        import prefect.settings

        try:
            getattr(prefect.settings, name)
        except AttributeError:
            return False
        return True
    if name.startswith("MLFLOW_"):
        from importlib.util import find_spec

        root = Path(find_spec("mlflow").origin).parent  # read, not imported: importing mlflow takes seconds
        return any(f'"{name}"' in (root / rel).read_text() for rel in MLFLOW_SOURCES)
    return name in AWS_NAMES


def routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every route components/serving/app.py declares on the FastAPI app."""
    found = set()
    for node in ast.walk(ast.parse((REPO / "components/serving/app.py").read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "app"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add((node.func.attr.upper(), node.args[0].value))
    return found


# -- shared rules -----------------------------------------------------------------------------


def image_problems(image: str, where: str, project_images: set[str]) -> list[str]:
    """The project's image, or an upstream image pinned to an explicit tag (or digest), never latest."""
    if image in project_images or "@sha256:" in image:
        return []
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    if not tag:
        return [f"{where}: image {image!r} has no tag: pin one"]
    if tag == "latest" or "$" in tag:
        return [f"{where}: image {image!r} is not pinned: name an explicit tag"]
    if name.endswith("prefecthq/prefect") and not tag.startswith(f"{PINS['prefect']}-python3.11"):
        return [f"{where}: image {image!r}: Prefect must be the pinned {PINS['prefect']} on python3.11"]
    return []


def env_problems(names: list[str], where: str, known: set[str]) -> list[str]:
    """Every variable a mnemo container gets must be one mnemo or its engines read."""
    return [
        f"{where}: {name} is not an environment variable mnemo or its engines read"
        for name in names
        if name not in known and not engine_reads(name)
    ]


def secret_value_problems(name: str, value: Any, where: str) -> list[str]:
    """A secret-looking variable holds a ${...} reference; a URL carries no literal password."""
    if not isinstance(value, str):
        return []
    if SECRETISH.search(name) and not re.fullmatch(r"\$\{[^}]+\}", value.strip()):
        return [f"{where}: {name} holds a literal value: reference a secret instead"]
    m = CREDENTIALS_IN_URL.search(value)
    if m and not m[1].startswith("${"):
        return [f"{where}: {name} has a password in its URL: reference a secret instead"]
    return []


def listening(command: list[str], image: str) -> tuple[set[int], bool]:
    """The TCP ports a container's command listens on (its flags, else the program's default), and
    whether it listens on all interfaces, as a port reached from outside the container must."""

    def flag(name: str, default: str | None = None) -> str | None:
        return command[command.index(name) + 1] if name in command else default

    servers = {("mnemo", "serve"): SERVE_PORT, ("mlflow", "server"): 5000, ("prefect", "server"): 4200}
    for prefix, default in servers.items():
        if tuple(command[:2]) == prefix:
            return {int(flag("--port", str(default)))}, flag("--host") == "0.0.0.0"
    if command[:2] == ["dask", "scheduler"]:  # its port and its dashboard's
        dashboard = flag("--dashboard-address", ":8787") or ":8787"
        return {int(flag("--port", "8786") or 8786), int(dashboard.rsplit(":", 1)[1])}, flag("--host") == "0.0.0.0"
    if command[:3] == ["prefect", "worker", "start"]:
        return ({8080} if "--with-healthcheck" in command else set()), True
    if image.startswith("postgres:"):
        return {5432}, True
    if image.startswith("minio/minio:"):
        ports = {flag("--address", ":9000"), flag("--console-address")} - {None}
        return {int(p.rsplit(":", 1)[1]) for p in ports}, True
    return set(), True


# -- compose ----------------------------------------------------------------------------------


def load_compose(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def compose_project_image(compose: dict) -> str:
    return compose["x-mnemo"]["image"]


def _command(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value or []]


def _environment(service: dict) -> dict[str, Any]:
    env = service.get("environment") or {}
    return dict(item.split("=", 1) if "=" in item else (item, None) for item in env) if isinstance(env, list) else env


def _container_port(mapping: Any) -> int:
    return int(mapping["target"]) if isinstance(mapping, dict) else int(str(mapping).split("/")[0].rsplit(":", 1)[-1])


def _host_port(mapping: Any) -> int | None:
    if isinstance(mapping, dict):
        return int(mapping["published"]) if "published" in mapping else None
    parts = str(mapping).split("/")[0].split(":")
    return int(parts[-2]) if len(parts) > 1 else None


def compose_problems(compose: dict, file: str, project_images: set[str], known_env: set[str]) -> list[str]:
    """Images, env names, ports, health checks and secrets of one compose file."""
    problems: list[str] = []
    services = compose.get("services", {})
    listens = {name: listening(_command(s.get("command")), s.get("image", "")) for name, s in services.items()}
    published = {_host_port(p) for s in services.values() for p in s.get("ports", [])} - {None}
    for name, service in services.items():
        where = f"{file}: services.{name}"
        image = service.get("image")
        if image is not None:
            problems += image_problems(image, where, project_images)
        env = _environment(service)
        if image in project_images:
            problems += env_problems(list(env), where, known_env)
        for key, value in env.items():
            problems += secret_value_problems(key, value, where)
            for host, port in URL_HOST_PORT.findall(INTERPOLATION.sub("x", str(value))):
                if host in ("localhost", "127.0.0.1"):
                    if int(port) not in published:
                        problems.append(f"{where}: {key} points at localhost:{port}, which no service publishes")
                elif host not in services:
                    problems.append(f"{where}: {key} points at {host}:{port}, but there is no service {host!r}")
                elif int(port) not in listens[host][0]:
                    problems.append(
                        f"{where}: {key} points at {host}:{port}, but {host} listens on {sorted(listens[host][0])}"
                    )
        ports, all_interfaces = listens[name]
        exposed = [_container_port(p) for p in service.get("ports", [])]
        test = " ".join(_command((service.get("healthcheck") or {}).get("test")))
        checked = [int(p) for p in re.findall(r"http://(?:127\.0\.0\.1|localhost):(\d+)", test)]
        for port in exposed + checked:
            if port not in ports:
                problems.append(f"{where}: port {port} is not one its command listens on ({sorted(ports) or 'none'})")
        if exposed and not all_interfaces:
            problems.append(f"{where}: publishes a port but its command does not listen on 0.0.0.0 (--host)")
        if _command(service.get("command"))[:2] == ["mnemo", "serve"]:
            for path in re.findall(r"http://[^/'\"]+(/[^'\")\s]*)", test):
                if ("GET", path) not in routes():
                    problems.append(f"{where}: health check GET {path} is not a route of the query service")
    return problems


def env_file_problems(text: str, file: str) -> list[str]:
    """The committed example holds placeholders only for anything secret."""
    problems = []
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = (part.strip() for part in line.split("=", 1))
            if SECRETISH.search(key) and value != PLACEHOLDER:
                problems.append(f"{file}: {key} must be the placeholder {PLACEHOLDER!r}, not a value")
    return problems


# -- Kubernetes -------------------------------------------------------------------------------


def load_k8s() -> list[tuple[str, dict]]:
    """(file, document) for every document of every infra/k8s/*.yaml but the kustomization."""
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def pod_specs(docs: list[tuple[str, dict]]) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod spec, pod labels) of every workload."""
    for file, doc in docs:
        template = (doc.get("spec") or {}).get("template")
        if template:
            yield (
                f"{file}: {doc['kind']} {doc['metadata']['name']}",
                template["spec"],
                template.get("metadata", {}).get("labels", {}),
            )


def secret_keys_documented() -> set[str]:
    """The keys of mnemo-secrets that infra/README.md's `kubectl create secret` command sets."""
    readme = (INFRA / "README.md").read_text()
    block = readme[readme.index(f"create secret generic {SECRET_NAME}") :]
    block = block[: block.index("```")]
    return set(re.findall(r"--from-literal=([A-Z_]+)=", block))


def container_problems(
    container: dict,
    pod: dict,
    where: str,
    *,
    project_images: set[str],
    known_env: set[str],
    configmaps: dict[str, set[str]],
    claims: set[str],
    secret_keys: set[str],
) -> list[str]:
    """One container (a workload's, or a work-pool job's): image, env names and sources, volumes."""
    where = f"{where}: {container['name']}"
    problems = image_problems(container["image"], where, project_images) if "{{" not in container["image"] else []
    env = container.get("env") if isinstance(container.get("env"), list) else []
    names = [e["name"] for e in env]
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]["name"]
            if ref not in configmaps:
                problems.append(f"{where}: envFrom ConfigMap {ref!r} is not declared")
            names += sorted(configmaps.get(ref, ()))
        else:
            problems.append(f"{where}: envFrom {sorted(source)} hands over every key: name each secret key instead")
    if container["image"] in project_images or container["image"] == "{{ image }}":
        problems += env_problems(names, where, known_env)
    for e in env:
        ref = e.get("valueFrom") or {}
        if "secretKeyRef" in ref:
            name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            if name != SECRET_NAME or key not in secret_keys:
                problems.append(
                    f"{where}: {e['name']} reads {name}/{key}, which the README's secret command does not create"
                )
        elif "configMapKeyRef" in ref:
            name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
            if key not in configmaps.get(name, ()):
                problems.append(f"{where}: {e['name']} reads ConfigMap {name}/{key}, which is not declared")
        else:
            problems += secret_value_problems(e["name"], e.get("value"), where)
    mounts = {m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in sorted(mounts - set(volumes)):
        problems.append(f"{where}: mounts volume {mount!r}, which the pod does not define")
    for volume in volumes.values():
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and claim not in claims:
            problems.append(f"{where}: PersistentVolumeClaim {claim!r} is not declared")
        if "configMap" in volume and volume["configMap"]["name"] not in configmaps:
            problems.append(f"{where}: ConfigMap volume {volume['configMap']['name']!r} is not declared")
    return problems


def k8s_problems(
    docs: list[tuple[str, dict]],
    *,
    project_images: set[str],
    known_env: set[str],
    configmaps: dict[str, set[str]],
    secret_keys: set[str],
) -> list[str]:
    """Workloads, Services, probes and secrets of the manifests."""
    problems: list[str] = []
    claims = {doc["metadata"]["name"] for _, doc in docs if doc["kind"] == "PersistentVolumeClaim"}
    services = {doc["metadata"]["name"]: doc for _, doc in docs if doc["kind"] == "Service"}
    for file, doc in docs:
        if doc["kind"] == "Secret":
            problems.append(f"{file}: Secret {doc['metadata']['name']}: secrets are created by hand, never committed")
        if doc["kind"] == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                if SECRETISH.search(key) or CREDENTIALS_IN_URL.search(str(value)):
                    problems.append(f"{file}: ConfigMap {doc['metadata']['name']}: {key} belongs in {SECRET_NAME}")
                problems += url_problems(key, str(value), f"{file}: ConfigMap {doc['metadata']['name']}", services)
    pods = list(pod_specs(docs))
    for where, pod, _labels in pods:
        for container in pod["containers"]:
            problems += container_problems(
                container,
                pod,
                where,
                project_images=project_images,
                known_env=known_env,
                configmaps=configmaps,
                claims=claims,
                secret_keys=secret_keys,
            )
            ports, all_interfaces = listening(
                _command(container.get("command") or container.get("args")), container["image"]
            )
            named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            for p in container.get("ports", []):
                if p["containerPort"] not in ports:
                    problems.append(
                        f"{where}: containerPort {p['containerPort']} is not one its command listens on ({sorted(ports) or 'none'})"
                    )
            if named and not all_interfaces:
                problems.append(f"{where}: declares a port but its command does not listen on 0.0.0.0 (--host)")
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(kind) or {}
                check = probe.get("httpGet") or probe.get("tcpSocket")
                if check and named.get(check["port"], check["port"]) not in ports:
                    problems.append(f"{where}: {kind} port {check['port']} is not one it listens on")
            for e in container.get("env", []):
                problems += url_problems(e["name"], str(e.get("value", "")), where, services)
    for name, service in services.items():
        targets = [
            (w, c)
            for w, pod, labels in pods
            for c in pod["containers"]
            if service["spec"]["selector"].items() <= labels.items()
        ]
        if not targets:
            problems.append(f"Service {name}: its selector matches no workload")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(target in (p.get("name"), p["containerPort"]) for _, c in targets for p in c.get("ports", [])):
                problems.append(f"Service {name}: targetPort {target} is no port of the pods it selects")
    return problems


def url_problems(key: str, value: str, where: str, services: dict[str, dict]) -> list[str]:
    """http://<service>:<port> must name a declared Service and one of its ports."""
    problems = []
    for host, port in URL_HOST_PORT.findall(value):
        service = services.get(host.split(".")[0])
        if host in ("localhost", "127.0.0.1"):  # through `kubectl port-forward svc/...`
            service_ports = {p["port"] for s in services.values() for p in s["spec"]["ports"]}
        elif service is None:
            problems.append(f"{where}: {key} points at {host}:{port}, but there is no Service {host.split('.')[0]!r}")
            continue
        else:
            service_ports = {p["port"] for p in service["spec"]["ports"]}
        if int(port) not in service_ports:
            problems.append(f"{where}: {key} points at {host}:{port}, a port no Service offers")
    return problems


def query_probe_problems(docs: list[tuple[str, dict]]) -> list[str]:
    """The query service is ready exactly when GET /health says so: a real route of the app."""
    problems = []
    for where, pod, _ in pod_specs(docs):
        for container in pod["containers"]:
            if _command(container.get("command"))[:2] != ["mnemo", "serve"]:
                continue
            path = ((container.get("readinessProbe") or {}).get("httpGet") or {}).get("path")
            if path != "/health" or ("GET", path) not in routes():
                problems.append(f"{where}: readiness must be GET /health of the query service, found {path!r}")
    return problems


def work_pool_problems(template: dict, file: str, *, gpu: bool, **context: Any) -> list[str]:
    """A Prefect Kubernetes base job template: a valid variables schema with an `image` variable (for
    `mnemo deploy --image`), and a job that, rendered as the worker renders it, runs a mnemo
    container with the workspace volume, mnemo-config and the S3 keys, and a GPU only on the GPU pool."""
    from jsonschema import Draft202012Validator
    from prefect.utilities.templating import apply_values

    problems = []
    variables = template["variables"]
    Draft202012Validator.check_schema(variables)
    if "image" not in variables["properties"]:
        problems.append(f"{file}: no `image` variable: `mnemo deploy --image` could not set the mnemo image")
    values = {k: v.get("default") for k, v in variables["properties"].items()} | {"image": "{{ image }}", "env": {}}
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    problems += container_problems(container, pod, file, **context)
    resources = container.get("resources", {})
    gpus = [resources.get(part, {}).get("nvidia.com/gpu") for part in ("requests", "limits")]
    if gpu and gpus != [1, 1]:
        problems.append(f"{file}: the training job must request and limit nvidia.com/gpu: 1, found {gpus}")
    if not gpu and any(gpus):
        problems.append(f"{file}: only the GPU pool's jobs may ask for a GPU")
    return problems


def kustomization_problems(kustomization: dict) -> list[str]:
    """Every manifest is applied, every referenced file exists, the project image is named once, by version."""
    problems = []
    listed = set(kustomization.get("resources", []))
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    problems += [
        f"kustomization.yaml: {f} is not in resources: `kubectl apply -k` would leave it out"
        for f in sorted(on_disk - listed)
    ]
    problems += [f"kustomization.yaml: resource {f} does not exist" for f in sorted(listed - on_disk)]
    for generator in kustomization.get("configMapGenerator", []):
        problems += [
            f"kustomization.yaml: {f} does not exist" for f in generator.get("files", []) if not (K8S / f).is_file()
        ]
    images = [i for i in kustomization.get("images", []) if i["name"] == PROJECT_IMAGE_K8S]
    if len(images) != 1 or str(images[0].get("newTag")) != VERSION:
        problems.append(
            f"kustomization.yaml: images must name {PROJECT_IMAGE_K8S!r} once, tagged {VERSION} (pyproject)"
        )
    return problems


# -- Dockerfile -------------------------------------------------------------------------------


def dockerfile_problems(text: str, file: str = "Dockerfile") -> list[str]:
    """Pinned base, the pinned set installed through constraints.txt, non-root, a workspace."""
    problems = []
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instructions = [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), v.split()[0]) for k, v in instructions if k == "FROM"
    ]
    for base in bases:
        problems += image_problems(base, f"{file}: FROM", set())
        if base.startswith("python:") and not base.split(":")[1].startswith("3.11"):
            problems.append(f"{file}: FROM {base}: mnemo needs Python 3.11 (pyproject requires-python)")
    copied = " ".join(v for k, v in instructions if k == "COPY")
    for needed in ("pyproject.toml", "constraints.txt"):
        if needed not in copied:
            problems.append(f"{file}: {needed} is never copied into the image")
    installs = [
        cmd.strip() for k, v in instructions if k == "RUN" for cmd in re.split(r"&&|;", v) if "pip install" in cmd
    ]
    project_installed = False
    for cmd in installs:
        words = shlex.split(cmd)[shlex.split(cmd).index("install") + 1 :]
        targets = [w for w in words if not w.startswith("-") and w != "constraints.txt"]
        if targets and all(t.startswith("pip==") for t in targets):
            if targets != [f"pip=={_makefile_pip()}"]:
                problems.append(f"{file}: `{cmd}`: pip must be the Makefile's pip=={_makefile_pip()}")
            continue
        if "-c constraints.txt" not in cmd and "--constraint constraints.txt" not in cmd:
            problems.append(f"{file}: `{cmd}` does not install through -c constraints.txt")
        project_installed |= "." in targets
        for target in (t for t in targets if t != "."):
            name = re.split(r"[=<>\[]", target)[0].lower()
            if name not in CONSTRAINTS:
                problems.append(f"{file}: `{cmd}` installs {name}, which constraints.txt does not pin")
    if not project_installed:
        problems.append(f"{file}: mnemo itself (`pip install ... .`, pyproject.toml) is never installed")
    for name, version in re.findall(r"\b(torch|torchvision)==([\w.+]+)", text):
        if version != PINS[name]:
            problems.append(f"{file}: {name}=={version}, but pyproject pins {name}=={PINS[name]}")
    users = [v.split(":")[0] for k, v in instructions if k == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append(f"{file}: the image must end as a non-root USER")
    if not any(k == "WORKDIR" for k, _ in instructions):
        problems.append(f"{file}: no WORKDIR")
    if not re.search(r"^ENV\s+MNEMO_WORKSPACE=\S+", text, re.M):
        problems.append(f"{file}: no ENV MNEMO_WORKSPACE")
    return problems


def _makefile_pip() -> str:
    return re.search(r"pip==([\d.]+)", (REPO / "Makefile").read_text())[1]


# -- the tests --------------------------------------------------------------------------------


def assert_none(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def known_env() -> set[str]:
    return project_env_names()


@pytest.fixture(scope="module")
def k8s_context() -> dict[str, Any]:
    docs = load_k8s()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    configmaps = {doc["metadata"]["name"]: set(doc.get("data") or {}) for _, doc in docs if doc["kind"] == "ConfigMap"}
    configmaps |= {
        g["name"]: {Path(f).name for f in g.get("files", [])} for g in kustomization.get("configMapGenerator", [])
    }
    return {
        "docs": docs,
        "kustomization": kustomization,
        "configmaps": configmaps,
        "secret_keys": secret_keys_documented(),
    }


def _k8s_args(ctx: dict[str, Any], known_env: set[str]) -> dict[str, Any]:
    return {
        "project_images": {PROJECT_IMAGE_K8S},
        "known_env": known_env,
        "configmaps": ctx["configmaps"],
        "secret_keys": ctx["secret_keys"],
    }


def test_the_collected_env_names_are_real(known_env):
    assert {"MNEMO_WORKSPACE", "MNEMO_LANCEDB_URI", "MNEMO_PARAMS", "MLFLOW_TRACKING_URI"} <= known_env
    assert (
        engine_reads("PREFECT_API_URL") and engine_reads("MLFLOW_BACKEND_STORE_URI") and engine_reads("AWS_ALLOW_HTTP")
    )
    assert not engine_reads("PREFECT_API_URI") and not engine_reads("MLFLOW_TRACKING_URL")
    assert {("GET", "/health"), ("GET", "/live"), ("POST", "/query")} <= routes()


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_refer_only_to_what_exists(name, known_env):
    compose = load_compose(name)
    main = load_compose("compose.yaml")
    images = {compose_project_image(main)}
    assert re.fullmatch(r"\$\{MNEMO_IMAGE:-mnemo:" + re.escape(VERSION) + r"\}", compose_project_image(main))
    assert_none(compose_problems(compose, name, images, known_env))


def test_compose_runs_every_part_from_the_one_project_image():
    compose = load_compose("compose.yaml")
    services = compose["services"]
    project = compose_project_image(compose)
    assert {"prefect-server", "worker", "mlflow", "query", "deploy"} <= {
        n for n, s in services.items() if s["image"] == project
    }
    assert services["query"]["command"] == ["mnemo", "serve", "--host", "0.0.0.0", "--port", str(SERVE_PORT)]
    assert services["worker"]["command"][:3] == ["prefect", "worker", "start"]
    assert (
        "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    )
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert services["worker"]["environment"]["MNEMO_LANCEDB_URI"].startswith("s3://")


def test_compose_secrets_come_from_the_git_ignored_env_file():
    example = (INFRA / ".env.example").read_text()
    assert_none(env_file_problems(example, ".env.example"))
    assert "infra/.env" in (REPO / ".gitignore").read_text().splitlines()
    referenced = set(re.findall(r"\$\{(\w+)", (INFRA / "compose.yaml").read_text()))
    defined = set(re.findall(r"^(\w+)=", example, re.M))
    assert referenced <= defined, f"compose.yaml uses {sorted(referenced - defined)}, which .env.example does not list"
    assert re.search(r"^MNEMO_IMAGE=mnemo:" + re.escape(VERSION) + "$", example, re.M)


def test_kubernetes_manifests_refer_only_to_what_exists(k8s_context, known_env):
    assert_none(kustomization_problems(k8s_context["kustomization"]))
    assert_none(k8s_problems(k8s_context["docs"], **_k8s_args(k8s_context, known_env)))
    assert_none(query_probe_problems(k8s_context["docs"]))


def test_kubernetes_runs_the_query_service_the_mlflow_server_and_workers_for_both_pools(k8s_context):
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_context["docs"]}
    assert {
        ("Deployment", "mnemo-query"),
        ("Service", "mnemo-query"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("Deployment", "prefect-worker-cpu"),
        ("Deployment", "prefect-worker-gpu"),
    } <= kinds
    pools = {}
    for _where, pod, _ in pod_specs(k8s_context["docs"]):
        args = pod["containers"][0].get("args") or []
        if "--pool" in args:
            pools[args[args.index("--pool") + 1]] = args[args.index("--base-job-template") + 1]
    assert pools == {"mnemo-cpu": "/etc/mnemo/work-pools/cpu.json", "mnemo-gpu": "/etc/mnemo/work-pools/gpu.json"}


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_work_pool_templates_render_a_mnemo_job(name, k8s_context, known_env):
    template = json.loads((K8S / "work-pools" / f"{name}.json").read_text())
    claims = {doc["metadata"]["name"] for _, doc in k8s_context["docs"] if doc["kind"] == "PersistentVolumeClaim"}
    context = _k8s_args(k8s_context, known_env) | {"claims": claims}
    assert_none(work_pool_problems(template, f"{name}.json", gpu=name == "gpu", **context))
    assert template["variables"]["properties"]["namespace"]["default"] == k8s_context["kustomization"]["namespace"]


def test_the_gpu_pools_jobs_ask_for_the_gpus_a_deployment_names():
    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "work-pools" / "gpu.json").read_text())
    values = {k: v.get("default") for k, v in template["variables"]["properties"].items()} | {"gpus": 4}
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 4


def test_dockerfile_installs_the_pinned_set_as_a_non_root_user():
    assert_none(dockerfile_problems((INFRA / "Dockerfile").read_text(), "infra/Dockerfile"))
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", (INFRA / "Dockerfile").read_text(), re.M):
        for path in source.split():
            assert f"!{path.rstrip('/')}" in ignore or f"!{path}" in ignore, (
                f"{path} is copied but excluded by the .dockerignore"
            )


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed: the kustomize build is not checked"
)
def test_kustomize_builds_the_manifests_with_the_project_image(k8s_context):
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    entry = next(i for i in k8s_context["kustomization"]["images"] if i["name"] == PROJECT_IMAGE_K8S)
    images = {
        c["image"]
        for doc in docs
        if (doc.get("spec") or {}).get("template")
        for c in doc["spec"]["template"]["spec"]["containers"]
    }
    assert f"{entry['newName']}:{entry['newTag']}" in images and PROJECT_IMAGE_K8S not in images
    assert {doc["metadata"].get("namespace") for doc in docs} == {k8s_context["kustomization"]["namespace"]}
    pools = next(doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "mnemo-work-pools")
    assert {name: json.loads(text) for name, text in pools["data"].items()} == {
        name: json.loads((K8S / "work-pools" / name).read_text()) for name in ("cpu.json", "gpu.json")
    }


# -- every rule can fail ----------------------------------------------------------------------

PROJECT = "${MNEMO_IMAGE:-mnemo:0.1.0}"


def _one_service(**service: Any) -> dict:
    return {
        "services": {
            "query": {"image": PROJECT, "command": ["mnemo", "serve", "--host", "0.0.0.0", "--port", "8000"]} | service,
            "mlflow": {"image": PROJECT, "command": ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]},
        }
    }


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (
            {"environment": {"MNEMO_LANCEDB_URL": "s3://b/l"}},
            "bad.yaml: services.query: MNEMO_LANCEDB_URL is not an environment variable",
        ),
        ({"environment": {"PREFECT_API_URI": "x"}}, "PREFECT_API_URI is not an environment variable"),
        ({"image": "postgres:latest", "command": None}, "image 'postgres:latest' is not pinned"),
        ({"image": "minio/minio", "command": None}, "image 'minio/minio' has no tag"),
        ({"ports": ["8080:8080"]}, "port 8080 is not one its command listens on ([8000])"),
        ({"command": ["mnemo", "serve", "--port", "8000"], "ports": ["8000:8000"]}, "does not listen on 0.0.0.0"),
        (
            {"environment": {"MLFLOW_TRACKING_URI": "http://mlflow:5001"}},
            "points at mlflow:5001, but mlflow listens on [5000]",
        ),
        ({"environment": {"MLFLOW_TRACKING_URI": "http://tracking:5000"}}, "there is no service 'tracking'"),
        ({"healthcheck": {"test": ["CMD", "curl", "http://127.0.0.1:8000/healthz"]}}, "GET /healthz is not a route"),
        ({"environment": {"AWS_SECRET_ACCESS_KEY": "hunter22"}}, "AWS_SECRET_ACCESS_KEY holds a literal value"),
        ({"environment": {"MLFLOW_TRACKING_URI": "http://u:hunter22@mlflow:5000"}}, "has a password in its URL"),
    ],
)
def test_compose_rules_report_a_bad_document(service, expected, known_env):
    problems = compose_problems(_one_service(**service), "bad.yaml", {PROJECT}, known_env)
    assert any(expected in p for p in problems), problems


def test_env_example_with_a_real_secret_is_reported():
    assert env_file_problems("POSTGRES_PASSWORD=hunter22\nMNEMO_BUCKET=mnemo\n", ".env.example") == [
        ".env.example: POSTGRES_PASSWORD must be the placeholder 'change-me', not a value"
    ]


def _k8s_doc(container: dict, **pod: Any) -> list[tuple[str, dict]]:
    base = {
        "name": "query",
        "image": "mnemo",
        "command": ["mnemo", "serve", "--host", "0.0.0.0", "--port", "8000"],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
    }
    deployment = {
        "kind": "Deployment",
        "metadata": {"name": "mnemo-query"},
        "spec": {"template": {"metadata": {"labels": {"app": "q"}}, "spec": {"containers": [base | container]} | pod}},
    }
    service = {
        "kind": "Service",
        "metadata": {"name": "mnemo-query"},
        "spec": {"selector": {"app": "q"}, "ports": [{"port": 8000, "targetPort": "http"}]},
    }
    return [("bad.yaml", deployment), ("bad.yaml", service)]


@pytest.mark.parametrize(
    ("container", "pod", "expected"),
    [
        (
            {"env": [{"name": "MNEMO_WORKSPACES", "value": "/w"}]},
            {},
            "bad.yaml: Deployment mnemo-query: query: MNEMO_WORKSPACES is not an environment variable",
        ),
        ({"image": "prefecthq/prefect:3-latest"}, {}, "Prefect must be the pinned"),
        ({"image": "mlflow:latest"}, {}, "is not pinned"),
        ({"readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}, {}, "readiness must be GET /health"),
        (
            {"readinessProbe": {"httpGet": {"path": "/health", "port": 8080}}},
            {},
            "readinessProbe port 8080 is not one it listens on",
        ),
        (
            {"ports": [{"name": "http", "containerPort": 8080}]},
            {},
            "containerPort 8080 is not one its command listens on",
        ),
        (
            {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter22"}]},
            {},
            "AWS_SECRET_ACCESS_KEY holds a literal value",
        ),
        (
            {
                "env": [
                    {
                        "name": "AWS_ACCESS_KEY_ID",
                        "valueFrom": {"secretKeyRef": {"name": "other", "key": "AWS_ACCESS_KEY_ID"}},
                    }
                ]
            },
            {},
            "reads other/AWS_ACCESS_KEY_ID, which the README's secret command does not create",
        ),
        ({"envFrom": [{"secretRef": {"name": SECRET_NAME}}]}, {}, "hands over every key"),
        ({"envFrom": [{"configMapRef": {"name": "nowhere"}}]}, {}, "envFrom ConfigMap 'nowhere' is not declared"),
        (
            {"env": [{"name": "MLFLOW_TRACKING_URI", "value": "http://tracking:5000"}]},
            {},
            "there is no Service 'tracking'",
        ),
        (
            {"volumeMounts": [{"name": "ws", "mountPath": "/workspace"}]},
            {},
            "mounts volume 'ws', which the pod does not define",
        ),
        (
            {},
            {"volumes": [{"name": "ws", "persistentVolumeClaim": {"claimName": "nowhere"}}]},
            "PersistentVolumeClaim 'nowhere' is not declared",
        ),
    ],
)
def test_kubernetes_rules_report_a_bad_document(container, pod, expected, k8s_context, known_env):
    docs = _k8s_doc(container, **pod)
    problems = k8s_problems(docs, **_k8s_args(k8s_context, known_env)) + query_probe_problems(docs)
    assert any(expected in p for p in problems), problems


def test_kubernetes_secrets_and_orphan_services_are_reported(k8s_context, known_env):
    docs = _k8s_doc({}) + [
        ("bad.yaml", {"kind": "Secret", "metadata": {"name": SECRET_NAME}, "stringData": {"x": "y"}}),
        (
            "bad.yaml",
            {
                "kind": "Service",
                "metadata": {"name": "lost"},
                "spec": {"selector": {"app": "none"}, "ports": [{"port": 1}]},
            },
        ),
        ("bad.yaml", {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"POSTGRES_PASSWORD": "x"}}),
    ]
    problems = k8s_problems(docs, **_k8s_args(k8s_context, known_env))
    assert any("secrets are created by hand, never committed" in p for p in problems)
    assert any("Service lost: its selector matches no workload" in p for p in problems)
    assert any("POSTGRES_PASSWORD belongs in mnemo-secrets" in p for p in problems)


def test_a_work_pool_template_without_the_gpu_or_the_image_is_reported(k8s_context, known_env):
    claims = {doc["metadata"]["name"] for _, doc in k8s_context["docs"] if doc["kind"] == "PersistentVolumeClaim"}
    context = _k8s_args(k8s_context, known_env) | {"claims": claims}
    gpu = json.loads((K8S / "work-pools" / "gpu.json").read_text())
    del gpu["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ]
    del gpu["variables"]["properties"]["image"]
    problems = work_pool_problems(gpu, "gpu.json", gpu=True, **context)
    assert any("must request and limit nvidia.com/gpu: 1" in p for p in problems)
    assert any("no `image` variable" in p for p in problems)
    cpu = json.loads((K8S / "work-pools" / "gpu.json").read_text())
    assert any(
        "only the GPU pool's jobs may ask for a GPU" in p
        for p in work_pool_problems(cpu, "cpu.json", gpu=False, **context)
    )


def test_kustomization_that_leaves_a_manifest_out_is_reported(k8s_context):
    kustomization = dict(k8s_context["kustomization"], resources=["config.yaml", "gone.yaml"], images=[])
    problems = kustomization_problems(kustomization)
    assert "kustomization.yaml: query.yaml is not in resources: `kubectl apply -k` would leave it out" in problems
    assert "kustomization.yaml: resource gone.yaml does not exist" in problems
    assert any("images must name 'mnemo' once" in p for p in problems)


@pytest.mark.parametrize(
    ("dockerfile", "expected"),
    [
        (
            "FROM python:3.11-slim\nWORKDIR /app\nCOPY pyproject.toml constraints.txt ./\nRUN pip install .\nENV MNEMO_WORKSPACE=/w\nUSER 10001\n",
            "`pip install .` does not install through -c constraints.txt",
        ),
        ("FROM python:latest\n", "image 'python:latest' is not pinned"),
        ("FROM python:3.12-slim\n", "mnemo needs Python 3.11"),
        (
            "FROM python:3.11-slim\nRUN pip install -c constraints.txt . torch==2.0.0\n",
            "torch==2.0.0, but pyproject pins torch==",
        ),
        (
            "FROM python:3.11-slim\nRUN pip install -c constraints.txt . leftpad\n",
            "installs leftpad, which constraints.txt does not pin",
        ),
        (
            "FROM python:3.11-slim\nCOPY pyproject.toml ./\nRUN pip install -c constraints.txt .\n",
            "constraints.txt is never copied",
        ),
        (
            "FROM python:3.11-slim\nRUN pip install -c constraints.txt boto3\n",
            "mnemo itself (`pip install ... .`, pyproject.toml) is never installed",
        ),
        ("FROM python:3.11-slim\nUSER mnemo\nUSER root\n", "must end as a non-root USER"),
        ("FROM python:3.11-slim\n", "no ENV MNEMO_WORKSPACE"),
    ],
)
def test_dockerfile_rules_report_a_bad_dockerfile(dockerfile, expected):
    problems = dockerfile_problems(dockerfile)
    assert any(expected in p for p in problems), problems


# -- the multi-node training job (infra/k8s/training) ------------------------------------------

TRAINING = K8S / "training"
OPERATOR_CONTAINER = "pytorch"  # the training operator gives this container MASTER_ADDR, MASTER_PORT, PET_*
OPERATOR_PORT = "pytorchjob-port"  # the Master's port it hands to every pod as MASTER_PORT
OPERATOR_ENV = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK"}
VAR_REF = re.compile(r"\$\((\w+)\)")  # what the kubelet expands in command and args


def load_training() -> list[tuple[str, dict]]:
    return [
        (f"training/{path.name}", doc)
        for path in sorted(TRAINING.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def configmaps_documented() -> dict[str, set[str]]:
    """ConfigMaps infra/README.md has one create by hand (`create configmap NAME --from-file=KEY=...`), with their keys."""
    readme = (INFRA / "README.md").read_text()
    return {
        m[1]: set(re.findall(r"--from-file=([\w.-]+)=", m[2]))
        for m in re.finditer(r"create configmap ([\w-]+)((?:\s+--from-file=\S+)+)", readme)
    }


def pytorchjob_problems(job: dict, where: str, *, config: dict[str, str], **context: Any) -> list[str]:
    """A PyTorchJob whose master runs the retrain flow and whose workers run, as the operator's later
    nodes, what the flow's train task runs as node 0 (components/training/distributed.py), on the
    same job directory of the same workspace volume, with one GPU per process."""
    from components.training.distributed import TRAIN_JOB, Rendezvous, torchrun_command

    problems: list[str] = []
    spec = job["spec"]
    nproc = int(spec.get("nprocPerNode", 1))
    replicas = spec["pytorchReplicaSpecs"]
    if set(replicas) != {"Master", "Worker"} or replicas["Master"].get("replicas") != 1:
        problems.append(f"{where}: needs one Master (the flow, node 0) and Workers (the other nodes)")
        return problems
    if (spec.get("runPolicy") or {}).get("cleanPodPolicy") != "Running":
        problems.append(f"{where}: runPolicy.cleanPodPolicy must be Running: workers would wait on after the master")
    workspace = config["MNEMO_WORKSPACE"]
    containers = {}
    for kind, replica in replicas.items():
        pod, at = replica["template"]["spec"], f"{where}: {kind}"
        [container] = pod["containers"]
        containers[kind] = container
        problems += container_problems(container, pod, at, **context)
        if container["name"] != OPERATOR_CONTAINER:
            problems.append(
                f"{at}: the container must be named {OPERATOR_CONTAINER!r}: the operator sets its rendezvous"
            )
        if replica.get("restartPolicy") != "Never":
            problems.append(f"{at}: restartPolicy must be Never: a failed rank fails the retrain, the next one resumes")
        resources = container.get("resources", {})
        gpus = [resources.get(part, {}).get("nvidia.com/gpu") for part in ("requests", "limits")]
        if gpus != [nproc, nproc]:
            problems.append(f"{at}: nvidia.com/gpu requests and limits {gpus}, but nprocPerNode is {nproc}")
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        mounted = {claims.get(m["name"]): m["mountPath"] for m in container.get("volumeMounts", [])}
        if mounted.get("mnemo-workspace") != workspace:
            problems.append(
                f"{at}: the workspace volume must be mounted at MNEMO_WORKSPACE ({workspace}) on every node"
            )
        given = OPERATOR_ENV | {e["name"] for e in container.get("env", [])}
        given |= {
            k for s in container.get("envFrom", []) for k in context["configmaps"].get(s["configMapRef"]["name"], ())
        }
        for name in VAR_REF.findall(" ".join(container.get("command", []) + container.get("args", []))):
            if name not in given:
                problems.append(f"{at}: $({name}) is set neither by the operator nor in the container's environment")

    master = containers["Master"]
    if master.get("command") != ["mnemo", "retrain"]:
        problems.append(f"{where}: Master: must run the retrain flow (mnemo retrain), found {master.get('command')}")
    if OPERATOR_PORT not in {p.get("name") for p in master.get("ports", [])}:
        problems.append(f"{where}: Master: no port named {OPERATOR_PORT}: the operator has no MASTER_PORT to hand out")
    params = next((e.get("value") for e in master.get("env", []) if e["name"] == "MNEMO_PARAMS"), None)
    volumes = {v["name"]: v for v in replicas["Master"]["template"]["spec"].get("volumes", [])}
    files = {
        f"{m['mountPath']}/{key}"
        for m in master.get("volumeMounts", [])
        if "configMap" in volumes.get(m["name"], {})
        for key in context["configmaps"].get(volumes[m["name"]]["configMap"]["name"], ())
    }
    if params not in files:
        problems.append(f"{where}: Master: MNEMO_PARAMS ({params}) is no file of a mounted params ConfigMap")

    worker = containers["Worker"]
    node_0 = torchrun_command(Path(workspace) / TRAIN_JOB, nproc, Rendezvous(2, "master", 1))
    command = [
        VAR_REF.sub(lambda m: config.get(m[1], m[0]), a) for a in worker.get("command", []) + worker.get("args", [])
    ]
    flags = dict(a.split("=", 1) for a in command if a.startswith("--"))
    operator = {
        "--nnodes": "$(PET_NNODES)",
        "--node-rank": "$(PET_NODE_RANK)",
        "--master-addr": "$(MASTER_ADDR)",
        "--master-port": "$(MASTER_PORT)",
        "--nproc-per-node": "$(PET_NPROC_PER_NODE)",
    }
    if (
        command[:3] != ["python", *node_0[1:3]]
        or [a for a in command if not a.startswith("--")][3:] != [a for a in node_0 if not a.startswith("--")][3:]
    ):
        problems.append(
            f"{where}: Worker: must run {' '.join(node_0[1:3])} ... {' '.join(node_0[-3:])}, as the flow's node 0"
        )
    if {k: flags.get(k) for k in operator} != operator or set(flags) - {"--rdzv-conf"} != {
        a.split("=", 1)[0] for a in node_0 if a.startswith("--")
    }:
        problems.append(f"{where}: Worker: torchrun's flags must be node 0's, with the operator's values {operator}")
    return problems


def _training_context(k8s_context: dict[str, Any], known_env: set[str]) -> dict[str, Any]:
    args = _k8s_args(k8s_context, known_env)
    args["configmaps"] = args["configmaps"] | configmaps_documented()
    claims = {doc["metadata"]["name"] for _, doc in k8s_context["docs"] if doc["kind"] == "PersistentVolumeClaim"}
    [config] = [
        doc["data"]
        for _, doc in k8s_context["docs"]
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "mnemo-config"
    ]
    return args | {"claims": claims, "config": config}


def test_the_pytorchjob_runs_the_flow_on_its_master_and_the_flows_torchrun_on_its_workers(k8s_context, known_env):
    [(file, job)] = load_training()
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert_none(pytorchjob_problems(job, file, **_training_context(k8s_context, known_env)))
    assert "mnemo-train-params" in configmaps_documented()  # the README says how to create it
    assert "kubectl create -k infra/k8s/training/" in (INFRA / "README.md").read_text()


def test_the_training_kustomization_names_the_project_image_as_the_main_one(k8s_context):
    training = yaml.safe_load((TRAINING / "kustomization.yaml").read_text())
    main = k8s_context["kustomization"]
    assert training["namespace"] == main["namespace"]
    assert training["images"] == [i for i in main["images"] if i["name"] == PROJECT_IMAGE_K8S]
    assert sorted(training["resources"]) == sorted(
        p.name for p in TRAINING.glob("*.yaml") if p.name != "kustomization.yaml"
    )


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed: the kustomize build is not checked"
)
def test_kustomize_builds_the_pytorchjob_with_the_project_image(k8s_context):
    built = subprocess.run(["kubectl", "kustomize", str(TRAINING)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    [job] = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    entry = next(i for i in k8s_context["kustomization"]["images"] if i["name"] == PROJECT_IMAGE_K8S)
    images = {
        c["image"] for r in job["spec"]["pytorchReplicaSpecs"].values() for c in r["template"]["spec"]["containers"]
    }
    assert images == {f"{entry['newName']}:{entry['newTag']}"}
    assert job["metadata"]["namespace"] == k8s_context["kustomization"]["namespace"]


def _worker(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]


def _master(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (
            lambda j: _worker(j)["args"].__setitem__(-2, "components.training.loop"),
            "Worker: must run -m torch.distributed.run",
        ),
        (lambda j: _worker(j)["args"].__setitem__(-1, "/tmp/train-job"), "Worker: must run -m torch.distributed.run"),
        (lambda j: _worker(j)["args"].remove("--node-rank=$(PET_NODE_RANK)"), "torchrun's flags must be node 0's"),
        (
            lambda j: _worker(j)["args"].__setitem__(0, "--nnodes=$(PET_NODES)"),
            "$(PET_NODES) is set neither by the operator",
        ),
        (lambda j: j["spec"].__setitem__("nprocPerNode", "8"), "but nprocPerNode is 8"),
        (lambda j: _master(j).__setitem__("ports", []), "no port named pytorchjob-port"),
        (lambda j: _master(j).__setitem__("command", ["mnemo", "reindex"]), "must run the retrain flow"),
        (
            lambda j: _master(j)["env"][0].__setitem__("value", "/app/params.yaml"),
            "MNEMO_PARAMS (/app/params.yaml) is no file",
        ),
        (lambda j: _worker(j)["volumeMounts"][0].__setitem__("mountPath", "/data"), "mounted at MNEMO_WORKSPACE"),
        (lambda j: _worker(j).__setitem__("name", "trainer"), "must be named 'pytorch'"),
        (lambda j: j["spec"]["runPolicy"].pop("cleanPodPolicy"), "cleanPodPolicy must be Running"),
    ],
)
def test_a_pytorchjob_that_would_not_train_as_the_flow_does_is_reported(spoil, expected, k8s_context, known_env):
    [(file, job)] = load_training()
    spoil(job)
    problems = pytorchjob_problems(job, file, **_training_context(k8s_context, known_env))
    assert any(expected in p for p in problems), problems

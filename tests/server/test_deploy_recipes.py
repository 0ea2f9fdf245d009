"""The deployment recipes: Dockerfile, deploy/tpu_vm.sh, deploy/compose.yaml, deploy/k8s/*.yaml.

Nothing here needs Docker, gcloud or a cluster: the Dockerfile goes through hadolint, the
scripts through shellcheck and their own --dry-run, the manifests through their schemas.
Every `lwm-serve` command line a recipe runs is parsed by the real CLI parser, and every
(model, mesh, context, device) a recipe assumes goes through the real `lwm-serve plan`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lwm_serve.server import cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TPU_VM = DEPLOY / "tpu_vm.sh"
SCHEMAS = ROOT / "tests" / "fixtures" / "deploy"
BIN = Path(sys.executable).parent
IMAGE = "registry.example/lwm-serve:under-test"


# --------------------------------------------------------------------------- helpers

def parse_serve_args(args: list[str]) -> Any:
    """The argparse namespace of `lwm-serve ARGS` (SystemExit on a flag the CLI lacks)."""
    assert args and args[0] == "serve", args
    return cli.build_parser().parse_args(args)


def plan_says_fits(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs `lwm-serve plan ARGS`; returns its output after checking that it fits."""
    assert args[0] == "plan", args
    capsys.readouterr()
    code = cli.main(args)
    out = capsys.readouterr().out
    assert code == 0 and "fits: yes" in out, out
    return out


def check_serve_plan(serve: Any, devices: int, device_memory: str,
                     capsys: pytest.CaptureFixture[str]) -> None:
    """The serve flags' mesh covers `devices` and their context fits `device_memory`."""
    from lwm_serve.server.config import mesh_size

    assert mesh_size(serve.mesh) == devices, (serve.mesh, devices)
    plan_says_fits(["plan", "--model", serve.model_config_path, "--mesh", serve.mesh, "--dtype",
                    serve.dtype, "--context", str(serve.max_model_len), "--device-memory",
                    device_memory], capsys)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# --------------------------------------------------------------------------- Dockerfile

def test_dockerfile_is_clean_under_hadolint():
    result = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "info", "--format", "json",
                             str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """The lint above can fail: the same call on a careless Dockerfile does."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n")
    result = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "info", "--format", "json",
                             str(bad)], capture_output=True, text=True, timeout=120)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode != 0 and {"DL3007", "DL3025"} <= codes, codes


def test_dockerfile_is_multi_stage_non_root_with_healthcheck_and_the_pinned_jax():
    steps = dockerfile_instructions()
    stages = [rest for word, rest in steps if word == "FROM"]
    assert len(stages) >= 2 and any(" AS " in s.upper() for s in stages)
    user = [rest for word, rest in steps if word == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0  # numeric: runAsNonRoot can check it
    assert any(word == "HEALTHCHECK" for word, _ in steps)
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    assert args["JAX_EXTRA"] == "cpu"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"jax=={args['JAX_VERSION']}" in pins  # the accelerator plugin matches the pinned jax
    run = " ".join(rest for word, rest in steps if word == "RUN")
    for extra in ("cpu", "tpu", "cuda12"):
        assert extra in run


def test_image_defaults_serve_the_demo_on_the_exposed_port():
    """ENTRYPOINT + CMD + ENV of the image give `lwm-serve serve` on 0.0.0.0:<EXPOSE>."""
    from lwm_serve.server.config import ServerSettings

    steps = dockerfile_instructions()
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM"):]
    entry = json.loads([rest for word, rest in final if word == "ENTRYPOINT"][-1])
    command = json.loads([rest for word, rest in final if word == "CMD"][-1])
    env = dict(shlex.split(pair)[0].split("=", 1)
               for word, rest in final if word == "ENV" for pair in shlex.split(rest, posix=False))
    expose = int([rest for word, rest in final if word == "EXPOSE"][-1])
    assert entry == ["lwm-serve"]
    args = cli.build_parser().parse_args(command)
    assert args.command == "serve" and "model" not in vars(args)  # no model flag: the demo
    settings_env = {k[len("LWM_SERVE_"):].lower(): v for k, v in env.items()
                    if k.startswith("LWM_SERVE_") and k != "LWM_SERVE_HOME"}
    settings = ServerSettings(**settings_env)
    assert (settings.host, settings.port, settings.model) == ("0.0.0.0", expose, "demo")


def test_healthcheck_command_passes_on_a_live_server_and_fails_without_one(live):
    steps = dockerfile_instructions()
    check = json.loads([rest for word, rest in steps if word == "HEALTHCHECK"][-1].split("CMD", 1)[1])
    assert check[0] == "python"
    port = live.base_url.rsplit(":", 1)[1]
    env = {**os.environ, "LWM_SERVE_PORT": port}
    assert subprocess.run([sys.executable, *check[1:]], env=env, timeout=30).returncode == 0
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        env["LWM_SERVE_PORT"] = str(s.getsockname()[1])
    assert subprocess.run([sys.executable, *check[1:]], env=env, timeout=30,
                          capture_output=True).returncode != 0


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]

    def ignored(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        import fnmatch

        verdict = False
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/").removeprefix("**/")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.split("/")[-1], pattern):
                verdict = not negate
        return verdict

    copy_lines = [rest.split() for word, rest in dockerfile_instructions()
                  if word == "COPY" and not rest.startswith("--from")]
    sources = [src for parts in copy_lines for src in parts[:-1]]
    assert sources and all(not ignored(src) for src in sources), sources
    for junk in (".venv", ".git", "tests", "bench", "models", "server/__pycache__"):
        assert ignored(junk), junk


# --------------------------------------------------------------------------- deploy/tpu_vm.sh

def test_every_deploy_script_is_covered_and_clean_under_shellcheck():
    scripts = sorted(p.name for p in DEPLOY.glob("*.sh"))
    assert scripts == ["tpu_vm.sh"], "a new deploy script needs its --dry-run test here"
    result = subprocess.run([str(BIN / "shellcheck"), *map(str, DEPLOY.glob("*.sh"))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout


def run_tpu_vm(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """deploy/tpu_vm.sh with gcloud, git, docker and ssh replaced by traps: a dry run runs none."""
    traps = tmp_path / "bin"
    traps.mkdir(exist_ok=True)
    for tool in ("gcloud", "git", "docker", "ssh", "scp"):
        (traps / tool).write_text(f"#!/bin/sh\necho 'dry run ran {tool}' >&2\nexit 99\n")
        (traps / tool).chmod(0o755)
    base = {"PATH": f"{traps}:/usr/bin:/bin", "HOME": str(tmp_path), "TPU_NAME": "lwm-test",
            "ZONE": "us-central2-b", "IMAGE": IMAGE}
    return subprocess.run(["bash", str(TPU_VM), *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def accelerator_table(tmp_path: Path) -> list[dict[str, str]]:
    out = run_tpu_vm(tmp_path, "accelerators")
    assert out.returncode == 0, out.stderr
    header, *rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    return [dict(zip(header, row)) for row in rows]


def commands_in(line: str) -> Iterator[list[str]]:
    """A printed command and, for `gcloud ... ssh --command STRING`, the commands in STRING."""
    words = shlex.split(line)
    yield words
    if "--command" in words:
        remote = words[words.index("--command") + 1]
        for part in re.split(r"\s*(?:&&|;)\s*", remote):
            if part.strip():
                yield shlex.split(part)


def container_commands(stdout: str) -> Iterator[tuple[list[str], list[str]]]:
    """(docker words, lwm-serve words) for every command that starts the image."""
    for line in stdout.splitlines():
        for words in commands_in(line):
            if "docker" in words and IMAGE in words and "build" not in words:
                at = words.index(IMAGE)
                yield words[:at], words[at + 1:]


def test_tpu_vm_defaults_fit_their_accelerator_and_the_commands_parse(tmp_path, capsys):
    """For every accelerator type the script knows: the default context fits (planner), the
    mesh covers the slice's chips, and every lwm-serve command line parses."""
    table = accelerator_table(tmp_path)
    assert {"v4-8", "v5p-8", "v5litepod-8", "v6e-8", "v4-64"} <= {row["accelerator"] for row in table}
    assert any(int(row["context"]) == 1048576 for row in table)  # somewhere a 1M context fits
    for row in table:
        multi = int(row["hosts"]) > 1
        out = run_tpu_vm(tmp_path, "--dry-run", "serve-slice" if multi else "serve",
                         ACCELERATOR=row["accelerator"], LWM_SERVE_API_KEY="s3cret-key")
        assert out.returncode == 0, out.stderr
        assert "dry run ran" not in out.stderr and "s3cret-key" not in out.stdout
        started = list(container_commands(out.stdout))
        kinds = [args[0] for _, args in started]
        assert kinds == ["plan", "serve"], out.stdout  # the planner checks the fit before serving
        (_, plan), (docker, serve_words) = started
        plan_says_fits(plan, capsys)
        assert "--privileged" in docker and "--net=host" in docker
        serve = parse_serve_args(serve_words)
        assert (serve.accelerator, serve.host, serve.dtype) == ("tpu", "0.0.0.0", "bfloat16")
        assert serve.served_model_name == "LWM-Chat-1M-Jax"  # the basename of the default MODEL_DIR
        assert serve.max_model_len == int(row["context"]) and serve.mesh == plan[plan.index("--mesh") + 1]
        check_serve_plan(serve, int(row["chips"]), row["memory"], capsys)
        ssh = [shlex.split(line) for line in out.stdout.splitlines() if "--privileged" in line][0]
        assert ("--worker=all" in ssh) == multi and getattr(serve, "distributed", None) is (True if multi else None)


def test_tpu_vm_every_command_dry_runs(tmp_path):
    env = dict(MODEL_GCS="gs://bucket/LWM-Chat-1M-Jax", SOURCE_RANGE="203.0.113.7/32")
    printed = {}
    for command in ("create", "build", "download", "serve", "tunnel", "firewall", "ready", "logs", "stop",
                    "delete"):
        out = run_tpu_vm(tmp_path, "--dry-run", command, **env)
        assert out.returncode == 0 and out.stdout.strip(), (command, out.stderr)
        assert "dry run ran" not in out.stderr
        printed[command] = out.stdout
    assert "--accelerator-type v4-8 --version tpu-ubuntu2204-base" in printed["create"]
    build = [w for line in printed["build"].splitlines() for w in commands_in(line) if "build" in w]
    docker_build = [w for w in build if w[:3] == ["sudo", "docker", "build"]][0]
    assert "JAX_EXTRA=tpu" in docker_build and docker_build[docker_build.index("-t") + 1] == IMAGE
    assert "-L 8000:127.0.0.1:8000" in printed["tunnel"] and "--worker=0" in printed["tunnel"]
    assert "--source-ranges 203.0.113.7/32" in printed["firewall"] and "tcp:8000" in printed["firewall"]
    assert "--worker=all" in printed["stop"]


@pytest.mark.parametrize("args,env,fragment", [
    (["--dry-run", "serve"], {"TPU_NAME": ""}, "set TPU_NAME"),
    (["--dry-run", "serve"], {"ACCELERATOR": "v9-1"}, "no defaults for ACCELERATOR=v9-1"),
    (["--dry-run", "serve"], {"ACCELERATOR": "v4-32"}, "use 'deploy/tpu_vm.sh serve-slice'"),
    (["--dry-run", "serve-slice"], {"ACCELERATOR": "v4-8"}, "single host"),
    (["--dry-run", "firewall"], {}, "set SOURCE_RANGE"),
    (["--dry-run", "launch"], {}, "unknown command"),
])
def test_tpu_vm_refuses_what_cannot_work(tmp_path, args, env, fragment):
    out = run_tpu_vm(tmp_path, *args, **env)
    assert out.returncode == 2 and fragment in out.stderr.replace(str(TPU_VM), "deploy/tpu_vm.sh"), out.stderr
    assert out.stdout == ""


def test_tpu_vm_overrides_reach_the_server_and_the_planner(tmp_path, capsys):
    out = run_tpu_vm(tmp_path, "--dry-run", "serve", ACCELERATOR="v5p-8", MESH="1,1,2,2",
                     MAX_MODEL_LEN="262144", VQGAN_FILE="", EXTRA_ARGS="--max-queue 8")
    assert out.returncode == 0, out.stderr
    (_, plan), (_, words) = list(container_commands(out.stdout))
    serve = parse_serve_args(words)
    assert (serve.mesh, serve.max_model_len, serve.max_queue) == ("1,1,2,2", 262144, 8)
    assert "vqgan" not in vars(serve)
    plan_says_fits(plan, capsys)


# --------------------------------------------------------------------------- compose

def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR}, with every VAR unset."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", text)


def compose_file() -> dict[str, Any]:
    return yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text()))


def test_compose_file_validates_against_the_compose_spec():
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose_file())
    broken = compose_file()
    broken["services"]["lwm-serve"]["portz"] = ["8000:8000"]  # the check can fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_compose_cpu_demo_and_gpu_profile(capsys):
    services = compose_file()["services"]
    demo, gpu = services["lwm-serve"], services["lwm-serve-gpu"]
    assert "profiles" not in demo and "command" not in demo  # `up` alone: the image's demo
    assert demo["build"]["args"]["JAX_EXTRA"] == "cpu" and "8000:8000" in demo["ports"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["JAX_EXTRA"] == "cuda12"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    serve = parse_serve_args(gpu["command"])
    assert serve.accelerator == "gpu" and serve.served_model_name == "LWM-Chat-1M-Jax"
    check_serve_plan(serve, int(devices[0]["count"]), gpu["x-lwm-serve-device-memory"], capsys)


# --------------------------------------------------------------------------- Kubernetes

def strict(schema: Any) -> Any:
    """additionalProperties: false wherever properties are listed (kubernetes-validate --strict)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def pod_templates(doc: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, str], int]]:
    """(pod template, LWS environment, pods in the group) for a workload."""
    if doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        size = int(lwt["size"])
        leader = f"{doc['metadata']['name']}-0.{doc['metadata']['name']}"
        env = {"LWS_LEADER_ADDRESS": leader, "LWS_GROUP_SIZE": str(size)}
        return [(lwt["leaderTemplate"], {**env, "LWS_WORKER_INDEX": "0"}, size),
                (lwt["workerTemplate"], {**env, "LWS_WORKER_INDEX": "1"}, size)]
    if doc["kind"] == "Deployment":
        return [(doc["spec"]["template"], {}, 1)]
    return []


def validate_manifest(doc: dict[str, Any]) -> None:
    version = kubernetes_validate.utils.latest_version()
    if doc["kind"] == "LeaderWorkerSet":
        schema = json.loads((SCHEMAS / "leaderworkerset-v1.schema.json").read_text())
        jsonschema.Draft7Validator(strict(schema)).validate(doc)
        for template, _, _ in pod_templates(doc):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                          "metadata": {"name": "t"}, "template": template},
                                         version, strict=True)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_manifests_validate_against_their_schemas():
    docs = manifests()
    assert {"Deployment", "Service", "LeaderWorkerSet"} <= {d["kind"] for _, d in docs}
    for name, doc in docs:
        validate_manifest(doc)
    # The checks can fail: a misspelt field in a container, and in the LWS envelope.
    for kind, path in (("Deployment", ("spec", "template", "spec", "containers", 0)),
                       ("LeaderWorkerSet", ("spec", "leaderWorkerTemplate"))):
        doc = json.loads(json.dumps(next(d for _, d in docs if d["kind"] == kind)))
        node = doc
        for key in path:
            node = node[key]
        node["startupProbes"] = {}
        with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
            validate_manifest(doc)


def test_kubernetes_workloads_fit_probe_and_parse(capsys):
    workloads = [(name, d) for name, d in manifests() if pod_templates(d)]
    assert {name for name, _ in workloads} >= {"gpu.yaml", "tpu.yaml", "tpu-multihost.yaml"}
    user = [rest for word, rest in dockerfile_instructions() if word == "USER"][-1].split(":")[0]
    for name, doc in workloads:
        for template, env, group in pod_templates(doc):
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] and str(spec["securityContext"]["runAsUser"]) == user
            (container,) = spec["containers"]
            words = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
            serve = parse_serve_args(words)
            assert serve.served_model_name, name  # else the model id would be "params"
            limits = container["resources"]["limits"]
            chips = limits.get("google.com/tpu", limits.get("nvidia.com/gpu"))
            assert chips and serve.accelerator == ("tpu" if "google.com/tpu" in limits else "gpu"), name
            memory = template["metadata"]["annotations"]["lwm-serve/device-memory"]
            check_serve_plan(serve, int(chips) * group, memory, capsys)
            if group > 1:  # one jax.distributed run: process ids 0..group-1 at the leader
                assert (serve.num_processes, serve.coordinator.split(":")[0]) == (group, env["LWS_LEADER_ADDRESS"])
                assert serve.process_id == int(env["LWS_WORKER_INDEX"])
            if "readinessProbe" in container:
                assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
                assert container["livenessProbe"]["httpGet"]["path"] == "/health"
                start = container["startupProbe"]
                # Weight loading happens before the port opens: liveness must not count then.
                assert start["periodSeconds"] * start["failureThreshold"] >= 1200, name
                assert int(container["ports"][0]["containerPort"]) == 8000
    leaders = [t for _, d in workloads for t, env, g in pod_templates(d) if env.get("LWS_WORKER_INDEX") == "0"]
    assert leaders and all("readinessProbe" in t["spec"]["containers"][0] for t in leaders)


# --------------------------------------------------------------------------- README

def test_readme_deploy_commands_parse_and_fit(capsys):
    """The README's deployment section: every lwm-serve command line in it parses, and
    every `plan` in it that the text says fits does fit."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deploy"):text.index("## Fidelity")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    serves, plans = 0, 0
    for line in (line for line in lines if "lwm-serve:" in line or "lwm-serve plan" in line):
        words = shlex.split(line.replace("$MODEL_DIR", "/m").replace("...", "x"))
        for image in ("lwm-serve:tpu", "lwm-serve:gpu"):
            if image in words and "serve" in words[words.index(image):]:
                serve = parse_serve_args(words[words.index(image) + 1:])
                assert serve.accelerator == image.split(":")[1] and serve.max_model_len
                serves += 1
        if "plan" in words and words[words.index("plan") - 1] == "lwm-serve":
            plan_says_fits(words[words.index("plan"):], capsys)
            plans += 1
    assert serves >= 2 and plans >= 2, (serves, plans)

"""Nuclio packaging: function.yaml, function-gpu.yaml, deploy_cpu.sh and deploy_gpu.sh.

Nothing here needs Nuclio, Docker or a network. The YAML files are checked field by field against
what CVAT's lambda manager and Nuclio's Python wrapper read; the deploy scripts run with a stub
`nuctl` first on PATH that records its arguments and the files it was handed.
"""

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from config import Settings

ROOT = Path(__file__).resolve().parent.parent
CPU_YAML, GPU_YAML = ROOT / "function.yaml", ROOT / "function-gpu.yaml"
SCRIPTS = [ROOT / "deploy_cpu.sh", ROOT / "deploy_gpu.sh"]
DEFAULT_MODEL_ID = "facebook/sam2.1-hiera-tiny"
each_file = pytest.mark.parametrize("path", [CPU_YAML, GPU_YAML], ids=["cpu", "gpu"])

# The Python inside each pinned non-python base image. Add a tag here only after checking it.
BASE_IMAGE_PYTHON: dict[str, str] = {}
# Build-time ENV directives that configure other tools, not the function (see config.py).
TOOL_ENV = {
    "HF_HOME", "HF_HUB_OFFLINE", "PIP_NO_CACHE_DIR", "DEBIAN_FRONTEND",
    "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "CUDA_HOME",
}
CVAT_TIMEOUT_S = 120  # CVAT_NUCLIO_DEFAULT_TIMEOUT: CVAT abandons a call after this


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def config_env_names() -> set[str]:
    """Every environment variable config.py reads, taken from its source."""
    return set(re.findall(r'"((?:SAM2|CVAT)_[A-Z0-9_]+)"', (ROOT / "config.py").read_text()))


def runtime_env(function: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in function["spec"]["env"]}


def directives(function: dict, kind: str) -> list[str]:
    return [d["value"] for d in function["spec"]["build"]["directives"]["preCopy"] if d["kind"] == kind]


def pip_pins(function: dict) -> dict[str, Requirement]:
    """Every package named by a `pip install` in the build, by canonical name."""
    pins = {}
    for command in directives(function, "RUN"):
        for part in command.split("&&"):
            words = shlex.split(part)
            if "pip" not in words or words[words.index("pip") + 1] != "install":
                continue
            words = words[words.index("pip") + 2:]
            skip_next = False
            for word in words:
                if skip_next or word.startswith("-"):
                    skip_next = word in ("--index-url", "--extra-index-url", "-i")
                    continue
                requirement = Requirement(word)
                pins[canonicalize_name(requirement.name)] = requirement
    return pins


# --- what CVAT reads -----------------------------------------------------------------------


@each_file
def test_annotations_are_what_cvat_parses(path):
    metadata = load(path)["metadata"]
    annotations = metadata["annotations"]
    assert metadata["namespace"] == "cvat"
    assert all(isinstance(v, str) for v in annotations.values()), "Nuclio annotations are strings"
    assert annotations["type"] == "tracker"
    assert annotations["name"] == "Segment Anything 2: Tracker"
    assert int(annotations["version"]) >= 1
    assert json.loads(annotations["spec"]) == []
    shape_types = annotations["supported_shape_types"].split(",")
    # "rectangle" is what lists the function in CVAT's AI Tools tracker tab.
    assert sorted(shape_types) == ["mask", "polygon", "rectangle"]
    assert load(path)["spec"]["description"]


def test_cpu_and_gpu_builds_are_one_function_in_cvat():
    cpu, gpu = load(CPU_YAML), load(GPU_YAML)
    assert cpu["metadata"] == gpu["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", cpu["metadata"]["name"])
    cpu_env, gpu_env = runtime_env(cpu), runtime_env(gpu)
    assert {k for k in cpu_env if cpu_env[k] != gpu_env.get(k)} == {"SAM2_DEVICE"}
    assert cpu["spec"]["triggers"]["myHttpTrigger"]["attributes"] == gpu["spec"]["triggers"]["myHttpTrigger"]["attributes"]
    cpu_pins, gpu_pins = pip_pins(cpu), pip_pins(gpu)
    shared = (set(cpu_pins) & set(gpu_pins)) - {"torch"}  # +cpu and +cu128 builds of one version
    assert {str(cpu_pins[n]) for n in shared} == {str(gpu_pins[n]) for n in shared}


# --- what Nuclio reads ---------------------------------------------------------------------


@each_file
def test_handler_resolves_to_main_handler(path):
    module, function = load(path)["spec"]["handler"].split(":")
    assert (module, function) == ("main", "handler")
    # Parsed, not imported: importing main loads the model.
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert [a.arg for a in functions["handler"].args.args] == ["context", "event"]
    assert [a.arg for a in functions["init_context"].args.args] == ["context"]


@each_file
def test_runtime_matches_the_base_image_python(path):
    spec = load(path)["spec"]
    base = spec["build"]["baseImage"]
    assert ":" in base and not base.endswith(":latest"), "pin the base image by tag"
    official = re.fullmatch(r"python:(\d+\.\d+)\.\d+-.+", base)
    python = official.group(1) if official else BASE_IMAGE_PYTHON[base]
    assert spec["runtime"] == f"python:{python}"
    assert python in ("3.10", "3.11")  # what sam2 and nuclio 1.14 both support


@each_file
def test_env_names_are_the_functions_settings(path):
    env = load(path)["spec"]["env"]
    names = [item["name"] for item in env]
    assert len(names) == len(set(names))
    assert set(names) <= config_env_names()
    assert all(isinstance(item["value"], str) for item in env), "Nuclio env values are strings"
    values = runtime_env(load(path))
    assert values["SAM2_MODEL_ID"] == DEFAULT_MODEL_ID
    assert values["SAM2_DEVICE"] == ("cuda" if path == GPU_YAML else "cpu")
    assert values["CVAT_FUNCTIONS_REDIS_HOST"] == "cvat_redis_ondisk"
    assert values["CVAT_FUNCTIONS_REDIS_PORT"] == "6666"
    assert Settings.from_env(values).redis_host == "cvat_redis_ondisk"  # and config.py accepts them


@each_file
def test_build_env_names_are_settings_or_tool_settings(path):
    names = {value.split("=", 1)[0] for value in directives(load(path), "ENV")}
    assert names <= config_env_names() | TOOL_ENV


@each_file
def test_default_weights_are_baked_in_and_nothing_downloads_at_run_time(path):
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    steps = load(path)["spec"]["build"]["directives"]["preCopy"]
    text = [f"{s['kind']} {s['value']}" for s in steps]
    download = next(i for i, t in enumerate(text) if "hf_hub_download" in t)
    assert text.index(f"ENV SAM2_MODEL_ID={DEFAULT_MODEL_ID}") < download
    assert text.index("ENV HF_HOME=/opt/huggingface") < download
    offline = text.index("ENV HF_HUB_OFFLINE=1")
    assert offline > download, "offline only once the weights are in the image"
    assert "HF_MODEL_ID_TO_FILENAMES" in text[download]  # sam2 names the weights file
    assert DEFAULT_MODEL_ID in HF_MODEL_ID_TO_FILENAMES


@each_file
def test_packages_are_pinned_and_satisfy_requirements_txt(path):
    pins = pip_pins(load(path))
    for name, requirement in pins.items():
        assert str(requirement.specifier).startswith("=="), f"{name} is not pinned"
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        wanted = Requirement(line)
        pinned = pins[canonicalize_name(wanted.name)]
        version = str(pinned.specifier).removeprefix("==")
        assert wanted.specifier.contains(version, prereleases=True), f"{pinned} vs requirements.txt {wanted}"
        assert wanted.extras <= pinned.extras
    assert str(pins["sam2"].specifier) == "==1.1.0"


def test_one_torch_version_in_the_suite_and_both_images():
    # The suite runs the torch that scripts/setup.sh installs; the images must ship that version.
    [suite] = re.findall(r"TORCH_SPEC:-torch==([0-9.]+)", (ROOT / "scripts" / "setup.sh").read_text())
    import torch

    assert torch.__version__.split("+")[0] == suite, "the suite runs another torch than setup.sh pins"
    cpu, gpu = load(CPU_YAML), load(GPU_YAML)
    assert str(pip_pins(cpu)["torch"].specifier) == f"=={suite}+cpu"
    assert any("download.pytorch.org/whl/cpu" in c and "torch==" in c for c in directives(cpu, "RUN"))
    # CUDA 12.8 builds: the first with Blackwell kernels (sm_100, sm_120), see the README.
    assert str(pip_pins(gpu)["torch"].specifier) == f"=={suite}+cu128"
    assert any("download.pytorch.org/whl/cu128" in c and "torch==" in c for c in directives(gpu, "RUN"))


def test_sam2_cuda_extension_is_built_on_gpu_only():
    [gpu_sam2] = [c for c in directives(load(GPU_YAML), "RUN") if "sam2==" in c]
    assert "SAM2_BUILD_CUDA=1" in gpu_sam2
    assert "SAM2_BUILD_ALLOW_ERRORS=0" in gpu_sam2, "a failed extension build must fail the image"
    assert "TORCH_CUDA_ARCH_LIST=" in gpu_sam2, "no GPU at build time to detect architectures"
    assert "--no-deps" in gpu_sam2
    assert "cuda-minimal-build-12-8" in " ".join(directives(load(GPU_YAML), "RUN")), "nvcc for the extension"
    assert "10.0 12.0" in gpu_sam2, "Blackwell kernels"
    assert 'python -c "import torch, sam2._C"' in gpu_sam2, "the build proves the extension loads"
    [cpu_sam2] = [c for c in directives(load(CPU_YAML), "RUN") if "sam2==" in c]
    assert "SAM2_BUILD_CUDA=0" in cpu_sam2 and "--no-deps" in cpu_sam2


@each_file
def test_http_trigger_takes_4k_frames(path):
    spec = load(path)["spec"]
    [trigger] = spec["triggers"].values()
    assert trigger["kind"] == "http"
    assert "maxWorkers" not in trigger, "deprecated; use numWorkers"
    if path == GPU_YAML:
        assert trigger["numWorkers"] == 1  # one model per GPU; scale out with replicas
    else:
        assert trigger["numWorkers"] >= 1
    body = trigger["attributes"]["maxRequestBodySize"]
    assert body >= 3840 * 2160 * 3 * 4 // 3  # an uncompressed-size 4K PNG, base64-encoded
    assert body == Settings().max_body_bytes == int(runtime_env(load(path))["SAM2_MAX_BODY_BYTES"])


@each_file
def test_gpu_limit_only_in_the_gpu_file(path):
    limits = load(path)["spec"].get("resources", {}).get("limits", {})
    assert limits.get("nvidia.com/gpu") == (1 if path == GPU_YAML else None)


@each_file
def test_scaling_readiness_restarts_and_timeout(path):
    spec = load(path)["spec"]
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]  # several: the state is shared
    assert spec["readinessTimeoutSeconds"] >= 120  # a cold start loads torch and the weights
    timeout = re.fullmatch(r"(\d+)s", spec["eventTimeout"])
    assert timeout and 30 <= int(timeout.group(1)) <= CVAT_TIMEOUT_S


@each_file
def test_platform_attributes_are_only_ones_nuclio_reads(path):
    # Nuclio's local platform decodes `network` and `restartPolicy` (pkg/platform/local/types.go);
    # `mountMode` is ignored since 1.10.2 and Kubernetes reads none of them.
    attributes = load(path)["spec"]["platform"]["attributes"]
    assert set(attributes) <= {"network", "restartPolicy"}

    def keys(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from keys(value)
        elif isinstance(node, list):
            for item in node:
                yield from keys(item)

    assert "mountMode" not in set(keys(load(path)))
    policy = attributes["restartPolicy"]
    assert policy["name"] == "always"
    # pkg/dockerclient/shell.go passes the count to Docker only with "on-failure".
    assert "maximumRetryCount" not in policy or policy["name"] == "on-failure"


# --- CVAT's own deploy scripts -------------------------------------------------------------


@pytest.mark.parametrize("name", ["function.yaml", "function-gpu.yaml"])
def test_cvat_scripts_find_only_the_root_function_files(name):
    # CVAT's serverless/deploy_*.sh deploy every match of this glob, each with its own folder as
    # --path; a second match below the root would deploy a second function.
    found = subprocess.run(
        ["bash", "-O", "globstar", "-O", "nullglob", "-c", f'printf "%s\\n" "$1"/**/{name}', "_", str(ROOT)],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert [Path(p).resolve() for p in found] == [ROOT / name]


def test_no_dockerfile_beside_the_function_files():
    # CVAT's scripts would build it as a base image before deploying.
    assert not (ROOT / "Dockerfile").exists()


# --- deploy_cpu.sh and deploy_gpu.sh -------------------------------------------------------

STUB = """#!{python}
import json, os, sys
args = sys.argv[1:]
record = {{"args": args}}
if args[:1] == ["deploy"]:
    path, file = args[args.index("--path") + 1], args[args.index("--file") + 1]
    record.update(path=path, entries=sorted(os.listdir(path)), yaml=open(file).read())
with open(os.environ["NUCTL_STUB_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
"""


@pytest.fixture
def deploy(tmp_path):
    """Run a deploy script with a recording stub nuctl; returns (process, [recorded calls])."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nuctl").write_text(STUB.format(python=sys.executable))
    (bin_dir / "nuctl").chmod(0o755)
    log = tmp_path / "nuctl.log"

    def run(script, *args, env=None, stub=True):
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("CVAT_FUNCTIONS_", "NUCTL_"))}
        path = clean["PATH"] if not stub else f"{bin_dir}{os.pathsep}{clean['PATH']}"
        if not stub:  # hide any real nuctl too
            path = os.pathsep.join(d for d in path.split(os.pathsep) if not Path(d, "nuctl").exists())
        clean.update(PATH=path, NUCTL_STUB_LOG=str(log), TMPDIR=str(tmp_path), **(env or {}))
        process = subprocess.run([str(ROOT / script), *args], capture_output=True, text=True, env=clean)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return process, calls

    return run


def option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def the_deploy(calls: list[dict]) -> dict:
    [call] = [c for c in calls if c["args"][0] == "deploy"]
    return call


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_stop_on_errors(script):
    assert re.search(r"^set -eu", script.read_text(), re.M)
    assert os.access(script, os.X_OK)


def test_help_needs_no_nuctl(deploy):
    process, calls = deploy("deploy_gpu.sh", "--help", stub=False)
    assert process.returncode == 0
    for word in ("--model", "tiny", "base+", "large", "--platform", "--namespace", "--registry", "--run-registry"):
        assert word in process.stdout
    assert calls == []


def test_missing_nuctl_is_explained(deploy):
    process, _ = deploy("deploy_cpu.sh", stub=False)
    assert process.returncode != 0
    assert "nuctl is not on PATH" in process.stderr


def test_local_deploy_matches_cvats_scripts(deploy):
    process, calls = deploy("deploy_cpu.sh")
    assert process.returncode == 0, process.stderr
    assert [c["args"][:2] for c in calls] == [["create", "project"], ["deploy", "--project-name"], ["get", "function"]]
    assert calls[0]["args"] == ["create", "project", "cvat", "--platform", "local"]
    args = the_deploy(calls)["args"]
    assert option(args, "--project-name") == ["cvat"]
    assert option(args, "--platform") == ["local"]
    assert json.loads(option(args, "--platform-config")[0]) == {"attributes": {"network": "cvat_cvat"}}
    assert option(args, "--env") == [
        "CVAT_FUNCTIONS_REDIS_HOST=cvat_redis_ondisk",
        "CVAT_FUNCTIONS_REDIS_PORT=6666",
        "CVAT_FUNCTIONS_REDIS_PASSWORD=",
    ]
    assert Path(option(args, "--file")[0]).name == "function.yaml"
    assert "--registry" not in args and "--namespace" not in args
    assert calls[-1]["args"] == ["get", "function", "--platform", "local"]


def test_deployed_copy_holds_the_function_and_nothing_else(deploy):
    _, calls = deploy("deploy_cpu.sh")
    call = the_deploy(calls)
    assert {"main.py", "config.py", "requirements.txt", "function.yaml"} <= set(call["entries"])
    assert not {"tests", "bench", ".git", ".venv"} & set(call["entries"])
    assert call["yaml"] == CPU_YAML.read_text()  # tiny: the file as committed
    assert not Path(call["path"]).exists(), "the staging copy is removed afterwards"


def test_gpu_script_deploys_the_gpu_file(deploy):
    process, calls = deploy("deploy_gpu.sh")
    assert process.returncode == 0, process.stderr
    call = the_deploy(calls)
    assert Path(option(call["args"], "--file")[0]).name == "function-gpu.yaml"
    assert yaml.safe_load(call["yaml"])["spec"]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kube_deploy(deploy):
    process, calls = deploy(
        "deploy_gpu.sh", "--platform", "kube", "--namespace", "cvat-nuclio",
        "--registry", "registry.example:5000", "--run-registry", "registry.internal:5000",
    )
    assert process.returncode == 0, process.stderr
    assert calls[0]["args"] == ["create", "project", "cvat", "--platform", "kube", "--namespace", "cvat-nuclio"]
    args = the_deploy(calls)["args"]
    assert option(args, "--platform") == ["kube"]
    assert option(args, "--namespace") == ["cvat-nuclio"]
    assert option(args, "--registry") == ["registry.example:5000"]
    assert option(args, "--run-registry") == ["registry.internal:5000"]
    assert "--platform-config" not in args  # the Docker network means nothing on Kubernetes
    assert calls[-1]["args"] == ["get", "function", "--platform", "kube", "--namespace", "cvat-nuclio"]


def test_kube_cpu_workers_are_bounded_so_the_autoscaler_means_something(deploy):
    kube = ["--platform", "kube", "--registry", "registry.example:5000"]
    cpu_args = the_deploy(deploy("deploy_cpu.sh", *kube)[1])["args"]
    cpu_request = yaml.safe_load((ROOT / "function.yaml").read_text())["spec"]["resources"]["requests"]["cpu"]
    assert option(cpu_args, "--resource-limit") == [f"cpu={cpu_request}"]
    assert "OMP_NUM_THREADS=1" in option(cpu_args, "--env")
    for args in (the_deploy(deploy("deploy_gpu.sh", *kube)[1])["args"], the_deploy(deploy("deploy_cpu.sh")[1])["args"]):
        assert "--resource-limit" not in args and "OMP_NUM_THREADS=1" not in option(args, "--env")


def test_kube_pulls_from_the_push_registry_by_default(deploy):
    _, calls = deploy("deploy_cpu.sh", "--platform", "kube", env={"NUCTL_REGISTRY": "reg.example"})
    args = the_deploy(calls)["args"]
    assert option(args, "--registry") == option(args, "--run-registry") == ["reg.example"]
    assert option(args, "--namespace") == ["nuclio"]


def test_kube_without_a_registry_is_refused(deploy):
    process, calls = deploy("deploy_cpu.sh", "--platform", "kube")
    assert process.returncode != 0 and "--registry" in process.stderr
    assert calls == []


def test_redis_address_comes_from_options_or_environment(deploy):
    env = {"CVAT_FUNCTIONS_REDIS_HOST": "kvrocks.cvat.svc", "CVAT_FUNCTIONS_REDIS_PASSWORD": "s3cret"}
    _, calls = deploy("deploy_cpu.sh", "--redis-port", "6379", env=env)
    assert option(the_deploy(calls)["args"], "--env") == [
        "CVAT_FUNCTIONS_REDIS_HOST=kvrocks.cvat.svc",
        "CVAT_FUNCTIONS_REDIS_PORT=6379",
        "CVAT_FUNCTIONS_REDIS_PASSWORD=s3cret",
    ]


def test_other_settings_and_mounts_pass_through(deploy):
    _, calls = deploy(
        "deploy_gpu.sh",
        "--env", "SAM2_REDIS_URL=rediss://cache:6380", "--env", "SAM2_REDIS_PASSWORD_FILE=/secrets/redis",
        "--volume", "/etc/cvat/redis-password:/secrets/redis",
    )
    args = the_deploy(calls)["args"]
    assert option(args, "--env")[3:] == ["SAM2_REDIS_URL=rediss://cache:6380", "SAM2_REDIS_PASSWORD_FILE=/secrets/redis"]
    assert option(args, "--volume") == ["/etc/cvat/redis-password:/secrets/redis"]


def test_the_readme_secret_volume_is_a_nuclio_volume_for_the_password_file():
    readme = (ROOT / "README.md").read_text()
    snippet = readme[readme.index("```yaml\n  volumes:") + len("```yaml\n"):]
    [entry] = yaml.safe_load(snippet[: snippet.index("```")])["volumes"]
    # functionconfig.Volume: a Kubernetes Volume and its VolumeMount, joined by name.
    assert entry["volume"]["name"] == entry["volumeMount"]["name"]
    assert entry["volume"]["secret"]["secretName"] == "cvat-kvrocks-secret"  # key: password
    assert "SAM2_REDIS_PASSWORD_FILE=" + entry["volumeMount"]["mountPath"] + "/password" in readme


@pytest.mark.parametrize("bad", [["--env", "no-equals-sign"], ["--volume", "/only/one/path"], ["--env"]])
def test_malformed_pass_through_is_refused(deploy, bad):
    process, calls = deploy("deploy_cpu.sh", *bad)
    assert process.returncode == 1 and calls == []
    assert bad[0] in process.stderr


@pytest.mark.parametrize("script", ["deploy_cpu.sh", "deploy_gpu.sh"])
@pytest.mark.parametrize("variant, model_id", [("small", "facebook/sam2.1-hiera-small"),
                                               ("base+", "facebook/sam2.1-hiera-base-plus"),
                                               ("large", "facebook/sam2.1-hiera-large")])
def test_model_variant_sets_both_the_baked_weights_and_the_model_id(deploy, script, variant, model_id):
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    process, calls = deploy(script, "--model", variant)
    assert process.returncode == 0, process.stderr
    text = the_deploy(calls)["yaml"]
    assert "hiera-tiny" not in text
    function = yaml.safe_load(text)
    assert runtime_env(function)["SAM2_MODEL_ID"] == model_id  # loaded at run time
    assert f"SAM2_MODEL_ID={model_id}" in directives(function, "ENV")  # downloaded at build time
    assert model_id.split("/")[1] in function["spec"]["build"]["image"]  # one image per variant
    assert model_id in HF_MODEL_ID_TO_FILENAMES


def test_unknown_model_variant_is_refused(deploy):
    process, calls = deploy("deploy_cpu.sh", "--model", "huge")
    assert process.returncode != 0
    assert "tiny, small, base+ or large" in process.stderr
    assert calls == []


def test_gpu_event_timeout_covers_the_worst_request_measured_with_room_for_slower_gpus():
    # bench/results/gpu-worst-case.json: the large model, 128 objects, a 4K frame, on an H100.
    import json

    worst = json.loads((ROOT / "bench" / "results" / "gpu-worst-case.json").read_text())
    [case] = worst["results"]
    assert case["objects"] == 128 and case["frame_size"] == [3840, 2160] and "hiera_l" in case["model"]
    timeout_s = int(re.fullmatch(r"(\d+)s", load(GPU_YAML)["spec"]["eventTimeout"]).group(1))
    assert timeout_s * 1000 >= 5 * case["handler_ms_max"]


# --- Kubernetes resources, and the versions of CVAT and Nuclio served ----------------------------

MIB = 2**20
# bench/bench_footprint.py, one worker of each build.
FOOTPRINT = {CPU_YAML: "footprint.json", GPU_YAML: "footprint-cuda.json"}
# The Nuclio release that first reads each setting (nuclio/nuclio: "Introduce python 3.10 and
# python 3.11" is in 1.12.8; "Deprecate maxWorkers ... replace it with numWorkers" in 1.13.0).
NUCLIO_SINCE = {"python:3.10": (1, 12, 8), "python:3.11": (1, 12, 8), "numWorkers": (1, 13, 0)}
# Tracker protocol with supported_shape_types and continuation from states alone (README).
CVAT_MIN = "2.42.0"
SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value) -> float:
    """A Kubernetes quantity ("2", "500m", "3Gi", "2560Mi") as a number."""
    number, suffix = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * SUFFIXES[suffix]


def workers(function: dict) -> int:
    [trigger] = function["spec"]["triggers"].values()
    return trigger["numWorkers"]


def footprint(path: Path) -> dict:
    return json.loads((ROOT / "bench" / "results" / FOOTPRINT[path]).read_text())["results"]


@each_file
def test_memory_request_covers_every_worker_with_a_full_cache(path):
    function = load(path)
    measured = footprint(path)["tracking"]["memory_mib_after"]["VmRSS"]
    need = workers(function) * (measured + Settings().cache_bytes / MIB)
    memory = quantity(function["spec"]["resources"]["requests"]["memory"]) / MIB
    assert need <= memory < need + 512, f"{memory} MiB requested for {need:.0f} MiB measured"


@each_file
def test_cpu_request_is_one_core_per_worker_and_a_busy_worker_uses_it(path):
    function = load(path)
    assert quantity(function["spec"]["resources"]["requests"]["cpu"]) == workers(function)
    results = footprint(path) if path == GPU_YAML else json.loads(
        (ROOT / "bench" / "results" / "footprint-cpu-16cores.json").read_text())["results"]
    busy = [v["cores_median"] for k, v in results["tracking"].items() if k.startswith("continue_")]
    assert busy and min(busy) >= 0.9  # a request in flight keeps at least one core busy


@each_file
def test_no_cpu_or_memory_limits(path):
    # The local Docker platform turns limits into `docker run --cpus/--memory`.
    limits = load(path)["spec"]["resources"].get("limits", {})
    assert not {"cpu", "memory"} & set(limits)


@each_file
def test_autoscaler_target_is_written_out(path):
    assert load(path)["spec"]["targetCPU"] == 75  # Nuclio's default (pkg/platform/abstract)


def readme_row(label: str) -> list[str]:
    """The cells after `label` in the README's table of what each build asks for."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"README has {len(rows)} rows labelled {label!r}"
    return [cell.strip().strip("`") for cell in rows[0].strip("|").split("|")[1:]]


def test_readme_states_what_each_build_asks_for():
    cpu, gpu = load(CPU_YAML)["spec"], load(GPU_YAML)["spec"]
    assert readme_row("Workers (`numWorkers`)") == [str(workers({"spec": s})) for s in (cpu, gpu)]
    assert readme_row("CPU request") == [str(s["resources"]["requests"]["cpu"]) for s in (cpu, gpu)]
    assert readme_row("Memory request") == [s["resources"]["requests"]["memory"] for s in (cpu, gpu)]
    limits = [", ".join(f"{k}: {v}" for k, v in s["resources"].get("limits", {}).items()) or "none"
              for s in (cpu, gpu)]
    assert readme_row("Limits") == limits
    assert readme_row("Replicas (`minReplicas` to `maxReplicas`)") == [
        f"{s['minReplicas']} to {s['maxReplicas']}" for s in (cpu, gpu)]
    assert readme_row("Autoscaler target (`targetCPU`)") == [f"{s['targetCPU']}%" for s in (cpu, gpu)]
    # One connection pool per worker, one connection in it: a worker serves one request at a time.
    assert footprint(CPU_YAML)["tracking"]["redis_connections_after"] == 1
    assert readme_row("Redis connections") == [str(workers({"spec": s})) for s in (cpu, gpu)]


def test_readme_states_the_cvat_and_nuclio_versions_the_yamls_need():
    readme = (ROOT / "README.md").read_text()
    needed = set()
    for path in (CPU_YAML, GPU_YAML):
        function = load(path)
        assert "supported_shape_types" in function["metadata"]["annotations"]
        needed.add(NUCLIO_SINCE[function["spec"]["runtime"]])
        [trigger] = function["spec"]["triggers"].values()
        needed |= {NUCLIO_SINCE[key] for key in trigger if key in NUCLIO_SINCE}
        assert f'`runtime: "{function["spec"]["runtime"]}"` arrived in Nuclio' in readme
    nuclio = ".".join(map(str, max(needed)))
    assert re.findall(r"\*\*Nuclio (\S+) or later\*\*", readme) == [nuclio]
    assert re.findall(r"\*\*CVAT (\S+) or later\*\*", readme) == [CVAT_MIN]


def test_readme_soak_and_sizing_figures_are_the_recorded_ones():
    readme = (ROOT / "README.md").read_text()
    soak = json.loads((ROOT / "bench/results/soak.json").read_text())
    assert all(soak["targets"].values()), soak["targets"]
    statuses = soak["answers_by_status"]
    answers = f"{soak['requests']:,}: " + " and ".join(f"{n:,} × {s}" for s, n in sorted(statuses.items()))
    assert f"| Answers | {answers}," in readme
    assert f"One run at {soak['git_commit'][:7]} " in readme
    sizing = json.loads((ROOT / "bench/results/redis-sizing.json").read_text())
    for size in sizing["sizes"]:
        row = next(line for line in readme.splitlines() if line.startswith(f"| {size['image_size']} "))
        assert f"**{size['steady_used_memory_per_object_mib']:.2f} MiB**" in row, row

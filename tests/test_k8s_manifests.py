"""deploy/kubernetes, checked offline (no cluster, no network).

1. Every base file (deploy/kubernetes/base, as kustomization.yaml lists them) and every
   object an overlay adds validates against the OpenAPI schemas of Kubernetes 1.30
   (kubernetes-validate, strict: an unknown or misplaced field is an error). The schemas
   ship inside the package; nothing is downloaded.
2. What kustomize renders for the default deployment and for each overlay validates
   the same way (`kubectl kustomize` runs offline; skipped where kubectl is missing).
3. Our own rules, on the base and on every rendered variant: the probes ask the gRPC
   health service on the service's own port and name (or `hybrid health` with the
   client certificate where TLS is on: kubelet's gRPC probes cannot do TLS), every
   container has requests and limits and a non-root, read-only, capability-free
   securityContext, the shared /dev/shm is Memory-backed and larger than the KV region,
   prefill and decode sharing it run as one user, the scrape annotations point at the
   containers' metrics ports, the grace period covers the drain, the images are
   docker-compose.yml's, every HYBRID_* variable is a real option.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv_utils = pytest.importorskip("kubernetes_validate.utils")  # the `dev` extra

K8S_VERSION = "1.30"
ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
VARIANTS = [".", "overlays/fpga", "overlays/tls", "overlays/fpga-tls", "overlays/split"]
# The Xilinx/AMD device plugin's resource: amd.com/<shell VBNV>-<shell timestamp>.
U55C = re.compile(r"^(amd\.com/|xilinx\.com/fpga-)xilinx_u55c_gen3x16_xdma_base_3-\d+$")
# Variables read from the environment that are not `hybrid serve` options.
NON_OPTION_ENV = {"HYBRID_XCLBIN"}


# ---- loading -----------------------------------------------------------------------------

def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _load(path: Path) -> list[dict]:
    return _docs(path.read_text())


def _base_files() -> list[Path]:
    kust = _load(BASE / "kustomization.yaml")[0]
    return [BASE / r for r in kust["resources"]]


def _base_docs() -> list[dict]:
    return [d for f in _base_files() for d in _load(f)]


_KUBECTL = shutil.which("kubectl")
_rendered: dict[str, list[dict]] = {}


def _render(variant: str) -> list[dict]:
    if not _KUBECTL:
        pytest.skip("kubectl not installed: the rendered overlays are not checked")
    if variant not in _rendered:
        out = subprocess.run([_KUBECTL, "kustomize", str(K8S / variant)], capture_output=True,
                             text=True, timeout=60, env=os.environ | {"KUBECONFIG": os.devnull})
        assert out.returncode == 0, f"kubectl kustomize {variant}: {out.stderr}"
        _rendered[variant] = _docs(out.stdout)
    return _rendered[variant]


def _validate(doc: dict, where: str) -> None:
    name = f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        used = kv_utils.validate(doc, K8S_VERSION, strict=True)
    except kv_utils.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{name} is not valid Kubernetes {K8S_VERSION}: {path}: {e.message}")
    except kv_utils.SchemaNotFoundError as e:
        pytest.fail(f"{name}: {e.message}")
    assert used == K8S_VERSION, f"{name}: validated against {used}, not {K8S_VERSION}"


# ---- helpers for the rules --------------------------------------------------------------

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
          "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity))
    assert m and m.group(2) in _UNITS, f"unexpected quantity {quantity!r}"
    return int(m.group(1)) * _UNITS[m.group(2)]


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _env(container: dict, docs: list[dict]) -> dict[str, str]:
    """The container's environment: its ConfigMaps (envFrom), then its own env."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in _by_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        name = src["configMapRef"]["name"]
        assert name in maps, f"{container['name']}: ConfigMap {name} is not deployed"
        env |= maps[name]
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "")
    return env


def _role(container: dict) -> str | None:
    cmd = container.get("command") or []
    return cmd[2] if cmd[:2] == ["hybrid", "serve"] and len(cmd) > 2 else None


def _run_as(pod: dict, container: dict, key: str):
    return (container.get("securityContext") or {}).get(
        key, (pod.get("securityContext") or {}).get(key))


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _health_service(role: str) -> str:
    from protos import hybrid_pb2 as pb

    name = {"prefill": "PrefillService", "decode": "DecodeService"}[role]
    return pb.DESCRIPTOR.services_by_name[name].full_name


def _pre_stop_s(container: dict) -> float:
    cmd = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get(
        "command") or []
    return float(cmd[1]) if cmd[:1] == ["sleep"] else 0.0


def _check_probes(role: str, c: dict, env: dict[str, str]) -> None:
    port = int(env["HYBRID_PORT"])
    tls = bool(env.get("HYBRID_TLS_CERT"))
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(kind)
        assert probe, f"{role}: no {kind}"
        if tls:  # kubelet's gRPC probe has no TLS: `hybrid health` with the client cert
            assert "grpc" not in probe, f"{role}: a gRPC {kind} cannot reach a TLS port"
            cmd = probe["exec"]["command"]
            assert cmd[:4] == ["hybrid", "health", "--service", role], cmd
            assert cmd[cmd.index(f"--{role}") + 1] == f"localhost:{port}", cmd
            for opt in ("--tls-ca", "--tls-cert", "--tls-key"):
                assert opt in cmd, f"{role}: {kind} without {opt}"
        else:
            assert probe["grpc"]["port"] == port, f"{role}: {kind} is not on the gRPC port"
            assert probe["grpc"]["service"] == _health_service(role), probe
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300, \
        f"{role}: the startup probe must allow minutes of weight loading"


def _check_container(pod: dict, c: dict, env: dict[str, str], docs: list[dict]) -> None:
    name = c["name"]
    res = c.get("resources") or {}
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            assert r in (res.get(part) or {}), f"{name}: no {part}.{r}"
    # Extended resources (GPUs, FPGAs) cannot be overcommitted: request == limit.
    for r in set(res.get("requests") or {}) | set(res.get("limits") or {}):
        if "/" in r:
            assert res["requests"].get(r) == res["limits"].get(r), f"{name}: {r}"
    sc = c.get("securityContext") or {}
    assert sc.get("allowPrivilegeEscalation") is False, name
    assert sc.get("readOnlyRootFilesystem") is True, name
    assert not sc.get("privileged"), name
    assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{name}: capabilities"
    assert _run_as(pod, c, "runAsNonRoot") is True, name
    uid = _run_as(pod, c, "runAsUser")
    assert isinstance(uid, int) and uid > 0, f"{name}: runAsUser {uid!r}"
    assert c["image"] in _compose_images(), f"{name}: image {c['image']} is not compose's"
    grace = float(env["HYBRID_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > grace + _pre_stop_s(c), \
        f"{name}: terminationGracePeriodSeconds must exceed the drain and the preStop pause"
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    if token := env.get("HYBRID_TOKEN_FILE"):
        d, f = os.path.split(token)
        assert d in mounts, f"{name}: HYBRID_TOKEN_FILE {token} is not on a mounted volume"
        secret = vols[mounts[d]["name"]].get("secret")
        assert secret, f"{name}: the token file must come from a Secret"
        assert f in [i["path"] for i in secret.get("items", [])] or not secret.get("items")
    for var in ("HYBRID_TLS_CERT", "HYBRID_TLS_KEY", "HYBRID_TLS_CA"):
        if env.get(var):
            d = os.path.dirname(env[var])
            assert d in mounts and "secret" in vols[mounts[d]["name"]], f"{name}: {var}"
    for probe in (c.get("readinessProbe") or {}, c.get("livenessProbe") or {}):
        if "httpGet" in probe:  # the openai endpoint
            assert probe["httpGet"]["port"] == int(env["HYBRID_PORT"]), name


def _check_deployment(dep: dict, docs: list[dict]) -> None:
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _matches(dep["spec"]["selector"]["matchLabels"], labels), dep["metadata"]["name"]
    psc = pod.get("securityContext") or {}
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    by_role = {}
    for c in pod["containers"]:
        env = _env(c, docs)
        _check_container(pod, c, env, docs)
        role = _role(c)
        if role in ("prefill", "decode"):
            by_role[role] = (c, env)
            _check_probes(role, c, env)
            ports = {p["containerPort"] for p in c["ports"]}
            assert int(env["HYBRID_PORT"]) in ports, f"{role}: gRPC port not declared"
            metrics = int(env.get("HYBRID_METRICS_PORT", "0"))
            assert metrics and metrics in ports, f"{role}: metrics port off or not declared"
            assert labels.get(f"hybrid-llm/{role}") == "true", f"{role}: role label missing"
            limits = c["resources"]["limits"]
            if env.get("HYBRID_BACKEND") == "fpga-xrt":
                assert [limits[k] for k in limits if U55C.match(k)] == ["1"], f"{role}: U55C"
                assert "nvidia.com/gpu" not in {**limits, **c["resources"]["requests"]}, \
                    f"{role}: the FPGA decoder needs no GPU"
            elif env.get("HYBRID_DEVICE", "auto").startswith("cuda"):
                assert limits.get("nvidia.com/gpu") == c["resources"]["requests"].get(
                    "nvidia.com/gpu") == "1", f"{role}: GPU request"
    if "prefill" in by_role:
        c, env = by_role["prefill"]
        shm = {m["mountPath"]: m for m in c["volumeMounts"]}.get("/dev/shm")
        assert shm, "prefill: no /dev/shm volume (a container's default is 64 MiB)"
        ed = vols[shm["name"]].get("emptyDir")
        assert ed and ed.get("medium") == "Memory", "prefill: /dev/shm must be Memory-backed"
        region = int(env["HYBRID_REGION_MB"]) * 2**20
        assert _bytes(ed["sizeLimit"]) > region, "/dev/shm sizeLimit <= HYBRID_REGION_MB"
        assert _bytes(c["resources"]["limits"]["memory"]) > _bytes(ed["sizeLimit"]), \
            "prefill: the region's tmpfs pages count against its memory limit"
        # A restarted prefill sweeps its dead predecessor's region by pid.
        assert pod.get("shareProcessNamespace") is True
    if len(by_role) == 2:  # the pair: decode maps prefill's region read-only
        (p, penv), (d, denv) = by_role["prefill"], by_role["decode"]
        pm = {m["mountPath"]: m for m in p["volumeMounts"]}["/dev/shm"]
        dm = {m["mountPath"]: m for m in d["volumeMounts"]}.get("/dev/shm")
        assert dm and dm["name"] == pm["name"], "decode must mount prefill's /dev/shm"
        assert dm.get("readOnly") is True, "decode maps the region read-only"
        assert _run_as(pod, p, "runAsUser") == _run_as(pod, d, "runAsUser"), \
            "decode refuses a region its uid does not own: one runAsUser for both"
        assert denv["HYBRID_PREFILL"] == f"localhost:{penv['HYBRID_PORT']}"


def _hosts(addresses: str) -> list[str]:
    """The host names of an address list: "prefill:50051", "a:1,b:2", "dns:///prefill:50051"."""
    return [re.sub(r"^dns:(///)?", "", a.strip()).rpartition(":")[0]
            for a in addresses.split(",")]


def _selected(selector: dict, docs: list[dict]) -> list[dict]:
    return [d for d in _by_kind(docs, "Deployment")
            if _matches(selector, d["spec"]["template"]["metadata"]["labels"])]


def _container_port(dep: dict, target) -> tuple[dict, int] | None:
    for c in dep["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports", []):
            if target in (p.get("name"), p["containerPort"]):
                return c, p["containerPort"]
    return None


def _check_service(svc: dict, docs: list[dict]) -> None:
    name, spec = svc["metadata"]["name"], svc["spec"]
    deps = _selected(spec["selector"], docs)
    assert deps, f"Service {name} selects no Deployment's pods"
    if name in ("prefill", "decode"):
        assert spec.get("clusterIP") == "None", f"Service {name} must be headless"
        assert spec["selector"].get(f"hybrid-llm/{name}") == "true", f"Service {name}: role"
    else:
        assert spec.get("clusterIP") != "None", f"Service {name}: a normal Service"
    for port in spec["ports"]:
        for dep in deps:
            assert _container_port(dep, port["targetPort"]), (name, port, dep["metadata"])
    ann = svc["metadata"].get("annotations") or {}
    if ann.get("prometheus.io/scrape") == "true":
        assert ann["prometheus.io/path"] == "/metrics"
        ports = [p for p in spec["ports"] if str(p["port"]) == ann["prometheus.io/port"]]
        assert len(ports) == 1, f"Service {name}: prometheus.io/port is not one of its ports"
        port = ports[0]
        for dep in deps:
            c, number = _container_port(dep, port["targetPort"])
            assert number == int(_env(c, docs)["HYBRID_METRICS_PORT"]), \
                f"Service {name}: scrape port {number} is not {c['name']}'s metrics port"


def _check_pod_annotations(dep: dict, docs: list[dict]) -> None:
    ann = dep["spec"]["template"]["metadata"].get("annotations") or {}
    if ann.get("prometheus.io/scrape") == "true":
        assert ann["prometheus.io/path"] == "/metrics"
        ports = {_env(c, docs).get("HYBRID_METRICS_PORT")
                 for c in dep["spec"]["template"]["spec"]["containers"]}
        assert ann["prometheus.io/port"] in ports, dep["metadata"]["name"]


def _check_rules(docs: list[dict]) -> None:
    deps = _by_kind(docs, "Deployment")
    assert deps
    for dep in deps:
        _check_deployment(dep, docs)
        _check_pod_annotations(dep, docs)
    services = {s["metadata"]["name"]: s for s in _by_kind(docs, "Service")}
    assert {"prefill", "decode", "openai"} <= set(services)
    for svc in services.values():
        _check_service(svc, docs)
    for pdb in _by_kind(docs, "PodDisruptionBudget"):
        assert _selected(pdb["spec"]["selector"]["matchLabels"], docs), pdb["metadata"]
    for dep in deps:  # every Deployment has a disruption budget
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert any(_matches(p["spec"]["selector"]["matchLabels"], labels)
                   for p in _by_kind(docs, "PodDisruptionBudget")), dep["metadata"]["name"]
    # The OpenAI endpoint asks for the KV transport the layout allows.
    pods = [d["spec"]["template"]["spec"] for d in deps]
    pair = any({_role(c) for c in p["containers"]} >= {"prefill", "decode"} for p in pods)
    for dep in deps:
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if _role(c) == "openai":
                env = _env(c, docs)
                assert env["HYBRID_KV_TRANSPORT"] == ("shm" if pair else "grpc")
                assert set(_hosts(env["HYBRID_PREFILL"])) <= set(services)
                assert set(_hosts(env["HYBRID_DECODE"])) <= set(services)
            if _role(c) == "decode" and not pair:
                assert set(_hosts(_env(c, docs)["HYBRID_PREFILL"])) <= set(services)


class _ComposeLoader(yaml.SafeLoader):
    """Compose's own tags (`!reset`, `!override`) read as plain values."""


_ComposeLoader.add_multi_constructor(
    "!", lambda loader, _tag, node: (loader.construct_sequence(node) if isinstance(
        node, yaml.SequenceNode) else loader.construct_mapping(node) if isinstance(
        node, yaml.MappingNode) else loader.construct_scalar(node)))


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)["services"]


_images: set[str] = set()


def _compose_images() -> set[str]:
    if not _images:
        for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
            _images.update(s["image"] for s in _compose(name).values() if "image" in s)
    return _images


# ---- tests -------------------------------------------------------------------------------

def test_schemas_are_shipped_for_the_stated_version():
    assert K8S_VERSION in kv_utils.all_versions() or \
        f"{K8S_VERSION}.0" in kv_utils.all_versions(), kv_utils.all_versions()


def test_kustomizations_list_every_file():
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert {p.name for p in _base_files()} == on_disk
    assert _load(K8S / "kustomization.yaml")[0]["resources"] == ["base"]
    for variant in VARIANTS[1:]:
        kust = _load(K8S / variant / "kustomization.yaml")[0]
        assert "../../base" in kust["resources"], variant


def test_base_files_validate():
    for f in _base_files():
        docs = _load(f)
        assert docs, f
        for doc in docs:
            _validate(doc, str(f.relative_to(ROOT)))


def test_overlay_objects_validate_on_their_own():
    """The complete objects overlays/split adds (patches are partial by nature)."""
    kust = _load(K8S / "overlays/split/kustomization.yaml")[0]
    for r in kust["resources"]:
        if r.endswith(".yaml"):
            for doc in _load(K8S / "overlays/split" / r):
                _validate(doc, f"overlays/split/{r}")


def test_base_follows_the_rules():
    _check_rules(_base_docs())


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_variant_validates_and_follows_the_rules(variant):
    docs = _render(variant)
    for doc in docs:
        _validate(doc, f"kustomize {variant}")
    _check_rules(docs)


def test_default_deployment_is_the_base():
    assert _render(".") == _docs(subprocess.run(
        [_KUBECTL, "kustomize", str(BASE)], capture_output=True, text=True, check=True,
        timeout=60).stdout)


def test_variants_differ_where_they_should():
    def containers(docs):
        return {c["name"] + "@" + d["metadata"]["name"]: (c, _env(c, docs))
                for d in _by_kind(docs, "Deployment")
                for c in d["spec"]["template"]["spec"]["containers"]}

    base = containers(_render("."))
    fpga = containers(_render("overlays/fpga"))
    dec, env = fpga["decode@hybrid-pair"]
    assert env["HYBRID_BACKEND"] == "fpga-xrt" and env["HYBRID_XCLBIN"].endswith(".xclbin")
    assert [k for k in dec["resources"]["limits"] if U55C.match(k)]
    assert fpga["prefill@hybrid-pair"][0] == base["prefill@hybrid-pair"][0]
    for variant in ("overlays/tls", "overlays/fpga-tls"):
        tls = containers(_render(variant))
        for key in ("prefill@hybrid-pair", "decode@hybrid-pair"):
            assert tls[key][1]["HYBRID_TLS_CA"], (variant, key)  # client certs required
        assert tls["openai@hybrid-openai"][1]["HYBRID_TLS_CERT"].endswith("client.pem")
    split = containers(_render("overlays/split"))
    assert set(split) == {"prefill@hybrid-prefill", "decode@hybrid-decode",
                          "openai@hybrid-openai"}
    assert split["openai@hybrid-openai"][1]["HYBRID_KV_TRANSPORT"] == "grpc"
    assert not [m for m in split["decode@hybrid-decode"][0]["volumeMounts"]
                if m["mountPath"] == "/dev/shm"]


def test_fpga_resource_name_is_documented():
    patch = _load(K8S / "components/fpga/decode-fpga.yaml")[0]
    (c,) = patch["spec"]["template"]["spec"]["containers"]
    names = [k for k in c["resources"]["limits"] if U55C.match(k)]
    assert names == [k for k in c["resources"]["requests"] if U55C.match(k)] and names
    assert names[0] in (ROOT / "docs" / "deploy.md").read_text()


def test_images_are_the_compose_images():
    """Each base container runs the image compose runs the same service with."""
    compose = _compose()
    roles = set()
    for dep in _by_kind(_base_docs(), "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            roles.add(_role(c))
            assert c["image"] == compose[_role(c)]["image"], c["name"]
    assert roles == {"prefill", "decode", "openai"}


def test_every_hybrid_variable_is_an_option():
    from client.cmd_serve import serve

    options = {p.envvar for p in serve.params if getattr(p, "envvar", None)}
    docs = _base_docs() + [d for sub in ("components", "overlays")
                           for f in (K8S / sub).rglob("*.yaml") for d in _load(f)
                           if d.get("kind") == "Deployment" and "spec" in d]
    seen = set(_by_kind(docs, "ConfigMap")[0]["data"])
    for dep in _by_kind(docs, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            seen |= {e["name"] for e in c.get("env", [])}
    unknown = {v for v in seen if v.startswith("HYBRID_")} - options - NON_OPTION_ENV
    assert not unknown, f"not `hybrid serve` options: {sorted(unknown)}"

"""Strict checks of Gantry's Helm chart, without a cluster.

For the default values and each scenario in scenarios/: Helm's strict lint for Kubernetes 1.29
and 1.33, the values schema, an offline render through the Helm SDK, every rendered object
validated against the Kubernetes 1.29 and 1.33 schemas in strict mode (unknown fields and kinds
are errors), and a checkov security scan with zero failed checks. Then what the rendered objects
must say (GPUs, DNS names, hardening), and invalid values refused with a clear message.

Run: python -m unittest discover -s helm/tests  (scripts/test installs the tools: helm-python-sdk,
kubernetes-validate, PyYAML; checkov from the CHECKOV variable, its own virtualenv).

Every rendered document is parsed strictly: a key repeated in one mapping is an error, as YAML
says and as `helm install` enforces (PyYAML's own loaders keep the last value silently).
"""

import base64
import json
import os
import pathlib
import subprocess
import tempfile
import tomllib
import unittest
from unittest import mock

import helm_python
import kubernetes_validate
import yaml
from helm_python.chart import Chart, lint

HERE = pathlib.Path(__file__).resolve().parent
CHART = HERE.parent / "gantry"
NAMESPACE = "training"
RELEASE = "gantry"
KUBE_VERSIONS = ["1.29.0", "1.33.0"]


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated in one mapping (YAML forbids it)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key; the base constructor reports it
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r} (first on line {first.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def strict_load_all(text):
    return list(yaml.load_all(text, Loader=StrictLoader))


def scenarios():
    yield "default", {}
    for path in sorted((HERE / "scenarios").glob("*.yaml")):
        (values,) = strict_load_all(path.read_text())
        yield path.stem, values


def render(values):
    with Chart.load(CHART) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in strict_load_all(text):
            if doc:
                objects.append(doc)
    return manifests, objects


def find(objects, kind, component=None):
    found = [
        o
        for o in objects
        if o["kind"] == kind
        and (
            component is None
            or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]
    assert found, f"no {kind} {component or ''}"
    return found


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


class ChartTest(unittest.TestCase):
    def test_lint_render_validate_and_scan_every_scenario(self):
        checkov = os.environ.get("CHECKOV")
        for name, values in scenarios():
            with self.subTest(scenario=name):
                for version in KUBE_VERSIONS:
                    report = lint(
                        CHART,
                        values,
                        strict=True,
                        namespace=NAMESPACE,
                        kube_version=f"v{version}",
                    )
                    problems = [m for m in report["messages"] if m["severity"] >= 2]
                    problems += report.get("errors") or []
                    self.assertEqual(problems, [], f"helm lint ({version})")
                manifests, objects = render(values)
                self.assertTrue(any(t.endswith("NOTES.txt") for t in manifests))
                kinds = {o["kind"] for o in objects}
                self.assertTrue(
                    {"StatefulSet", "Service", "ConfigMap", "ServiceAccount",
                     "NetworkPolicy", "PodDisruptionBudget"} <= kinds,
                    kinds,
                )
                for sts in find(objects, "StatefulSet"):
                    # The API server refuses a selector its pod template's labels don't match.
                    selector = sts["spec"]["selector"]["matchLabels"]
                    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
                    self.assertLessEqual(selector.items(), pod_labels.items(), sts["metadata"]["name"])
                for obj in objects:
                    self.assertEqual(obj["metadata"].get("namespace"), NAMESPACE, obj["kind"])
                    for version in KUBE_VERSIONS:
                        # Raises on unknown fields (strict) and on unknown kinds.
                        kubernetes_validate.validate(obj, version, strict=True)
                if checkov:
                    self.assert_security_scan_passes(checkov, objects)

    def assert_security_scan_passes(self, checkov, objects):
        with tempfile.TemporaryDirectory() as out:
            for i, obj in enumerate(objects):
                path = pathlib.Path(out, f"{i:02}-{obj['kind']}.yaml")
                path.write_text(yaml.safe_dump(obj))
            run = subprocess.run(
                [checkov, "-d", out, "--framework", "kubernetes", "--skip-download",
                 "--quiet", "-o", "json"],
                capture_output=True,
                text=True,
            )
            report = json.loads(run.stdout) if run.stdout.strip() else {}
            reports = report if isinstance(report, list) else [report]
            failed = [
                (c["check_id"], c["resource"])
                for r in reports
                for c in r.get("results", {}).get("failed_checks", [])
            ]
            passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
            self.assertEqual(failed, [], "checkov findings")
            self.assertGreater(passed, 50, f"checkov ran no checks: {run.stderr[-2000:]}")

    def test_the_strict_parse_refuses_a_duplicate_key(self):
        duplicated = (
            "kind: ConfigMap\n"
            "---\n"
            "kind: StatefulSet\n"
            "spec:\n"
            "  template:\n"
            "    metadata:\n"
            "      labels:\n"
            "        app.kubernetes.io/name: gantry\n"
            "        app.kubernetes.io/component: worker\n"
            "        app.kubernetes.io/name: gantry\n"
        )
        # PyYAML's own loader keeps the last value silently: the leniency this guards against.
        self.assertEqual(len(list(yaml.safe_load_all(duplicated))), 2)
        with self.assertRaisesRegex(
            yaml.constructor.ConstructorError, "duplicate key 'app.kubernetes.io/name'"
        ):
            strict_load_all(duplicated)
        # Inside a sequence too, and the same key in two different mappings is fine.
        with self.assertRaisesRegex(yaml.constructor.ConstructorError, "duplicate key 'name'"):
            strict_load_all("containers:\n  - name: a\n    image: x\n    name: b\n")
        self.assertEqual(
            strict_load_all("a: {name: x}\nb: {name: x}\n"),
            [{"a": {"name": "x"}, "b": {"name": "x"}}],
        )
        # And render() parses what Helm renders with it.
        with mock.patch.object(Chart, "render", return_value={"templates/x.yaml": duplicated}):
            with self.assertRaisesRegex(yaml.constructor.ConstructorError, "duplicate key"):
                render({})

    def test_gpu_workers_ask_for_gpus_and_cpu_workers_do_not(self):
        scenario = dict(scenarios())
        for name, gpus in [("gpu", 8), ("cpu", None), ("default", None)]:
            _, objects = render(scenario[name])
            (workers,) = find(objects, "StatefulSet", "worker")
            (container,) = workers["spec"]["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            self.assertEqual(limits.get("nvidia.com/gpu"), gpus, name)
            if gpus:
                self.assertTrue(container["image"].endswith(scenario["gpu"]["image"]["digest"]))
                tolerations = workers["spec"]["template"]["spec"]["tolerations"]
                self.assertIn("nvidia.com/gpu", [t["key"] for t in tolerations])
            else:
                self.assertNotIn("-cuda", container["image"])

    def test_ranks_advertise_stable_names_of_the_headless_service(self):
        _, objects = render({})
        (workers,) = find(objects, "StatefulSet", "worker")
        headless = [s for s in find(objects, "Service", "worker") if s["spec"].get("clusterIP") == "None"]
        self.assertEqual(len(headless), 1)
        service = headless[0]
        self.assertEqual(workers["spec"]["serviceName"], service["metadata"]["name"])
        pod_labels = workers["spec"]["template"]["metadata"]["labels"]
        self.assertTrue(service["spec"]["selector"].items() <= pod_labels.items())
        # A rank's peer-table entry is its worker's advertised host and a port; for pod
        # gantry-worker-0 that is gantry-worker-0.gantry-worker.training.svc.cluster.local,
        # the DNS name the headless Service gives the pod.
        (container,) = workers["spec"]["template"]["spec"]["containers"]
        env = env_of(container)
        self.assertEqual(
            env["GANTRY_ADVERTISE_HOST"],
            f"$(POD_NAME).{service['metadata']['name']}.$(POD_NAMESPACE).svc.cluster.local",
        )
        names = [e["name"] for e in container["env"]]
        self.assertLess(names.index("POD_NAME"), names.index("GANTRY_ADVERTISE_HOST"))
        self.assertLess(names.index("POD_NAMESPACE"), names.index("GANTRY_ADVERTISE_HOST"))
        # Workers reach the coordinator's Service by name.
        (config,) = find(objects, "ConfigMap")
        (coordinator_service,) = find(objects, "Service", "coordinator")
        self.assertIn(
            f'coordinator = "https://{coordinator_service["metadata"]["name"]}.{NAMESPACE}.svc:7070"',
            config["data"]["worker.toml"],
        )

    def test_s3_credentials_come_from_a_secret_as_files(self):
        _, objects = render(dict(scenarios())["s3"])
        (workers,) = find(objects, "StatefulSet", "worker")
        spec = workers["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = env_of(container)
        self.assertNotIn("AWS_SECRET_ACCESS_KEY", env)
        self.assertEqual(
            env["AWS_SECRET_ACCESS_KEY_FILE"], "/var/run/secrets/gantry/s3/AWS_SECRET_ACCESS_KEY"
        )
        secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
        self.assertEqual(secrets, ["gantry-auth", "gantry-tls", "gantry-s3-credentials"])
        (config,) = find(objects, "ConfigMap")
        self.assertIn('checkpoint_url = "s3://training-checkpoints/gantry"', config["data"]["coordinator.toml"])
        self.assertFalse([o for o in objects if o["kind"] == "PersistentVolumeClaim"])

    def test_azure_store_options_reach_the_worker_config_and_its_key_a_file(self):
        _, objects = render(dict(scenarios())["azure"])
        (workers,) = find(objects, "StatefulSet", "worker")
        spec = workers["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = env_of(container)
        self.assertNotIn("AZURE_STORAGE_ACCOUNT_KEY", env)
        self.assertEqual(
            env["AZURE_STORAGE_ACCOUNT_KEY_FILE"],
            "/var/run/secrets/gantry/azure/AZURE_STORAGE_ACCOUNT_KEY",
        )
        secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
        self.assertEqual(secrets, ["gantry-auth", "gantry-tls", "gantry-azure-credentials"])
        (config,) = find(objects, "ConfigMap")
        worker = tomllib.loads(config["data"]["worker.toml"])
        self.assertEqual(
            worker["object_store"],
            {"azure_storage_account_name": "gantrytraining", "timeout": "60s"},
        )
        self.assertIn('checkpoint_url = "az://checkpoints/gantry"', config["data"]["coordinator.toml"])

    def test_tokens_come_from_a_secret_as_files_and_workers_get_only_the_join_token(self):
        for values, secret in [({}, "gantry-auth"), ({"auth": {"existingSecret": "mine"}}, "mine")]:
            with self.subTest(values=values):
                manifests, objects = render(values)
                generated = [
                    o for o in objects
                    if o["kind"] == "Secret" and o["metadata"]["name"] == secret
                ]
                if values:
                    self.assertEqual(generated, [], "an existing Secret is used, not made")
                else:
                    (made,) = generated
                    self.assertEqual(sorted(made["data"]), ["admin-token", "join-token"])
                    self.assertNotEqual(made["data"]["admin-token"], made["data"]["join-token"])
                (config,) = find(objects, "ConfigMap")
                tokens = [] if values else list(generated[0]["data"].values())
                for text in config["data"].values():
                    self.assertNotIn("token", text.lower())
                    for token in tokens:
                        self.assertNotIn(token, text)
                mounted = {}
                for component in ["coordinator", "worker"]:
                    (sts,) = find(objects, "StatefulSet", component)
                    spec = sts["spec"]["template"]["spec"]
                    (container,) = spec["containers"]
                    env = env_of(container)
                    self.assertFalse([k for k in env if k.endswith("TOKEN")], env)
                    self.assertEqual(
                        env["GANTRY_JOIN_TOKEN_FILE"], "/var/run/secrets/gantry/auth/join-token"
                    )
                    mounted[component] = [
                        item["key"]
                        for v in spec["volumes"]
                        if v.get("secret", {}).get("secretName") == secret
                        for item in v["secret"]["items"]
                    ]
                self.assertEqual(mounted["coordinator"], ["admin-token", "join-token"])
                self.assertEqual(mounted["worker"], ["join-token"])

    def test_pods_are_hardened(self):
        _, objects = render({})
        for sts in find(objects, "StatefulSet"):
            pod = sts["spec"]["template"]["spec"]
            self.assertTrue(pod["securityContext"]["runAsNonRoot"])
            self.assertEqual(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
            self.assertFalse(pod["automountServiceAccountToken"])
            for c in pod["containers"]:
                sc = c["securityContext"]
                self.assertTrue(sc["readOnlyRootFilesystem"])
                self.assertFalse(sc["allowPrivilegeEscalation"])
                self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                self.assertIn("livenessProbe", c)
                self.assertIn("readinessProbe", c)
                self.assertIn("/tmp", [m["mountPath"] for m in c["volumeMounts"]])
        (coordinator,) = find(objects, "StatefulSet", "coordinator")
        (container,) = coordinator["spec"]["template"]["spec"]["containers"]
        # The kubelet's gRPC probes cannot speak TLS: the coordinator is probed over HTTP.
        self.assertEqual(container["livenessProbe"]["httpGet"]["path"], "/healthz")
        self.assertEqual(container["readinessProbe"]["httpGet"]["port"], "metrics")

    def test_the_coordinator_serves_tls_that_workers_verify(self):
        _, objects = render({})
        (tls,) = [o for o in objects if o["metadata"]["name"] == "gantry-tls"]
        self.assertEqual(tls["type"], "kubernetes.io/tls")
        self.assertEqual(sorted(tls["data"]), ["ca.crt", "tls.crt", "tls.key"])
        with tempfile.TemporaryDirectory() as d:
            for key in ["ca.crt", "tls.crt"]:
                pathlib.Path(d, key).write_bytes(base64.b64decode(tls["data"][key]))
            # The certificate chains to the CA it ships with and names the Service and loopback.
            verify = subprocess.run(
                ["openssl", "verify", "-CAfile", f"{d}/ca.crt", f"{d}/tls.crt"],
                capture_output=True, text=True,
            )
            self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)
            names = subprocess.run(
                ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", f"{d}/tls.crt"],
                capture_output=True, text=True, check=True,
            ).stdout
        for name in ["gantry-coordinator.training.svc", "IP Address:127.0.0.1"]:
            self.assertIn(name, names)
        (config,) = find(objects, "ConfigMap")
        self.assertIn('tls_cert = "/var/run/secrets/gantry/tls/tls.crt"', config["data"]["coordinator.toml"])
        self.assertIn('coordinator = "https://gantry-coordinator.training.svc:7070"', config["data"]["worker.toml"])
        (workers,) = find(objects, "StatefulSet", "worker")
        spec = workers["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        self.assertEqual(env_of(container)["GANTRY_CA_CERT"], "/var/run/secrets/gantry/tls/ca.crt")
        items = [
            item["key"]
            for v in spec["volumes"]
            if v.get("secret", {}).get("secretName") == "gantry-tls"
            for item in v["secret"]["items"]
        ]
        self.assertEqual(items, ["ca.crt"], "workers get the CA, never the key")

    def test_the_tls_scenario_uses_its_own_secrets_and_makes_none(self):
        _, objects = render(dict(scenarios())["tls"])
        self.assertFalse([o for o in objects if o["kind"] == "Secret"], "the chart made a Secret")
        mounted = set()
        for sts in find(objects, "StatefulSet"):
            for v in sts["spec"]["template"]["spec"]["volumes"]:
                if "secret" in v:
                    mounted.add(v["secret"]["secretName"])
        self.assertEqual(mounted, {"corp-gantry-tls", "corp-gantry-tokens"})

    def test_the_allow_list_of_stores_reaches_the_coordinator_config(self):
        _, objects = render({"coordinator": {"allowedStores": ["s3://team/", "http://minio:9000"]}})
        (config,) = find(objects, "ConfigMap")
        parsed = tomllib.loads(config["data"]["coordinator.toml"])
        self.assertEqual(parsed["allowed_stores"], ["s3://team/", "http://minio:9000"])
        _, objects = render({})
        (config,) = find(objects, "ConfigMap")
        self.assertNotIn("allowed_stores", tomllib.loads(config["data"]["coordinator.toml"]))

    def test_tls_from_an_existing_secret_or_cert_manager(self):
        _, objects = render({"tls": {"existingSecret": "corp-tls"}})
        self.assertFalse([o for o in objects if o["metadata"]["name"] == "gantry-tls"])
        (coordinator,) = find(objects, "StatefulSet", "coordinator")
        secrets = [v["secret"]["secretName"] for v in coordinator["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        self.assertIn("corp-tls", secrets)
        issuer = {"name": "corp-ca", "kind": "ClusterIssuer"}
        manifests, _ = render({"tls": {"certManager": {"enabled": True, "issuerRef": issuer}}})
        (text,) = [t for n, t in manifests.items() if n.endswith("tls.yaml")]
        (certificate,) = [o for o in strict_load_all(text) if o]
        self.assertEqual(certificate["kind"], "Certificate")
        self.assertEqual(certificate["spec"]["secretName"], "gantry-tls")
        self.assertEqual(certificate["spec"]["issuerRef"], issuer)
        self.assertIn("gantry-coordinator.training.svc", certificate["spec"]["dnsNames"])

    def test_invalid_values_are_refused_with_a_clear_message(self):
        cases = [
            ({"workers": {"replicas": "two"}}, "replicas"),
            ({"workers": {"slots": 0}}, "slots"),
            ({"image": {"repository": ""}}, "repository"),
            ({"image": {"digest": "latest"}}, "digest"),
            ({"coordinator": {"logFormat": "xml"}}, "logFormat"),
            ({"workers": {"gpu": {"enabled": True, "perWorker": 0}}}, "perWorker"),
            ({"workers": {"replicsa": 3}}, "replicsa"),
            # An S3 store without the Secret holding its credentials.
            ({"checkpoints": {"url": "s3://bucket/x", "s3": {"region": "eu-west-1"}}}, "credentialsSecret"),
            ({"checkpoints": {"url": "ftp://bucket/x"}}, "url"),
            # A credential among the store options (they are rendered into a ConfigMap).
            (
                {"checkpoints": {"url": "az://c/x", "storeOptions": {"azure_storage_account_key": "x"}}},
                "invalid propertyName 'azure_storage_account_key'",
            ),
        ]
        with Chart.load(CHART) as chart:
            for values, field in cases:
                with self.subTest(values=values):
                    with self.assertRaises(helm_python.errors.HelmValuesError) as refused:
                        chart.validate_schema(values)
                    self.assertIn(field, str(refused.exception))


if __name__ == "__main__":
    unittest.main()

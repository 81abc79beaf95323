"""Download the wheels that the offline GPU machines lack for one vLLM release.

Their image already holds torch 2.11 (CUDA 13), triton, transformers and
the packages listed in gpu_have.txt; this walks vLLM's requirements (and
theirs) and downloads, for CPython 3.12 on manylinux x86_64, only what is
missing. Heavy optional GPU kernels that vLLM imports lazily are skipped.

usage: python3 benchmarks/gpu/resolve_wheels.py OUTDIR REQUIREMENT...
(run by make-vllm-bundle.sh)
"""
import glob
import os
import re
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = os.path.dirname(os.path.abspath(__file__))
HAVE = {canonicalize_name(x.strip()) for x in open(os.path.join(HERE, "gpu_have.txt")) if x.strip()}
SKIP = {canonicalize_name(x) for x in (
    "torch torchaudio torchvision torchcodec flashinfer-python humming-kernels nvidia-cutlass-dsl "
    "quack-kernels tilelang tokenspeed-mla pynvvideocodec nvidia-cudnn-frontend fastsafetensors "
    "nvtx triton numba llvmlite").split()}
ENV = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
           platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
           os_name="posix", platform_python_implementation="CPython")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (5, 12, 17, 18, 24, 26, 27, 28, 29, 31, 32, 34, 35, 36, 38, 39)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def download(spec, out):
    cmd = ["pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", out, spec]
    for p in PLATFORMS:
        cmd[4:4] = ["--platform", p]
    if subprocess.run(cmd, capture_output=True).returncode:
        # pure-python sdists and universal wheels
        r = subprocess.run(["pip", "download", "-q", "--no-deps", "-d", out, spec], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"cannot download {spec}: {r.stderr[-400:]}")


def main(out, reqs):
    os.makedirs(out, exist_ok=True)
    queue, seen = [Requirement(r) for r in reqs], set()
    while queue:
        req = queue.pop(0)
        name = canonicalize_name(req.name)
        key = (name, tuple(sorted(req.extras)))
        if key in seen or name in SKIP or name in HAVE:
            continue
        seen.add(key)
        files = [f for f in glob.glob(os.path.join(out, "*"))
                 if canonicalize_name(re.split(r"-\d", os.path.basename(f))[0]) == name]
        if not files:  # the first requirement met for a name picks its version
            download(f"{req.name}{req.specifier}", out)
            files = [f for f in glob.glob(os.path.join(out, "*"))
                     if canonicalize_name(re.split(r"-\d", os.path.basename(f))[0]) == name]
        if not files or not files[0].endswith(".whl"):
            continue
        z = zipfile.ZipFile(files[0])
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            dep = Requirement(line.split(":", 1)[1].strip())
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate(dict(ENV, extra=e)) for e in extras):
                queue.append(dep)
    print(f"{len(os.listdir(out))} files in {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

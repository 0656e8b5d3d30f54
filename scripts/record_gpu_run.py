"""Appends this GPU's verification record to rnnfused/gpu_verified.json (make gpu-check runs
it after every CUDA test passed): the hash of the device sources the build compiled, the
architecture, card, date, versions and the test summary. rnnfused.dispatch then lets `auto` run
our fused kernels on this architecture for this build. A copy goes to $OUT when set, since the
GPU machine's tree does not come back.

    python scripts/record_gpu_run.py "<pytest summary line>"
"""

import datetime
import json
import os
import shutil
import subprocess
import sys

import torch

import rnnfused
from rnnfused import dispatch


def main(summary):
    if not torch.cuda.is_available() or "cuda" not in rnnfused.backends():
        print("record_gpu_run: no GPU or no CUDA kernels in this build: nothing recorded")
        return 1
    major, minor = torch.cuda.get_device_capability()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    record = {
        "device_source_hash": rnnfused._C.device_source_hash,
        "commit": commit,
        "compute_capability": major * 10 + minor,
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()),
        "command": "make gpu-check",
        "result": "passed",
        "tests": summary,
    }
    path = dispatch.VERIFIED_FILE
    with open(path) as f:
        data = json.load(f)
    data["records"] = [r for r in data.get("records", [])
                       if (r.get("device_source_hash"), r.get("compute_capability"))
                       != (record["device_source_hash"], record["compute_capability"])] + [record]
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    if os.environ.get("OUT"):
        shutil.copy(path, os.path.join(os.environ["OUT"], os.path.basename(path)))
    print(f"record_gpu_run: {record['card']} (compute capability {major}.{minor}) verified build "
          f"{record['device_source_hash'][:12]} at {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:]) or "CUDA tests passed"))

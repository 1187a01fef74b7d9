"""Nothing is downloaded at run time, and nothing asks the network either.

bitsandbytes 0.50 asks the Hugging Face Hub for a kernel when it is imported on CPUs with
AVX512-BF16 (a publisher-trust lookup first, the kernel's code after it if the publisher were
trusted); importing the trainer imports it. The trainer therefore runs with the Hub offline
unless the environment says otherwise. The tests' conftest sets HF_HUB_OFFLINE itself, so the
check runs in a fresh process without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT

PROBE = """
import socket
lookups = []
def refuse(*args, **kwargs):
    lookups.append(args[:2])
    raise OSError("network refused by the test")
socket.getaddrinfo = refuse
import trainer.run.loop  # the trainer's whole import: torch, diffusers, transformers, bitsandbytes
import huggingface_hub.constants as hub
print(hub.HF_HUB_OFFLINE, lookups)
"""


def test_importing_the_trainer_looks_up_no_host_and_keeps_the_hub_offline():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True []"

"""What the Triton test modules share: a compile backend that records dynamo's graphs, and the subprocess
that compiles kernels for sm_90 without a GPU (``test_triton_ops``, ``test_shared_projection_triton``,
``test_compile``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


class GraphRecorder:
    """A compile backend that keeps dynamo's graphs and hands them on to aot_eager."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    def code(self) -> str:
        return "\n".join(graph.code for graph in self.graphs)


# A stand-in driver names sm_90 as the target; a kernel passed to compile_instead_of_launching is compiled by
# Triton's own runtime (warmup=True: specialised and compiled, not launched) and recorded in `compiled`.
_HOPPER_DRIVER = """
class Hopper:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 0

triton.runtime.driver.set_active(Hopper())
compiled = []

def compile_instead_of_launching(kernel):
    def run(*args, grid, warmup, **kwargs):
        compiled.append((kernel, JITFunction.run(kernel, *args, grid=grid, warmup=True, **kwargs)))
    kernel.run = run
"""


def hopper_script(imports: str, body: str) -> str:
    """A script that compiles Triton kernels for sm_90 without a GPU: the common imports, ``imports``, the
    stand-in driver (``compiled``, ``compile_instead_of_launching``), then ``body``."""
    common = ("import json, os, re, subprocess, sys, tempfile\nimport torch, triton\n"
              "from triton.backends.compiler import GPUTarget\nfrom triton.runtime.jit import JITFunction\n"
              "import stdd_kernels\n")
    return common + textwrap.dedent(imports).strip() + "\n" + _HOPPER_DRIVER + textwrap.dedent(body)


def run_hopper_script(script: str, configs, timeout: float) -> list[dict]:
    """Run ``script`` (:func:`hopper_script`) without TRITON_INTERPRET from the repository root, ``configs`` as
    its JSON argument; the JSON lines it prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(configs)], cwd=root, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

"""Compile every fastsd Triton kernel for a GPU on a machine without one, and report what the
compiler made of it: registers, stack frame (local memory: spills), shared memory, and in the
machine code (SASS) the tensor-core instructions (HGMMA on sm_90, HMMA before), the local-memory
traffic (LDL/STL) and the global loads/stores.

    python tools/kernel_report.py                  # sm_90 (H100, H200)
    python tools/kernel_report.py --arch 80        # sm_80 (A100)
    python tools/kernel_report.py --json out.json  # also write the rows as JSON

Nothing runs on a GPU: a compile-only Triton driver stands in for one, and the real launchers
(`fastsd.loss.kernels.divergence_chunked`, `logprob_chunked`, `finish_grads`) are called on small CPU
tensors, so every kernel is specialised exactly as at run time (dtypes, constexprs, 16-byte
alignment, tile configs) for every divergence, clip, target and gradient variant, in bf16 and
fp32. The ptxas, cuobjdump and nvdisasm that ship in the triton wheel do the rest.

It exits with 1 if a GEMM kernel uses local memory or misses the tensor cores for 16-bit inputs,
or any kernel needs more shared memory than the target has or was compiled without FMA fusion.
Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_report: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

# Shared memory per block, opt-in maximum (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
GEMMS = ("_logits_kernel", "_dx_kernel", "_dw_kernel")


class CompileOnlyDriver(DriverBase):
    """A Triton driver for a GPU that is not there: kernels compile for `arch`, launches do nothing."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.launcher_cls = lambda src, metadata: (lambda *args, **kwargs: None)
        shared = SHARED_LIMIT.get(arch, 99 * 1024)

        class Utils:
            @staticmethod
            def get_device_properties(device):
                return {"max_shared_mem": shared, "multiprocessor_count": 1}

            @staticmethod
            def load_binary(name, kernel, shared, device):
                return None, None, 0, 0, 1024  # module, function, registers, spills, max threads

            @staticmethod
            def unload_module(module):
                pass

        self.utils = Utils()

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing can be timed")

    def get_device_interface(self):
        raise RuntimeError("compile-only driver: no device")


def compile_all(N: int = 64, D: int = 256, V: int = 4096) -> None:
    """Call every launcher once per variant; N, D, V only set the 16-byte divisibility."""
    from fastsd.loss import kernels

    for dtype in (torch.bfloat16, torch.float32):
        h, w = torch.randn(N, D, dtype=dtype), torch.randn(V, D, dtype=dtype)
        rows, nv = torch.arange(N), torch.tensor([N])
        targets, scale = torch.randint(0, V, (N,)), torch.ones(N)
        for div, clip in (("forward_kl", None), ("forward_kl", 0.5), ("reverse_kl", None), ("reverse_kl", 0.5),
                          ("jsd", None), ("jsd", 0.5)):
            for grad in (True, False):
                for tgt in (targets, None):  # the entropy with target ids (the trainer's call), not without
                    out = kernels.divergence_chunked(
                        h, w, h, w, rows, nv, tgt, divergence=div, beta=0.5, temperature=1.0, clip=clip,
                        row_scale=scale if grad else None, chunk_size=32, need_dx=grad, need_dw=grad,
                        entropy=None if tgt is None else torch.zeros(N))
                    if grad:  # with an upstream gradient, and without one (scale None)
                        kernels.finish_grads(out[3], out[4], torch.ones(()) if tgt is None else None, dtype, dtype)
        for grad in (True, False):
            for entropy in (None, torch.zeros(N)):
                kernels.logprob_chunked(h, w, rows, nv, targets, temperature=1.0, row_scale=scale if grad else None,
                                        chunk_size=32, need_dx=grad, need_dw=grad, entropy=entropy)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def inspect_cubin(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"\b(REG|STACK):(\d+)", usage))
    ops = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M)

    def count(*prefixes):
        return sum(op.startswith(prefixes) for op in ops)

    return {"regs": int(res["REG"]), "stack": int(res["STACK"]), "hgmma": count("HGMMA"), "hmma": count("HMMA"),
            "ldl_stl": count("LDL", "STL"), "ldg": count("LDG"), "ldgsts": count("LDGSTS"), "stg": count("STG")}


def report(arch: int) -> list[dict]:
    driver.set_active(CompileOnlyDriver(arch))  # for the rest of this process
    compile_all()
    from fastsd.loss.kernels import gemm
    from fastsd.loss.kernels import rows as row_kernels

    out = []
    for fn in (gemm._logits_kernel, gemm._dx_kernel, gemm._dw_kernel, gemm._dw_finish_kernel,
               row_kernels._divergence_row_kernel, row_kernels._logprob_row_kernel):
        for kernel in fn.device_caches[0][0].values():
            names = kernel.src.fn.arg_names
            consts = {names[path[0]]: v for path, v in kernel.src.constants.items() if names[path[0]].isupper()}
            pointers = [t for t in kernel.src.signature.values() if t.startswith("*")]
            half = [t for t in pointers if t in ("*bf16", "*fp16")]
            out.append({"kernel": fn.__name__, "dtype": (half or pointers)[0][1:], "consts": consts,
                        "warps": kernel.metadata.num_warps, "stages": kernel.metadata.num_stages,
                        "fp_fusion": bool(getattr(kernel.metadata, "enable_fp_fusion", False)),
                        "shared": kernel.metadata.shared, **inspect_cubin(kernel.asm["cubin"])})
    return out


def problems(rows: list[dict], arch: int) -> list[str]:
    bad = []
    limit = SHARED_LIMIT.get(arch, 99 * 1024)
    for r in rows:
        name = f"{r['kernel']} {r['dtype']} {r['consts']}"
        if not r["fp_fusion"]:
            bad.append(f"{name}: compiled without FMA fusion (the launcher should pass FP_FUSION)")
        if r["shared"] > limit:
            bad.append(f"{name}: {r['shared']} B of shared memory > {limit}")
        if r["kernel"] in GEMMS:
            if r["stack"] or r["ldl_stl"]:
                bad.append(f"{name}: local memory (stack {r['stack']} B, {r['ldl_stl']} LDL/STL)")
            if r["dtype"] in ("bf16", "fp16") and not (r["hgmma"] if arch >= 90 else r["hmma"]):
                bad.append(f"{name}: no tensor-core instructions")
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    rows = report(args.arch)
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(rows)} kernels compiled")
    cols = ("regs", "stack", "ldl_stl", "shared", "hgmma", "hmma", "ldgsts", "ldg", "stg")
    print(f"{'kernel':24} {'dtype':5} {'w/s':5} " + " ".join(f"{c:>7}" for c in cols) + "  constexprs")
    for r in rows:
        print(f"{r['kernel']:24} {r['dtype']:5} {r['warps']}/{r['stages']:<3} " + " ".join(f"{r[c]:>7}" for c in cols)
              + "  " + " ".join(f"{k}={v}" for k, v in r["consts"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "kernels": rows}, f, indent=1)
    bad = problems(rows, args.arch)
    for b in bad:
        print("PROBLEM:", b)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

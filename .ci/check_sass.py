"""Static checks of the CUDA kernels in a built icakd_fast._C (no GPU needed).

    python .ci/check_sass.py path/to/_C.abi3.so

Reads the machine code with the ``cuobjdump`` shipped with Triton (or CUDA_HOME's) and fails when
- a kernel uses local memory (register spills or stack arrays), or
- the vectorised CAM kernels (``cam_vec_*``) touch the feature map other than in 16-byte vectors:
  each must load with ``LDG.E.128``, and the backward must also store with ``STG.E.128``.
Prints one line per kernel: registers, local bytes, global access widths, and for the innermost
loop with 16-byte accesses its SASS instructions per such access (``instr/vec``, static; per
element of a 16-bit map that is instr/vec / 8 per access the element takes part in).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys


def cuobjdump() -> str:
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if cand and os.path.exists(cand):
            return cand
    sys.exit("check_sass.py: no cuobjdump found (Triton's or CUDA_HOME's)")


def short(name: str) -> str:
    """``cam_vec_bwd_kernel<c10::BFloat16, 8>`` from the mangled name (c++filt when present)."""
    if shutil.which("c++filt"):
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
        m = re.search(r"(\w+_kernel(?:<[^()]*>)?)\(", out)
        if m:
            return m.group(1)
    return name[:80]


def loop_cost(block: str) -> float | None:
    """SASS instructions per 16-byte global access of the innermost loop (a backward branch's
    body) with such accesses, or None when no loop has one (static count, not a timing)."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", block)]
    best = None
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
        vecs = sum(bool(re.search(r"\b(LDG|STG)\S*\.128", t)) for t in body)
        if vecs and (best is None or len(body) < best[1]):  # the innermost such loop
            best = (vecs, len(body))
    return best[1] / best[0] if best else None


def main() -> int:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    lib = sys.argv[1]
    tool = cuobjdump()
    res = subprocess.run([tool, "-res-usage", lib], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "-sass", lib], capture_output=True, text=True, check=True).stdout
    usage = {}
    for fn, line in re.findall(r"Function (\S+):\n\s*(REG:.*)", res):
        fields = dict(re.findall(r"(\w+):(\d+)", line))
        usage[fn] = {k: int(v) for k, v in fields.items()}
    access, per_vec = {}, {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        fn = block.split("\n", 1)[0].strip()
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?((?:LDG|STG|LDL|STL)[A-Z0-9_.]*)", block)
        access[fn] = collections.Counter(ops)
        per_vec[fn] = loop_cost(block)
    if not usage:
        print(f"check_sass.py: no CUDA kernels in {lib}", file=sys.stderr)
        return 1
    errors = []
    for fn in sorted(usage, key=short):
        u, acc = usage[fn], access.get(fn, collections.Counter())
        name = short(fn)
        cost = f"  [{per_vec[fn]:.1f} instr/vec]" if per_vec.get(fn) else ""
        print(f"{name:52s} regs {u.get('REG', 0):3d}  local {u.get('LOCAL', 0):4d} B  "
              + ", ".join(f"{k} x{v}" for k, v in sorted(acc.items())) + cost)
        if u.get("LOCAL", 0) or any(k.startswith(("LDL", "STL")) for k in acc):
            errors.append(f"{name}: local memory in use ({u.get('LOCAL', 0)} B per thread)")
        if "cam_vec_" in fn:
            if not any(k.startswith("LDG") and ".128" in k for k in acc):
                errors.append(f"{name}: no 16-byte loads of the map")
            if "bwd" in fn and not any(k.startswith("STG") and ".128" in k for k in acc):
                errors.append(f"{name}: no 16-byte stores of grad_features")
    if not any("cam_vec_" in fn for fn in usage):
        errors.append("no cam_vec_* kernels found")
    for e in errors:
        print("FAIL:", e, file=sys.stderr)
    print(f"{len(usage)} kernels checked, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

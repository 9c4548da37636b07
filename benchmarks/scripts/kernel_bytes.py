"""The bytes each of inductor's generated kernels moves per call, against its profiled time: an upper bound on
the element-wise traffic of a compiled step, and the bandwidth each kernel reaches.

    python benchmarks/scripts/kernel_bytes.py CODE.log.gz PROFILE.json

CODE.log.gz: the console of a run under TORCH_LOGS=output_code (inductor's generated code); PROFILE.json: the
same run's `bench methods --set profile=true --set profile_top=200` output (method `full`). Bytes come from the
code: each load and store, its element count from xnumel/r0_numel and the index's variables, its width from the
kernel's signature. A broadcast operand (an index that repeats elements) is counted at the full size, so the
bytes are an upper bound and the bandwidths too (BENCHMARKS.md, 2026-12-03 second session)."""
import ast
import gzip
import json
import re
import sys

code = gzip.open(sys.argv[1], "rt").read()
code = re.sub(r"^V\d+ [\d:.]+ \d+ \S+\] \[[^\]]*\] \[__output_code\] ", "", code, flags=re.M)
prof = json.load(open(sys.argv[2]))["result"]["methods"]["full"]["phases"]["top_kernels"]
SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "i1": 1, "i64": 8, "i32": 4, "u8": 1, "i8": 1}
kernels = {}
for m in re.finditer(r"triton_meta=\{'signature': (\{[^}]*\})", code):
    sig = ast.literal_eval(m.group(1))
    d = code.index("@triton.jit", m.end()); body_start = code.index("def ", d)
    name = code[body_start + 4: code.index("(", body_start)]
    end = code.find("''', device_str", body_start)
    body = code[body_start:end]
    xn = re.search(r"xnumel = (\d+)", body); rn = re.search(r"r0_numel = (\d+)", body)
    xn = int(xn.group(1)) if xn else 1; rn = int(rn.group(1)) if rn else 1
    total = 0
    for op in re.finditer(r"tl\.(load|store)\((\w+) \+ \(([^)]*)\)", body):
        ptr, idx = op.group(2), op.group(3)
        dt = sig.get(ptr, "*fp32").lstrip("*")
        has_x = bool(re.search(r"\bx\d+\b", idx)); has_r = bool(re.search(r"\br0_\d+\b", idx))
        # element count: the full iteration space when both (or a pointwise kernel's x), else one axis
        if has_x and has_r:
            n = xn * rn
        elif has_r:
            n = rn
        elif has_x:
            n = xn
        else:
            n = 1
        total += n * SIZE.get(dt, 4)
    kernels[name] = total
rows = []
for k in prof:
    if k["kind"] != "fused":
        continue
    b = kernels.get(k["name"])
    if b is None:
        continue
    per_call_us = k["ms"] * 1000 / k["count"]
    rows.append((k["ms"], k["name"][:70], k["count"], b / 1e6, b / per_call_us / 1e6))
tot_ms = sum(r[0] for r in rows); tot_gb = sum(r[3] * r[2] for r in rows) / 1e3
for r in sorted(rows, reverse=True)[:15]:
    print(f"{r[0]:6.3f} ms  {r[2]:2d} calls  {r[3]:8.1f} MB/call  {r[4]:5.2f} TB/s  {r[1]}")
print(f"fused kernels matched: {len(rows)}, {tot_ms:.3f} ms, {tot_gb:.2f} GB per step, {tot_gb / tot_ms:.2f} TB/s overall")
for bw in (3.0, 3.5, 4.0):
    print(f"  at {bw} TB/s: {tot_gb / bw:.2f} ms")

"""Cross-check of the generated C library (``make cross-check``): the zoo's ``bestformer_tiny`` trained on MNIST,
exported to C, built for

- a Cortex-M4 (STM32F4 class: ``arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -mfpu=fpv4-sp-d16 -mfloat-abi=hard``):
  the sizes of the library object and of a linked firmware image with a static arena (``.text`` / ``.data`` /
  ``.bss``), flash = text + data and RAM = data + bss against the goals (64 KiB, 192 KiB);
- aarch64 Linux (``aarch64-linux-gnu-gcc -static``, the NEON popcount path, and the portable path), run under
  ``qemu-aarch64`` on MNIST test images: every logit equal to the packed runtime's bit for bit, the argmax equal
  to PyTorch's, the test accuracy of both.

    .venv/bin/python benchmarks/cross_check.py --data-dir ../shared/data/mnist --limit 1000

Writes ``benchmarks/results/cross_check.json``; the last line is the verdict.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import bestformer
from bestformer.data import build_datasets
from bestformer.deploy.c_export import CFLAGS, export_c
from bestformer.deploy.fold import fold_model
from bestformer.deploy.runtime import PackedModel
from bestformer.fileio import atomic_write_json
from bestformer.neurons.backend import use_backend

M4_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard", "-Os")
FLASH_GOAL, RAM_GOAL = 64 * 1024, 192 * 1024
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "aarch64-linux-gnu-gcc", "qemu-aarch64")

#: a firmware's main: the arena and one input as static buffers, so that the linked image's .bss is the model's RAM
FIRMWARE_MAIN = """#include "model.h"
static double arena[(BESTFORMER_ARENA_BYTES + 7) / 8];
static float input[BESTFORMER_INPUT_SIZE];
volatile int bf_result;
int main(void) {
    float logits[BESTFORMER_NUM_CLASSES];
    bf_result = bestformer_predict(input, BESTFORMER_INPUT_SIZE, logits, BESTFORMER_NUM_CLASSES, arena,
                                   sizeof arena);
    return (int)logits[0];
}
"""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def sections(path: Path) -> dict[str, int]:
    """``.text``, ``.data``, ``.bss`` bytes (``arm-none-eabi-size -A``: read-only data counts as text)."""
    out: dict[str, int] = {"text": 0, "data": 0, "bss": 0}
    for line in run(["arm-none-eabi-size", "-A", str(path)]).stdout.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        name, size = parts[0], int(parts[1])
        if name.startswith((".text", ".rodata", ".ARM", ".init", ".fini", ".eh_frame")):
            out["text"] += size
        elif name.startswith(".data"):
            out["data"] += size
        elif name.startswith((".bss", "COMMON")):
            out["bss"] += size
    return out


def cortex_m4(info, work: Path) -> dict[str, dict[str, int]]:
    """Section sizes of the library object and of a linked firmware image; ``stack``: the sum of the stack frames
    of every function of model.c (GCC ``-fstack-usage``), a bound on the deepest call chain."""
    obj = work / "model_m4.o"
    run(["arm-none-eabi-gcc", *CFLAGS, *M4_FLAGS, "-fstack-usage", "-c", str(info.files["model.c"]), "-o", str(obj)],
        cwd=work)
    frames = [int(line.split("\t")[1]) for line in (work / "model_m4.su").read_text().splitlines() if "\t" in line]
    (work / "firmware.c").write_text(FIRMWARE_MAIN)
    elf = work / "firmware.elf"
    run(["arm-none-eabi-gcc", *CFLAGS, *M4_FLAGS, "-I", str(info.out_dir), "--specs=nano.specs",
         "--specs=nosys.specs", "-Wl,--gc-sections", "-ffunction-sections", "-fdata-sections",
         str(info.files["model.c"]), str(work / "firmware.c"), "-o", str(elf)])
    res = {"library": sections(obj), "firmware": sections(elf)}
    for r in res.values():
        r["flash"], r["ram"] = r["text"] + r["data"], r["data"] + r["bss"]
    res["library"]["stack"] = sum(frames)
    return res


def aarch64(info, x: np.ndarray, work: Path, portable: bool) -> tuple[np.ndarray, str]:
    """The logits of ``x`` from the library built for aarch64 and run under qemu, and its popcount path."""
    exe = work / f"predict_aarch64{'_portable' if portable else ''}"
    run(["aarch64-linux-gnu-gcc", *CFLAGS, "-static", *(("-DBF_FORCE_PORTABLE",) if portable else ()),
         str(info.files["model.c"]), str(info.files["example.c"]), "-o", str(exe)])
    inputs = work / "inputs.f32"
    inputs.write_bytes(np.ascontiguousarray(x, np.float32).tobytes())
    out = run(["qemu-aarch64", str(exe), str(inputs)]).stdout.splitlines()
    logits = np.array([[float(v) for v in line.split()[:-2]] for line in out], np.float32)
    binary = exe.read_bytes()  # the popcount path compiled in: its name is a string constant of the library
    path = next(p for p in ("neon", "portable") if f"{p}\0".encode() in binary)
    return logits, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist", help="MNIST (the four IDX files)")
    parser.add_argument("--limit", type=int, default=1000, help="MNIST test images to run under qemu")
    parser.add_argument("--entry", default="bestformer_tiny.mnist", help="zoo entry")
    parser.add_argument("--results", default="benchmarks/results/cross_check.json")
    args = parser.parse_args(argv)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"missing cross tools: {', '.join(missing)} (make cross-check installs them with apt-get)",
              file=sys.stderr)
        return 2
    if args.limit < 1:
        parser.error("--limit must be >= 1")

    model, _ = bestformer.load_pretrained(args.entry)
    model.eval()
    pm = PackedModel(fold_model(model), threads=1)
    bundle = build_datasets("mnist", args.data_dir, limit=args.limit, val_fraction=0.0)
    xs, ys = zip(*(bundle.test[i] for i in range(len(bundle.test))), strict=True)
    x, y = torch.stack(xs), np.array(ys)
    with use_backend("plain"), torch.no_grad():
        ref = model(x).numpy()
    want = pm.predict(x.numpy())

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = export_c(pm, work / "c")
        m4 = cortex_m4(info, work)
        runs = {}
        for portable in (False, True):
            got, path = aarch64(info, x.numpy(), work, portable)
            same = got.shape == want.shape and bool((got.view(np.uint32) == want.view(np.uint32)).all())
            runs[path] = {"bit_equal_packed": same, "accuracy": float((got.argmax(1) == y).mean()),
                          "argmax_equal_pytorch": bool((got.argmax(1) == ref.argmax(1)).all())}
    res = {"entry": args.entry, "test_images": len(y), "arena_bytes": info.arena_bytes,
           "weight_bytes": info.weight_bytes, "cortex_m4": m4, "aarch64_qemu": runs,
           "pytorch_accuracy": float((ref.argmax(1) == y).mean()),
           "goals": {"flash_bytes": FLASH_GOAL, "ram_bytes": RAM_GOAL}}
    atomic_write_json(args.results, res)

    fw = m4["firmware"]
    print(f"{args.entry}: weights {info.weight_bytes} B, arena {info.arena_bytes} B")
    for name, r in m4.items():
        print(f"Cortex-M4 {name:9s} .text {r['text']:7d}  .data {r['data']:5d}  .bss {r['bss']:7d}  "
              f"flash {r['flash'] / 1024:6.1f} KiB  RAM {r['ram'] / 1024:6.1f} KiB")
    print(f"stack: at most {m4['library']['stack']} B (the sum of all of model.c's frames)")
    for name, r in runs.items():
        print(f"aarch64 ({name}) under qemu on {len(y)} MNIST test images: bit-equal to the packed runtime "
              f"{r['bit_equal_packed']}, argmax equal to PyTorch {r['argmax_equal_pytorch']}, accuracy "
              f"{r['accuracy']:.2%} (PyTorch {res['pytorch_accuracy']:.2%})")
    ok = (fw["flash"] <= FLASH_GOAL and fw["ram"] + m4["library"]["stack"] <= RAM_GOAL
          and all(r["bit_equal_packed"] and r["argmax_equal_pytorch"] for r in runs.values()))
    print(f"cross-check {'passed' if ok else 'FAILED'}: Cortex-M4 flash {fw['flash'] / 1024:.1f} KiB (goal <= 64), "
          f"RAM {(fw['ram'] + m4['library']['stack']) / 1024:.1f} KiB with the stack (goal <= 192); aarch64 under "
          f"qemu bit-exact: {all(r['bit_equal_packed'] for r in runs.values())}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``bestformer export CKPT --format packed|nir|onnx|c -o OUT``: write a deployment file from a checkpoint.

``packed``: the folded 1-bit model as one ``.bst`` file for the bit-packed runtime (``bestformer predict``);
``nir``: the Neuromorphic Intermediate Representation of the parts NIR can express; ``onnx``: one ONNX graph
(T unrolled, +-1 weights, BatchNorm folded, dynamic batch) for onnxruntime, TensorRT, OpenVINO; ``c``: a C99
library (``-o FOLDER/model.c``; ``model.h`` and ``example.c`` beside it) whose logits equal the packed runtime's
(docs/deploy.md).
CKPT may be a zoo entry, ``zoo:NAME``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .options import integer, number

HELP = "write a deployment file (packed 1-bit model, NIR graph, ONNX or a C library) from a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a .safetensors checkpoint written by bestformer, or zoo:NAME")
    parser.add_argument("--format", choices=("packed", "nir", "onnx", "c"), default="packed",
                        help="packed: .bst file for `bestformer predict`; nir: NIR graph (HDF5); onnx: ONNX graph; "
                             "c: C99 library (-o FOLDER/model.c; model.h and example.c are written beside it)")
    parser.add_argument("-o", "--output", required=True,
                        help="file to write (e.g. model.bst or model.nir; --format c: FOLDER/model.c, the folder "
                             "is created)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="packed: storage of the full-precision tensors (float32 reproduces PyTorch exactly; "
                             "float16 is smaller and approximate)")
    parser.add_argument("--verify", type=integer(0, 100_000), default=0, metavar="N",
                        help="packed: run N random inputs through the file and PyTorch and report the difference")
    parser.add_argument("--subgraphs", action="store_true",
                        help="nir: export the NIR-expressible sub-graphs (stem, MLPs, heads) of a model with "
                             "spiking self-attention instead of failing")
    parser.add_argument("--threads", type=integer(1, 256), default=1,
                        help="c: scratch sets in the arena, so that a build with -fopenmp runs each layer on up to "
                             "this many threads")
    parser.add_argument("--dt", type=number(positive=True), default=1e-4,
                        help="nir: the time step one model step stands for (snnTorch's importer assumes 1e-4 s)")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..fileio import check_output
    from ..pipeline import load_weights_spec

    if args.format == "c" and Path(args.output).name != "model.c":
        raise ConfigError(f"--format c writes model.c, model.h and example.c into one folder: give -o "
                          f"{Path(args.output).parent / 'model.c'} (got {Path(args.output).name!r})")
    out = Path(args.output) if args.format == "c" else check_output(args.output)  # before any compute
    model, meta = load_weights_spec(args.checkpoint)
    if args.format == "c":  # its folder is created once the checkpoint has loaded
        out = check_output(out, parents=True)
    name = meta["model_name"]
    if args.threads != 1 and args.format != "c":
        raise ConfigError("--threads applies to --format c")
    if args.format in ("onnx", "c"):
        if args.verify or args.subgraphs:
            raise ConfigError("--verify and --subgraphs apply to --format packed / nir")
        from ..data import is_event_dataset

        dataset = meta.get("dataset") or (meta.get("config") or {}).get("dataset")
        events = bool(dataset) and is_event_dataset(dataset)
        if args.format == "c":
            return _export_c(model, out, events, name, args.threads)
        from ..deploy.onnx_export import export_onnx

        export_onnx(model, out, events=events)
        print(f"wrote {out} (ONNX, {out.stat().st_size / 1e6:.3f} MB, input "
              f"{'[T, B, C, H, W] event frames' if events else '[B, C, H, W] images'}, dynamic batch) from {name}")
        return 0
    if args.format == "nir":
        if args.verify:
            raise ConfigError("--verify applies to --format packed")
        from ..deploy.nir_export import export_nir

        export_nir(model, out, subgraphs=args.subgraphs, dt=args.dt)
        print(f"wrote {out} (NIR, {out.stat().st_size / 1e6:.2f} MB) from {name}")
        return 0
    if args.subgraphs:
        raise ConfigError("--subgraphs applies to --format nir")
    from ..deploy.fold import export_packed

    export_packed(model, out, dtype=args.dtype)
    size = out.stat().st_size
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    print(f"wrote {out} ({size / 1e6:.3f} MB, {fp32 / size:.1f}x smaller than float32 weights) from {name}")
    if args.verify:
        import numpy as np
        import torch

        from ..deploy.runtime import PackedModel

        packed = PackedModel.load(out)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.verify, *packed.input_shape)).astype(np.float32)
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        got = packed.predict(x)
        print(f"verify on {args.verify} random inputs: max |logit difference| {np.abs(got - ref).max():.2e}, "
              f"argmax identical on {(got.argmax(1) == ref.argmax(1)).mean():.0%}")
    return 0


def _export_c(model: Any, out: Path, events: bool, name: str, threads: int) -> int:
    from ..deploy.c_build import SPEED_FLAGS
    from ..deploy.c_export import CFLAGS, export_c

    info = export_c(model, out.parent, events=events, threads=threads)
    omp = " -fopenmp" if threads > 1 else ""
    print(f"wrote {out} with model.h and example.c (C99, {info.weight_bytes / 1e3:.1f} KB of constants, arena "
          f"{info.arena_bytes} bytes, input {'[T][C][H][W] event frames' if events else '[C][H][W]'}) from {name}; "
          f"build: cc {' '.join(CFLAGS)} -c {out} (fastest on this CPU: cc {' '.join((*CFLAGS, *SPEED_FLAGS))}{omp} "
          f"-c {out})")
    return 0

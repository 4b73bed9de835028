"""``agentforge export ARTIFACT --to hf DIR`` / ``--to gguf FILE``: the model of an artifact where
users run small models.

    agentforge export runs/tiny/08-compression/model.afz --to hf tiny-hf
    agentforge export runs/tiny/08-compression/model.afz --to gguf tiny.gguf --ternary tq1_0

ARTIFACT is what ``agentforge.load`` opens: a model.afz, a model directory or a run's phase
directory (``--artifact`` picks one where a phase hands over several).

``--to hf``: a plain Hugging Face directory, ternary layers dequantized to ``nn.Linear``
(codes × scale, in --dtype). A Llama-family model loads with transformers alone; a Cognate
model ships its code and loads with ``trust_remote_code=True``.

``--to gguf``: a llama.cpp file for Llama-architecture models, ternary layers as TQ2_0
(``--ternary tq2_0``, default) or TQ1_0 (rows not a multiple of 256 long: Q4_0, still exact),
other matrices F16, norms F32.

The experts (router and weight sets) and the thinking head have no place in either format: the
command names those it leaves behind.
"""

from __future__ import annotations

from pathlib import Path

HELP = "write an artifact's model as a plain Hugging Face directory or a llama.cpp GGUF file"
FORMATS = {"hf": "directory", "gguf": "file"}
DTYPES = ("bfloat16", "float16", "float32")
TERNARY = ("tq2_0", "tq1_0")


def add_arguments(parser) -> None:
    parser.add_argument(
        "artifact", metavar="ARTIFACT", help="a model.afz, a model directory or a run's phase directory"
    )
    parser.add_argument(
        "--to",
        nargs=2,
        required=True,
        metavar=("FORMAT", "DEST"),
        help="hf DIR (a Hugging Face directory) or gguf FILE (llama.cpp)",
    )
    parser.add_argument(
        "--artifact",
        dest="artifact_name",
        metavar="NAME",
        help="which model of a phase directory that hands over several",
    )
    parser.add_argument("--dtype", help=f"hf: the weights' dtype, one of {', '.join(DTYPES)} (default bfloat16)")
    parser.add_argument(
        "--ternary", help=f"gguf: the ternary layers' type, one of {', '.join(TERNARY)} (default tq2_0)"
    )
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists")


def _options(args) -> tuple[str, Path]:
    """The format and destination, every option checked against it (``ConfigError``)."""
    from agentforge.errors import ConfigError

    fmt, dest = args.to
    if fmt not in FORMATS:
        raise ConfigError(f"--to {fmt}: unknown format; choose one of {', '.join(FORMATS)}")
    wrong = "--ternary" if fmt == "hf" and args.ternary else "--dtype" if fmt == "gguf" and args.dtype else None
    if wrong:
        raise ConfigError(f"{wrong} does not apply to --to {fmt}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype}: choose one of {', '.join(DTYPES)}")
    if args.ternary is not None and args.ternary not in TERNARY:
        raise ConfigError(f"--ternary {args.ternary}: choose one of {', '.join(TERNARY)}")
    return fmt, Path(dest)


def run(args) -> int:
    from agentforge.export import export_hf, not_exported, open_artifact
    from agentforge.export.hf import DTYPES as TORCH_DTYPES
    from agentforge.export.source import check_destination

    fmt, dest = _options(args)
    check_destination(dest, FORMATS[fmt], args.force)
    agent = open_artifact(args.artifact, args.artifact_name)
    left = not_exported(agent)
    if fmt == "hf":
        done = export_hf(agent, dest, dtype=TORCH_DTYPES[args.dtype or "bfloat16"])
        how = (
            "trust_remote_code=True (the Cognate code is in the directory)"
            if done["remote_code"]
            else "transformers alone"
        )
        print(
            f"wrote {dest}: {done['ternary_layers']} ternary layers as {done['dtype']} nn.Linear, "
            f"{done['bytes'] / 2**20:.2f} MiB; AutoModelForCausalLM.from_pretrained loads it with {how}"
        )
    else:
        from agentforge.export.gguf import export_gguf  # the gguf package: only for this format

        done = export_gguf(agent, dest, ternary=args.ternary or "tq2_0")
        types = ", ".join(f"{n} {name}" for name, n in sorted(done["types"].items()))
        print(f"wrote {dest}: tensors {types}, {done['bytes'] / 2**20:.2f} MiB")
        for kind, how in (("Q4_0", "exact: d = scale, q = code + 8"), ("F16", "not a multiple of 32 either")):
            if layers := done["instead"][kind]:
                print(
                    f"as {kind}: {len(layers)} ternary layers whose rows are not a multiple of 256 weights, "
                    f"the block of llama.cpp's ternary types (e.g. {layers[0]}; {how})"
                )
    if left:
        print(f"not exported: {', '.join(left)}; use agentforge.load for them")
    return 0

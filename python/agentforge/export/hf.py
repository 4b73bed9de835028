"""``agentforge export ARTIFACT --to hf DIR``: a plain Hugging Face model directory.

* Every ternary (BitLinear) layer becomes a plain ``nn.Linear`` whose weight is its codes ×
  scale cast to ``dtype`` (bf16 by default, which rounds each scale to bf16; float32 keeps the
  values exact). config.json loses its ``quantization_config``, so no quantizer is needed.
* A model whose architecture transformers knows (Llama and its family) then loads with
  ``AutoModelForCausalLM.from_pretrained(DIR)`` and nothing else installed.
* A Cognate model ships its code: configuration_cognate.py and modeling_cognate.py, copied from
  agentforge with their import of each other made relative, and ``auto_map`` in config.json, so
  ``from_pretrained(DIR, trust_remote_code=True)`` loads it without agentforge. Without
  ``trust_remote_code=True`` transformers refuses, and its error says to pass it.
* The tokenizer goes along (tokenizer.json, its special tokens and chat template).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from agentforge.artifacts import atomic_directory
from agentforge.export.source import dequantized, ternary_layers

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COGNATE = "cognate"
AUTO_MAP = {
    "AutoConfig": "configuration_cognate.CognateConfig",
    "AutoModelForCausalLM": "modeling_cognate.CognateForCausalLM",
}
# transformers loads a directory's code as a package of its own, so the two files must reach
# each other by relative import; any other import of agentforge would need agentforge installed.
_SIBLING_IMPORT = re.compile(r"^(\s*)from agentforge\.models\.(configuration_cognate|modeling_cognate) import ", re.M)
_AGENTFORGE_IMPORT = re.compile(r"^\s*(?:from|import)\s+agentforge\b.*$", re.M)


def plain_linears(lm, dtype: torch.dtype) -> int:
    """Replace each BitLinear of ``lm`` (under every name it has) by an ``nn.Linear`` holding
    codes × scale in ``dtype``; returns how many layers were replaced."""
    replacement = {}
    for name, (codes, scale) in ternary_layers(lm).items():
        old = lm.get_submodule(name)
        linear = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        linear.weight = nn.Parameter(dequantized(codes, scale).to(dtype))
        if old.bias is not None:
            linear.bias = nn.Parameter(old.bias.detach().to(dtype))
        replacement[id(old)] = linear
    for name, module in list(lm.named_modules(remove_duplicate=False)):
        if id(module) in replacement:
            lm.set_submodule(name, replacement[id(module)])
    return len(replacement)


def cognate_code() -> dict[str, str]:
    """``{file name: source}`` of Cognate's configuration and modeling modules, standalone."""
    from agentforge import __version__
    from agentforge.models import configuration_cognate, modeling_cognate

    files = {}
    for module in (configuration_cognate, modeling_cognate):
        assert module.__file__ is not None  # a source module
        path = Path(module.__file__)
        source = _SIBLING_IMPORT.sub(r"\1from .\2 import ", path.read_text(encoding="utf-8"))
        leftover = _AGENTFORGE_IMPORT.search(source)
        if leftover:
            raise RuntimeError(
                f"{path.name} imports agentforge ({leftover.group(0).strip()}), so the exported "
                "directory could not load without agentforge; make that import relative or remove it"
            )
        files[path.name] = (
            f"# agentforge/models/{path.name} of agentforge {__version__}, copied by "
            "`agentforge export --to hf`: it needs only torch and transformers.\n" + source
        )
    return files


def export_hf(agent, dest, *, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write ``agent``'s model and tokenizer to the directory ``dest`` (atomically: a failure
    leaves no partial directory). Converts ``agent.lm`` in place rather than holding a second
    copy of the weights, so the Agent is not usable afterwards.

    Returns ``{"ternary_layers", "dtype", "remote_code", "bytes"}``."""
    lm = agent.lm
    remote_code = lm.config.model_type == COGNATE
    code = cognate_code() if remote_code else {}  # fails before anything is converted or written
    count = plain_linears(lm, dtype)
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.hf_quantizer = None  # else save_pretrained would describe the layers as quantized again
    lm.to(dtype)
    if remote_code:
        lm.config.auto_map = dict(AUTO_MAP)
    with atomic_directory(dest) as tmp:
        lm.save_pretrained(tmp)
        if agent.tokenizer is not None:
            agent.tokenizer.save_pretrained(tmp)
        for name, source in code.items():
            (tmp / name).write_text(source, encoding="utf-8")
    size = sum(p.stat().st_size for p in Path(dest).rglob("*") if p.is_file())
    return {
        "ternary_layers": count,
        "dtype": str(dtype).removeprefix("torch."),
        "remote_code": remote_code,
        "bytes": size,
    }

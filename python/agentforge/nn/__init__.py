"""BitNet b1.58 layers and model conversion.

    model = convert_to_bitnet(model)      # nn.Linear -> BitLinear (training state, STE)
    ...train...
    pack_bitnet(model)                    # -> packed ternary weights, fast kernels
    model.save_pretrained(path)           # config.json describes the BitLinear layers

``AutoModelForCausalLM.from_pretrained(path)`` rebuilds them after ``import agentforge``.
"""

from agentforge._import_hooks import after_import
from agentforge.nn.bitlinear import BitLinear
from agentforge.nn.convert import convert_to_bitnet, pack_bitnet
from agentforge.nn.formats import from_hf_bitnet, pack_hf_bitnet, to_hf_bitnet, unpack_hf_bitnet

__all__ = [
    "BitLinear",
    "convert_to_bitnet",
    "pack_bitnet",
    "to_hf_bitnet",
    "from_hf_bitnet",
    "pack_hf_bitnet",
    "unpack_hf_bitnet",
]


def _register_quantizer(auto_module) -> None:
    from agentforge.nn.hf_quantizer import register

    register(auto_module)


after_import("transformers.quantizers.auto", _register_quantizer)

"""Export a model artifact to where users run small models: a plain Hugging Face directory or a
llama.cpp GGUF file.

    agent = open_artifact("runs/tiny/08-compression/model.afz")
    export_hf(agent, "tiny-hf")                       # AutoModelForCausalLM.from_pretrained("tiny-hf")
    export_gguf(agent, "tiny.gguf", ternary="tq2_0")  # llama.cpp, ternary layers as TQ2_0

Both take the ternary (BitLinear) layers from their exact codes and scale (``ternary_layers``):
the HF export dequantizes them to plain ``nn.Linear`` weights, codes × scale; the GGUF export
stores the codes in llama.cpp's ternary block types. Neither can hold what the pipeline trained
around the model (the experts' router and weight sets, the Quiet-STaR thinking head):
``not_exported`` names them, and the command says so.

What a plain export cannot reproduce: the packed model also quantizes each token's activations
to int8 before a ternary matmul (BitNet b1.58). A plain ``nn.Linear`` reads full-precision
activations, and llama.cpp quantizes them its own way (8-bit blocks of 256), so an export's
logits match the packed model's to within that quantization, not bit for bit.
"""

from agentforge.export.hf import export_hf
from agentforge.export.source import not_exported, open_artifact, ternary_layers

__all__ = ["open_artifact", "ternary_layers", "not_exported", "export_hf", "export_gguf"]


def __getattr__(name: str):
    # export_gguf needs the gguf package (the smol extra); the HF export must not
    if name == "export_gguf":
        from agentforge.export.gguf import export_gguf

        return export_gguf
    raise AttributeError(f"module 'agentforge.export' has no attribute {name!r}")

"""Configuration of Cognate (architecture in modeling_cognate.py) and its presets."""

from transformers import PreTrainedConfig

PRESETS: dict[str, dict] = {
    # ~40k parameters: for tests, where a phase must run end to end in seconds
    "micro": dict(
        vocab_size=512,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        num_prelude_layers=1,
        num_core_layers=1,
        window=64,
        max_position_embeddings=256,
        memory_dim=16,
        memory_hidden=16,
        memory_chunk=8,
        max_recursion=2,
    ),
    # ~1.1M parameters: the default CPU run (whole Cognate phase in a few minutes on 2 cores)
    "tiny": dict(
        vocab_size=2048,
        hidden_size=128,
        num_heads=4,
        intermediate_size=352,
        num_prelude_layers=2,
        num_core_layers=1,
        window=128,
        max_position_embeddings=512,
        memory_dim=64,
        memory_hidden=128,
        memory_chunk=16,
        max_recursion=3,
    ),
    # ~25M parameters, the original project's size, for a GPU
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        num_heads=8,
        intermediate_size=1280,
        num_prelude_layers=4,
        num_core_layers=2,
        window=512,
        max_position_embeddings=2048,
        memory_dim=128,
        memory_hidden=256,
        memory_chunk=32,
        max_recursion=3,
    ),
}


class CognateConfig(PreTrainedConfig):
    """Architecture and behaviour of a Cognate model. Fields that change no parameter shape
    (``max_recursion``, ``halt_epsilon``, ``ponder_weight``, ``memory_chunk``, ``memory_max_lr``,
    ``window``) are what the three Cognate siblings vary, so they stay mergeable."""

    model_type = "cognate"

    vocab_size: int = 2048
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 352
    num_prelude_layers: int = 2
    num_core_layers: int = 1
    memory_layers: list[int] | None = None  # prelude block indices with a neural memory; None = all
    window: int = 128  # sliding attention window (tokens, the current one included)
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    memory_dim: int = 64
    memory_hidden: int = 128
    memory_chunk: int = 16
    memory_max_lr: float = 0.1  # upper bound of the data-dependent memory learning rate
    max_recursion: int = 3
    halt_epsilon: float = 0.01  # a token halts once its halting probabilities sum to 1 - epsilon
    ponder_weight: float = 0.01
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.memory_layers is None:
            self.memory_layers = list(range(self.num_prelude_layers))
        self._check()
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_heads",
            "intermediate_size",
            "num_core_layers",
            "window",
            "max_position_embeddings",
            "memory_dim",
            "memory_hidden",
            "memory_chunk",
            "max_recursion",
        )
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"CognateConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_prelude_layers < 0:
            raise ValueError(f"CognateConfig.num_prelude_layers must be >= 0, got {self.num_prelude_layers}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"CognateConfig: hidden_size={self.hidden_size} must split into num_heads={self.num_heads} "
                "heads of even size (RoPE rotates pairs)"
            )
        assert self.memory_layers is not None  # __post_init__ fills it before checking
        bad = [i for i in self.memory_layers if not 0 <= i < self.num_prelude_layers]
        if bad:
            raise ValueError(
                f"CognateConfig.memory_layers={self.memory_layers}: indices {bad} are not prelude blocks "
                f"(0..{self.num_prelude_layers - 1})"
            )
        if not 0 < self.halt_epsilon < 1 or self.ponder_weight < 0 or self.memory_max_lr <= 0:
            raise ValueError(
                "CognateConfig: need 0 < halt_epsilon < 1, ponder_weight >= 0 and memory_max_lr > 0, got "
                f"{self.halt_epsilon}, {self.ponder_weight}, {self.memory_max_lr}"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CognateConfig":
        """The ``micro`` (tests), ``tiny`` or ``small`` architecture, with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"CognateConfig: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

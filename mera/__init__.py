"""mera: modality-incremental continual learning for multimodal LLMs (MERA and baselines)."""

__version__ = "0.1.0"

MODALITIES = ("image", "video", "audio", "point")
PLACEHOLDERS = {m: f"<{m}>" for m in MODALITIES}

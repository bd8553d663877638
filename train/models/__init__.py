"""Networks: staged trunks, heads, and the multi-expert network every method trains."""
from train.models.multi_expert import MultiExpertNet, build_model
from train.models.spec import ModelSpec

__all__ = ["ModelSpec", "MultiExpertNet", "build_model"]

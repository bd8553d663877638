"""One multi-expert network for every method and for export.

K experts either own whole trunks (NCL, `shared_stages=0`) or branch off a shared trunk after
`shared_stages` stages (SHIKE, RIDE-style). forward() returns per-expert logits [B, K, C]; the
ensemble prediction is their mean. Training-only parts (projection heads, EMA encoders, queues)
live with the method, never here, so what export sees is exactly this module.
"""
from __future__ import annotations

import torch
from torch import nn

from expertfuse.errors import UserError
from train.models.backbones import StagedBackbone, build_backbone, stage_names
from train.models.dkf import ShallowAligner, dkf_source, stage_channels
from train.models.heads import build_head
from train.models.spec import ModelSpec


class Expert(nn.Module):
    """An expert's own stages (times its aligned shallow trunk feature, with DKF), pooled, then its head."""

    def __init__(self, backbone: StagedBackbone, head: nn.Module, fusion: ShallowAligner | None = None, source: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.fusion = fusion
        self.source = source  # which trunk stage output the fusion reads (derived from the spec, not saved)

    def features(self, trunk_outputs: list[torch.Tensor]) -> torch.Tensor:
        own = self.backbone(trunk_outputs[-1])
        deep = own[-1] if own else trunk_outputs[-1]  # heads-only experts (SSD's hard and soft heads)
        if self.fusion is not None:
            deep = deep * self.fusion(trunk_outputs[self.source])
        return torch.flatten(nn.functional.adaptive_avg_pool2d(deep, 1), 1)


class MultiExpertNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        names = list(stage_names(spec.arch))
        if not 0 <= spec.shared_stages <= len(names):
            raise UserError(f"shared_stages must be in [0, {len(names)}] for {spec.arch}")
        shared, own = names[:spec.shared_stages], names[spec.shared_stages:]
        if spec.fusion not in ("", "dkf"):
            raise UserError(f"unknown fusion {spec.fusion!r}; choose dkf or none")
        if spec.fusion and spec.shared_stages < 2:
            raise UserError("dkf fusion needs a shared trunk of at least 2 stages (--shared-stages)")
        self.trunk = build_backbone(spec).keep_stages(shared) if shared else None
        experts = []
        for e in range(spec.num_experts):
            backbone = build_backbone(spec).keep_stages(own)
            fusion, source = None, 0
            if spec.fusion == "dkf":
                source = dkf_source(e, spec.shared_stages)
                fusion = ShallowAligner(stage_channels(self.trunk, shared[source]), spec.shared_stages - source)
            experts.append(Expert(backbone, build_head(spec, backbone.out_dim), fusion, source))
        self.experts = nn.ModuleList(experts)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward_features(self, x: torch.Tensor, experts: list[int] | None = None) -> torch.Tensor:
        """Pooled features of every expert (or of `experts`, in that order), [B, K, D]."""
        trunk_outputs = self.trunk(x) if self.trunk is not None else [x]
        return torch.stack([self.experts[k].features(trunk_outputs) for k in self._chosen(experts)], dim=1)

    def heads(self, features: torch.Tensor, experts: list[int] | None = None) -> torch.Tensor:
        """Per-expert logits [B, K, C] from per-expert features [B, K, D] (of `experts`, when given)."""
        return torch.stack([self.experts[k].head(features[:, i]) for i, k in enumerate(self._chosen(experts))], dim=1)

    def forward(self, x: torch.Tensor, with_features: bool = False, experts: list[int] | None = None):
        """Per-expert logits [B, K, C] (and the features [B, K, D] with `with_features`); with `experts`, only
        those experts run (an export of some of them is checked without running the rest)."""
        features = self.forward_features(x, experts)
        logits = self.heads(features, experts)
        return (logits, features) if with_features else logits

    def _chosen(self, experts: list[int] | None) -> list[int]:
        return list(range(len(self.experts))) if experts is None else list(experts)


def build_model(spec: ModelSpec) -> MultiExpertNet:
    return MultiExpertNet(spec)

"""SSD: Self Supervision to Distillation (Li, Wang, Wu, ICCV 2021), in stages as the official code.

Not multi-expert: one trunk with two heads, `hard` (label CE) and `soft` (distilled). In the model it is
a MultiExpertNet whose whole trunk is shared and whose two experts are just those heads, so export can
serve either one (`--head soft|hard`); the two are never averaged.
  I   ssfl (--epochs): CE on the hard head + label-masked MoCo InfoNCE (queue entries of the sample's class
      are removed from the negatives; T 0.2; key encoder = EMA copy of the trunk, m 0.999; 2-layer MLP to 128).
      The queue's labels start at 0 like the official code's (--ssd-queue-fill-label), so class-0 queries see
      none of the not-yet-filled entries as negatives. The key view's augmentation is --key-augment (MoCo-v2's
      in the presets).
  II  slg (--ssd-slg-epochs): LWS scales on the frozen hard head, class-aware sampling (2 per drawn class);
      the frozen trunk's BatchNorm statistics keep updating, as the official code (--ssd-bn-update).
  III sdl (--ssd-sdl-epochs): a fresh network; CE on the hard head + T^2 KL(softmax(t/T) || softmax(soft/T)),
      T = 2, teacher = the stage-II network, frozen, its BatchNorm in train mode like the official code
      (--ssd-teacher-train-bn).
  IV  lws (--ssd-lws-epochs, optional): LWS on the hard head again. LWS scales are folded into the
      exported weights (W' = diag(s) W, b' = s * b).
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from train.methods.base import Method
from train.methods.parts import FeatureQueue, ema_update, freeze_batchnorm, projection_mlp, unwrap
from train.models import build_model
from train.models.backbones import stage_names
from train.models.heads import LWSHead
from train.schedule import Stage, main_stage

HARD, SOFT = 0, 1
# The official (MoCo-style) cosine: lr * (1 + cos(pi * e / E)) / 2 at the 0-indexed epoch e, so a stage starts at its
# peak and never spends an epoch at 0 (a 1-epoch LWS stage trains at full LR): `warmup-cosine` without warmup.
LWS_SCHEDULE = "warmup-cosine"


def masked_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, queue_labels: torch.Tensor,
                    targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE whose negatives exclude queue entries labelled with the query's own class."""
    positive = (q * k).sum(1, keepdim=True)
    negative = (q @ queue.T).masked_fill(queue_labels[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1),
                    reduction="batchmean") * temperature ** 2


class ClassAwareSampler(Sampler):
    """Draw classes in shuffled cycles and take `per_class` consecutive samples of each drawn class from its own
    list, reshuffled every time it wraps around (the official RandomCycleIter), len(dataset) samples an epoch;
    each rank keeps every world-th sample."""

    def __init__(self, targets: list[int], per_class: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        self.by_class = [idx for idx in _group(targets) if idx]
        self.total, self.per_class = len(targets), per_class
        self.generator, self.rank, self.world = generator, rank, world

    def __iter__(self):
        g = self.generator
        lists, pointers, order, out = [list(idx) for idx in self.by_class], [0] * len(self.by_class), [], []
        while len(out) < self.total:
            if not order:
                order = torch.randperm(len(lists), generator=g).tolist()
            c = order.pop()
            for _ in range(self.per_class):
                if pointers[c] % len(lists[c]) == 0:  # first use and every wrap-around: a fresh order
                    lists[c] = [lists[c][i] for i in torch.randperm(len(lists[c]), generator=g).tolist()]
                out.append(lists[c][pointers[c] % len(lists[c])])
                pointers[c] += 1
        return iter(out[:self.total][self.rank::self.world])

    def __len__(self) -> int:
        return math.ceil(self.total / self.world)


def _group(targets: list[int]) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in range(max(targets) + 1)]
    for i, t in enumerate(targets):
        groups[t].append(i)
    return groups


class SSDAux(FeatureQueue):
    """Training-only parts: the contrastive branch (stage I: one labelled key queue, the buffers of
    FeatureQueue, projections and an EMA key encoder) and the distillation teacher (stage III)."""

    def __init__(self, model, cfg):
        super().__init__(1, cfg.moco_queue, cfg.moco_dim, label_fill=cfg.ssd_queue_fill_label)
        dim = model.experts[HARD].backbone.out_dim
        self.query_projection = projection_mlp(dim, cfg.moco_dim)
        self.key_projection = copy.deepcopy(self.query_projection).requires_grad_(False)
        self.key_encoder = copy.deepcopy(model.trunk).requires_grad_(False)
        self.teacher = build_model(model.spec).requires_grad_(False)
        self.teacher.experts[HARD].head = LWSHead(dim, model.spec.num_classes).requires_grad_(False)

    def momentum_update(self, trunk: nn.Module, momentum: float) -> None:
        ema_update(self.key_encoder, trunk, momentum)
        ema_update(self.key_projection, self.query_projection, momentum)


def ssd_stages(cfg) -> list[Stage]:
    """I ssfl and III sdl with the configured recipe (--epochs, --ssd-sdl-epochs); II slg and the optional IV lws
    train LWS scales with the official cosine."""
    main = main_stage(cfg)
    stages = [replace(main, name="ssfl"),
              Stage("slg", cfg.ssd_slg_epochs, cfg.ssd_slg_lr, LWS_SCHEDULE, batch_size=cfg.ssd_slg_batch_size),
              replace(main, name="sdl", epochs=cfg.ssd_sdl_epochs or cfg.epochs),
              Stage("lws", cfg.ssd_lws_epochs, cfg.ssd_slg_lr, LWS_SCHEDULE, batch_size=cfg.ssd_slg_batch_size)]
    return [s for s in stages if s.epochs > 0]


class SSD(Method):
    name = "ssd"
    served_experts = (SOFT,)  # export's default head; the two heads are never averaged
    served_label = "soft head"

    @staticmethod
    def adapt_spec(fields: dict) -> dict:
        """One fully shared trunk, two heads-only experts named hard and soft."""
        return {**fields, "shared_stages": len(stage_names(fields["arch"])), "num_experts": 2,
                "expert_names": ["hard", "soft"], "head": "linear", "fusion": ""}

    def __init__(self, cfg, model, train_counts):
        super().__init__(cfg, model, train_counts)
        self.views = 2
        self.stage = "ssfl"
        model.experts[SOFT].head.requires_grad_(False)  # trained from stage III on
        self.aux = SSDAux(model, cfg)

    def stages(self) -> list[Stage]:
        return ssd_stages(self.cfg)

    def enter_stage(self, stage: Stage, model) -> None:
        self.stage = stage.name
        if stage.name in ("slg", "lws"):  # learnable weight scaling on the frozen hard head
            model.requires_grad_(False)
            linear = model.experts[HARD].head
            lws = LWSHead(linear.in_features, linear.out_features).to(linear.weight.device)
            lws.fc.load_state_dict(linear.state_dict())
            model.experts[HARD].head = lws
            self.views = 1
        elif stage.name == "sdl":  # the stage-II network teaches a fresh one
            self.aux.teacher.load_state_dict(model.state_dict())
            fresh = build_model(model.spec).to(next(model.parameters()).device)
            model.trunk.load_state_dict(fresh.trunk.state_dict())
            for mine, new in zip(model.experts, fresh.experts):
                mine.head = new.head
            model.requires_grad_(True)
            self.views = 1

    def train_mode(self, model) -> None:
        model.train()
        if self.stage in ("slg", "lws") and not self.cfg.ssd_bn_update:
            freeze_batchnorm(model)

    def sampler(self, stage, targets, generator, rank, world):
        return ClassAwareSampler(targets, 2, generator, rank, world) if stage.name in ("slg", "lws") else None

    def loss(self, model, images, targets):
        if self.stage == "ssfl":
            query_images, key_images = images
            logits, features = model(query_images, with_features=True)
            ce = F.cross_entropy(logits[:, HARD], targets)
            self.aux.momentum_update(unwrap(model).trunk, self.cfg.moco_momentum)
            q = F.normalize(self.aux.query_projection(features[:, HARD]), dim=1)
            with torch.no_grad():
                key_features = torch.flatten(F.adaptive_avg_pool2d(self.aux.key_encoder(key_images)[-1], 1), 1)
                k = F.normalize(self.aux.key_projection(key_features), dim=1)
            con = masked_info_nce(q, k, self.aux.queue[0].clone(), self.aux.queue_labels[0].clone(), targets,
                                  self.cfg.moco_t)
            self.aux.enqueue(0, k, targets)
            return ce + con, logits, {"ce": ce.detach(), "con": con.detach()}
        logits = model(images)
        hard_ce = F.cross_entropy(logits[:, HARD], targets)
        if self.stage in ("slg", "lws"):
            return hard_ce, logits, {"lws_ce": hard_ce.detach()}
        teacher = self.aux.teacher.train() if self.cfg.ssd_teacher_train_bn else self.aux.teacher.eval()
        with torch.no_grad():
            teacher_logits = teacher(images)[:, HARD]
        kd = distillation(logits[:, SOFT], teacher_logits, self.cfg.ssd_kd_t)
        return hard_ce + kd, logits, {"ce": hard_ce.detach(), "kd": kd.detach()}

    def export_state(self, model) -> dict:
        """The model with LWS scales folded into the hard head: plain linear heads, as the spec says."""
        state = model.state_dict()
        head = model.experts[HARD].head
        if isinstance(head, LWSHead):
            folded = head.folded()
            prefix = f"experts.{HARD}.head."
            for name in ("fc.weight", "fc.bias", "scales"):
                del state[prefix + name]
            state[prefix + "weight"], state[prefix + "bias"] = folded.weight.detach(), folded.bias.detach()
        return state

    def selection_metric(self, metrics: dict) -> float:
        """The better head; SSD never averages them."""
        return max(e["overall"] for e in metrics["experts"])

